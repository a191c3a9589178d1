"""SULQ, the shift-uniform-log2 quantizer of I&S-ViT for post-softmax activations (method.md 1.3-1.6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Quantizer, check_positive_finite
from .ste import clamp_ste, rnd, round_ste

#: The official code's 11 candidates for the shift eta (method.md 1.4).
OFFICIAL_ETA_GRID: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)
#: Paper-mode default grid: reaches the eta ~ 1e-6 that the paper's worked example needs.
PAPER_ETA_GRID: tuple[float, ...] = (
    1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 5e-3, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0,
)  # fmt: skip


class SULQ(Quantizer):
    """Shift-uniform-log2 quantizer: uniform quantization of ``log2(x + eta)``, integer-exponent output.

    ``mode="paper"`` (Eq. 13-14): ``y = -log2(x + eta)``; ``q = clamp(round(y/s) + z, 0, 2^b - 1)`` with
    ``s = (max y - min y) / (2^b - 1)``, ``z = round(-min y / s)``; ``x_hat = 2^round(-s (q - z)) - eta``.

    ``mode="official"`` (the released code): ``y = log2(x + eta)``; eta is chosen on the 2^b-code grid
    (step ``(maxv - minv)/(2^b - 1)``) but the forward uses step ``d = (maxv - minv)/2^b`` and codes
    ``0 .. 2^b`` (so ``n_codes = 2^b + 1``) with the exact offset ``minv``:
    ``x_hat = 2^round(q d + minv) - eta``.

    In both modes the output is a power of two minus eta, so the lowest level is negative whenever
    ``2^e_min < eta`` (e.g. -0.0022 for 3-bit paper mode at eta = 0.01) and the highest can exceed 1
    (x = 1 maps to 1.5 at eta = 0.5); this is the formula, kept as written. The distinct levels are
    bounded by the integer exponent range (about ``-log2 eta + 1``), not by ``2^b``.

    Args:
        bits: bit-width b.
        mode: ``"paper"`` or ``"official"``.
        eta: fixed shift (> 0); disables the search. ``None`` grid-searches eta by MSE.
        eta_grid: candidates for the search (defaults: ``PAPER_ETA_GRID`` / ``OFFICIAL_ETA_GRID``).

    Buffers ``eta``, ``minv``, ``maxv`` hold the calibrated state (the official code loses min/max on
    save; here they are in ``state_dict``).
    """

    name = "sulq"
    non_negative_input = True

    def __init__(self, bits: int, mode: str = "paper", eta: float | None = None, eta_grid: Sequence[float] | None = None) -> None:
        super().__init__(bits)
        if mode not in ("paper", "official"):
            raise ValueError(f"mode must be 'paper' or 'official', got {mode!r}")
        self.mode = mode
        self.fixed_eta = None if eta is None else check_positive_finite("eta", eta)
        grid = eta_grid if eta_grid is not None else (PAPER_ETA_GRID if mode == "paper" else OFFICIAL_ETA_GRID)
        grid = tuple(check_positive_finite("eta_grid entry", e) for e in grid)
        if not grid:
            raise ValueError("eta_grid must not be empty")
        self.eta_grid = grid
        self.register_buffer("eta", torch.tensor(self.fixed_eta or grid[0]))
        self.register_buffer("minv", torch.tensor(0.0))
        self.register_buffer("maxv", torch.tensor(1.0))

    @property
    def n_codes(self) -> int:
        return 2**self.bits + (1 if self.mode == "official" else 0)

    # -- the log-domain range and the grid step used by forward
    def _y(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.log2(x + self.eta)
        return -y if self.mode == "paper" else y

    def _step(self, n_steps: int) -> torch.Tensor:
        return ((self.maxv - self.minv) / n_steps).clamp_min(1e-12)

    def _codes(self, x: torch.Tensor, ste: bool) -> torch.Tensor:
        y = self._y(x)
        if self.mode == "paper":
            s = self._step(2**self.bits - 1)
            z = torch.round(-self.minv / s)
            return clamp_ste(rnd(y / s, ste) + z, 0, 2**self.bits - 1)
        d = self._step(2**self.bits)
        return clamp_ste(rnd((y - self.minv) / d, ste), 0, 2**self.bits)

    def _dequant(self, codes: torch.Tensor) -> torch.Tensor:
        if self.mode == "paper":
            s = self._step(2**self.bits - 1)
            z = torch.round(-self.minv / s)
            e = round_ste(-s * (codes - z))
        else:
            e = round_ste(codes * self._step(2**self.bits) + self.minv)
        return torch.exp2(e) - self.eta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrate_on_next_forward or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        self._check_ready()
        return self._fake_quant_no_grad(x)

    def _fake_quant_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        """``_dequant(_codes(x))`` in one buffer, bit for bit (evaluation: no autograd).

        Paper mode folds the zero-point into the clamp bounds (``z`` is a whole number, so
        ``clamp(r + z, 0, qmax) - z == clamp(r, -z, qmax - z)`` exactly) and the sign of ``y`` into the
        step (``-y / s == y / (-s)`` and rounding to nearest even is symmetric).
        """
        t = torch.add(x, self.eta).log2_()
        if self.mode == "paper":
            qmax = 2**self.bits - 1
            s = self._step(qmax)
            z = float(torch.round(-self.minv / s))
            t.div_(-s).round_().clamp_(-z, qmax - z).mul_(-s)
        else:
            d = self._step(2**self.bits)
            t.sub_(self.minv).div_(d).round_().clamp_(0, 2**self.bits).mul_(d).add_(self.minv)
        return t.round_().exp2_().sub_(self.eta).to(x.dtype)

    def exponents(self) -> torch.Tensor:
        """Integer exponent of every code (length ``n_codes``): the 'bit-shift' view of the levels."""
        self._check_ready()
        return torch.log2(self.decode(torch.arange(self.n_codes)) + self.eta).round()

    def _calib_error(self, x: torch.Tensor) -> float:
        """MSE of the calibration-time grid for the current eta (sets minv/maxv from x)."""
        y = self._y(x)
        self.minv.fill_(float(y.min()))
        self.maxv.fill_(float(y.max()))
        if self.mode == "paper":
            xq = self._dequant(self._codes(x, False))
        else:  # the official search scores the 2^b-code grid, not the forward grid
            step = self._step(2**self.bits - 1)
            q = torch.clamp(torch.round((y - self.minv) / step), 0, 2**self.bits - 1)
            xq = torch.exp2(torch.round(q * step + self.minv)) - self.eta
        return float((x - xq).pow(2).mean())

    def _calibrate(self, x: torch.Tensor) -> None:
        cands = (self.fixed_eta,) if self.fixed_eta is not None else self.eta_grid
        best = None
        for eta in cands:
            self.eta.fill_(eta)
            err = self._calib_error(x)
            if best is None or err < best[0]:
                best = (err, eta, float(self.minv), float(self.maxv))
        _, eta, mn, mx = best
        self.eta.fill_(eta)
        self.minv.fill_(mn)
        self.maxv.fill_(mx)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode!r}, eta={float(self.eta):.3g}"
