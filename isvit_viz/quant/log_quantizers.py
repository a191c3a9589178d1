"""Log-domain quantizers for post-softmax activations: log2 (LQ), log-sqrt2 (RepQ-ViT) and AdaLog."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Quantizer, check_positive_finite
from .ste import clamp_ste, rnd

_TINY = 1e-30  # keeps log2 finite at x = 0; codes for it clamp (or flush) like any underflow


class Log2Quantizer(Quantizer):
    """The log2 quantizer LQ (paper Eq. 10-11): levels ``s * 2^-k`` for ``k = 0 .. 2^b - 1``.

    Args:
        bits: bit-width b.
        underflow: ``"clamp"`` (the paper's LQ: inputs below ``s*2^-(2^b-1)`` take the smallest level)
            or ``"zero"`` (the FQ-ViT/RepQ-ViT code: codes >= 2^b are flushed to 0; that adds a zero
            level, so ``n_codes = 2^b + 1``).
        scale: fixed scale ``s``; ``None`` calibrates it as ``max(x)``.
    """

    name = "log2"
    non_negative_input = True

    def __init__(self, bits: int, underflow: str = "clamp", scale: float | None = None) -> None:
        super().__init__(bits)
        if underflow not in ("clamp", "zero"):
            raise ValueError(f"underflow must be 'clamp' or 'zero', got {underflow!r}")
        self.underflow = underflow
        self.fixed_scale = None if scale is None else check_positive_finite("scale", scale)
        self.register_buffer("scale", torch.tensor(1.0))

    @property
    def n_codes(self) -> int:
        return 2**self.bits + (1 if self.underflow == "zero" else 0)

    def _calibrate(self, x: torch.Tensor) -> None:
        s = self.fixed_scale if self.fixed_scale is not None else float(x.max())
        self.scale.fill_(max(s, _TINY))

    def _codes(self, x: torch.Tensor, ste: bool) -> torch.Tensor:
        k = rnd(-torch.log2(clamp_ste(x, _TINY) / self.scale), ste)
        top = 2**self.bits if self.underflow == "zero" else 2**self.bits - 1
        return clamp_ste(k, 0, top)

    def _dequant(self, codes: torch.Tensor) -> torch.Tensor:
        vals = self.scale * torch.exp2(-codes)
        if self.underflow == "zero":
            vals = torch.where(codes >= 2**self.bits, torch.zeros_like(vals), vals)
        return vals

    def extra_repr(self) -> str:
        return f"bits={self.bits}, underflow={self.underflow!r}, scale={float(self.scale):.4g}"


class LogSqrt2Quantizer(Quantizer):
    """RepQ-ViT's log-sqrt2 quantizer: levels ``d * 2^(-k/2)``, ``k = 0 .. 2^b - 1``; codes >= 2^b -> 0.

    ``d`` is chosen by MSE among the ``percentiles`` quantiles of x (first wins ties), plus ``max(x)``
    when ``include_max``. RepQ-ViT's ``LogSqrt2Quantizer.init_quantization_scale`` starts from
    ``delta = max`` but with ``best_score = 1e10``, so the first percentile always replaces it: max is
    never chosen there (``include_max=False``). ``include_max=True`` (default) keeps this package's
    earlier behaviour for existing users. The flush-to-zero code makes ``n_codes = 2^b + 1``.
    """

    name = "logsqrt2"
    non_negative_input = True

    def __init__(self, bits: int, percentiles: Sequence[float] = (0.999, 0.9999, 0.99999), include_max: bool = True) -> None:
        super().__init__(bits)
        self.percentiles = tuple(float(p) for p in percentiles)
        if not self.percentiles and not include_max:
            raise ValueError("LogSqrt2Quantizer needs at least one scale candidate (percentiles or include_max)")
        self.include_max = bool(include_max)
        self.register_buffer("scale", torch.tensor(1.0))

    @property
    def n_codes(self) -> int:
        return 2**self.bits + 1

    def _calibrate(self, x: torch.Tensor) -> None:
        cands = self.scale_candidates(x)
        best, best_err = None, None
        for d in cands:
            self.scale.fill_(max(float(d), _TINY))
            err = float((self._dequant(self._codes(x, False)) - x).pow(2).mean())
            if best_err is None or err < best_err:
                best, best_err = float(self.scale), err
        self.scale.fill_(best)

    def scale_candidates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Scale candidates ``d`` searched on ``x``, in order: ``[max(x)]`` if ``include_max``, then the quantiles."""
        from .uniform import rowwise_quantiles

        quant = list(rowwise_quantiles(x.reshape(1, -1), self.percentiles)[:, 0]) if self.percentiles else []
        return ([x.max()] if self.include_max else []) + quant

    def _codes(self, x: torch.Tensor, ste: bool) -> torch.Tensor:
        k = rnd(-2 * torch.log2(clamp_ste(x, _TINY) / self.scale), ste)
        return clamp_ste(k, 0, 2**self.bits)

    def _dequant(self, codes: torch.Tensor) -> torch.Tensor:
        vals = self.scale * torch.exp2(-codes / 2)
        return torch.where(codes >= 2**self.bits, torch.zeros_like(vals), vals)


class AdaLogQuantizer(Quantizer):
    """AdaLog-style adaptive-base log quantizer (Wu et al., ECCV 2024), our reading.

    Levels are ``s * a^-k`` for ``k = 0 .. 2^b - 2`` plus an exact zero on the last code, so exactly
    ``2^b`` codes. The base ``a = 2^t`` is searched on calibration data by MSE over ``log2_bases``
    (a base below 2 buys resolution near 1, above 2 buys range toward 0); ``s = max(x)``. AdaLog's
    hardware-oriented lookup tables and its progressive search are not reproduced: this is the
    quantization function, not the kernel.
    """

    name = "adalog"
    non_negative_input = True

    def __init__(self, bits: int, log2_bases: Sequence[float] | None = None) -> None:
        super().__init__(bits)
        grid = tuple(float(t) for t in (log2_bases or [0.25 * i for i in range(1, 13)]))
        for t in grid:
            check_positive_finite("log2 base", t)
        self.log2_bases = grid
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("log2_base", torch.tensor(1.0))

    def _calibrate(self, x: torch.Tensor) -> None:
        self.scale.fill_(max(float(x.max()), _TINY))
        best, best_err = None, None
        for t in self.log2_bases:
            self.log2_base.fill_(t)
            err = float((self._dequant(self._codes(x, False)) - x).pow(2).mean())
            if best_err is None or err < best_err:
                best, best_err = t, err
        self.log2_base.fill_(best)

    def _codes(self, x: torch.Tensor, ste: bool) -> torch.Tensor:
        k = rnd(-torch.log2(clamp_ste(x, _TINY) / self.scale) / self.log2_base, ste)
        return clamp_ste(k, 0, 2**self.bits - 1)

    def _dequant(self, codes: torch.Tensor) -> torch.Tensor:
        vals = self.scale * torch.exp2(-codes * self.log2_base)
        return torch.where(codes >= 2**self.bits - 1, torch.zeros_like(vals), vals)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base=2^{float(self.log2_base):.3g}"
