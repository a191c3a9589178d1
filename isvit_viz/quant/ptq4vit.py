"""PTQ4ViT's twin-uniform quantizers as its released code computes them (hahnyuan/PTQ4ViT, ``quant_layers/``).

They differ from the paper's description, which :class:`isvit_viz.quant.TwinUniformQuantizer` follows.
With ``q = 2^(b-1)``:

* post-softmax (``SoSPTQSLBatchingQuantMatMul.quant_input_A``, matmul.py): a split ``s`` from
  ``{2^-i, i = 0..19}``; a high range of step ``1/(q-1)`` on ``[s, 1]`` and a low range of step
  ``s/(q-1)`` on ``[0, s]``, added: ``round(clamp(x, s, 1)(q-1))/(q-1) + clamp(round(clamp(x, 0, s)/(s/(q-1))), 0, q-1) s/(q-1)``.
  For ``x < s`` the high term is ``round(s(q-1))/(q-1)`` (zero only when ``s < 1/(2(q-1))``) and for
  ``x > s`` the low term is ``s``: the code's offsets, kept here.
* post-GELU (``PostGeluPTQSLBatchingQuantLinear.quant_input``, linear.py): non-negative values on a
  searched step ``d+`` with codes ``0 .. q-1``, negative values on the fixed step ``d- = 0.16997.../q``
  (the GELU minimum over q) with codes ``-q .. 0``.

The code picks ``s`` and ``d+`` with the Hessian-guided metric on the layer output
(:func:`isvit_viz.calib.hessian.hessian_calibrate`); ``calibrate`` here (no task gradients, input only)
scores the same candidates by the MSE of the quantized input.
"""

from __future__ import annotations

import torch

from .base import Quantizer
from .ste import clamp_ste, rnd

#: |min GELU(x)| as the code writes it (``a_neg_interval = 0.16997124254703522 / a_qmax``).
GELU_MIN_ABS = 0.16997124254703522


def interval_factors(alpha: float = 0.01, beta: float = 1.2, n: int = 100) -> torch.Tensor:
    """PTQ4ViT's search grid: ``alpha + i (beta - alpha) / n`` for ``i = 0 .. n - 1`` (float32).

    The code builds ``n + 1`` values but its loops ``range(0, eq_n, parallel_eq_n)`` stop at ``eq_n``, so
    the last one (``beta``) is never scored; the candidates are these ``n`` factors times the initial
    interval. Config ``PTQ4ViT.py``: alpha 0.01, beta 1.2, n 100.
    """
    return torch.tensor([alpha + i * (beta - alpha) / n for i in range(n + 1)], dtype=torch.float32)[:n]


def split_candidates(n: int = 20) -> torch.Tensor:
    """Post-softmax split candidates of the code: ``2^-i`` for ``i = 0 .. n - 1`` (float32)."""
    return torch.tensor([2.0**-i for i in range(n)], dtype=torch.float32)


class PTQ4ViTSoftmaxQuantizer(Quantizer):
    """PTQ4ViT's post-softmax quantizer (official code); see the module docstring.

    Codes: ``c_lo`` (``0 .. q-1``) below the split, ``q - 1 + c_hi - round(s(q-1))`` above it, so
    ``n_codes = 2^b - 1 - round(s(q-1))`` distinct codes. Input values above 1 clamp to 1.
    """

    name = "twin_uniform_ptq4vit"
    non_negative_input = True

    def __init__(self, bits: int, n_splits: int = 20) -> None:
        super().__init__(bits)
        self.n_splits = int(n_splits)
        self.register_buffer("split", torch.tensor(0.01))  # the code's initial split

    @property
    def _m(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def _hi0(self) -> torch.Tensor:
        return torch.round(self.split * self._m)

    @property
    def n_codes(self) -> int:
        return 2 * self._m + 1 - int(self._hi0)

    def set_split(self, split: float | torch.Tensor) -> None:
        """Set the split ``s`` (in (0, 1]) directly and mark the quantizer calibrated."""
        self.split.fill_(float(split))
        self.initialized.fill_(True)

    def _calibrate(self, x: torch.Tensor) -> None:
        best, best_err = None, None
        for s in split_candidates(self.n_splits):
            self.split.fill_(float(s))
            err = float((self._dequant(self._codes(x, False)) - x).pow(2).mean())
            if best_err is None or err < best_err:  # first wins ties, as torch.argmax
                best, best_err = float(s), err
        self.split.fill_(best)

    def _codes(self, x: torch.Tensor, ste: bool) -> torch.Tensor:
        m, s = self._m, self.split
        c_hi = clamp_ste(rnd(torch.minimum(torch.maximum(x, s), torch.ones_like(x)) * m, ste), 0, m)
        c_lo = clamp_ste(rnd(torch.minimum(x.clamp_min(0), s) / (s / m), ste), 0, m)
        return c_lo + c_hi - self._hi0

    def _dequant(self, codes: torch.Tensor) -> torch.Tensor:
        m, s = self._m, self.split
        lo = codes.clamp(max=m)
        hi = self._hi0 + (codes - m).clamp(min=0)
        return hi / m + lo * (s / m)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, split={float(self.split):.4g}"


class PTQ4ViTGeluQuantizer(Quantizer):
    """PTQ4ViT's post-GELU (fc2 input) quantizer (official code); see the module docstring.

    Codes ``c + q`` with ``c = clamp(round(x/d+), 0, q-1)`` for ``x >= 0`` and
    ``c = clamp(round(x/d-), -q, 0)`` for ``x < 0``: ``2^b`` codes.
    """

    name = "twin_uniform_ptq4vit_gelu"

    def __init__(self, bits: int, alpha: float = 0.01, beta: float = 1.2, n: int = 100) -> None:
        super().__init__(bits)
        self.grid = (float(alpha), float(beta), int(n))
        q = 2 ** (self.bits - 1)
        self.register_buffer("step_pos", torch.tensor(1.0))
        self.register_buffer("step_neg", torch.tensor(GELU_MIN_ABS / q))

    @property
    def _q(self) -> int:
        return 2 ** (self.bits - 1)

    def initial_step(self, x: torch.Tensor) -> torch.Tensor:
        """The code's initial positive step: ``max(x) / (q - 0.5)`` (signed max, not ``|x|``)."""
        return x.max() / (self._q - 0.5)

    def set_step(self, step_pos: float | torch.Tensor) -> None:
        """Set the positive step ``d+`` directly and mark the quantizer calibrated."""
        self.step_pos.fill_(float(step_pos))
        self.initialized.fill_(True)

    def _calibrate(self, x: torch.Tensor) -> None:
        init = self.initial_step(x)
        best, best_err = None, None
        for f in interval_factors(*self.grid):
            self.step_pos.fill_(float(f * init))
            err = float((self._dequant(self._codes(x, False)) - x).pow(2).mean())
            if best_err is None or err < best_err:
                best, best_err = float(self.step_pos), err
        self.step_pos.fill_(best)

    def _codes(self, x: torch.Tensor, ste: bool) -> torch.Tensor:
        q = self._q
        c_pos = clamp_ste(rnd(x / self.step_pos, ste), 0, q - 1)
        c_neg = clamp_ste(rnd(x / self.step_neg, ste), -q, 0)
        return c_pos + c_neg + q

    def _dequant(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes - self._q
        return torch.where(c >= 0, c * self.step_pos, c * self.step_neg)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, step_pos={float(self.step_pos):.4g}, step_neg={float(self.step_neg):.4g}"
