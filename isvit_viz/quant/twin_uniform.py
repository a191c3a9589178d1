"""PTQ4ViT's twin-uniform quantizer for post-softmax and post-GELU activations."""

from __future__ import annotations

import torch

from .base import Quantizer
from .ste import clamp_ste, rnd


class TwinUniformQuantizer(Quantizer):
    """Two (b-1)-bit uniform ranges whose steps differ by a power of two (Yuan et al., PTQ4ViT).

    ``kind="softmax"``: R2 covers [0, 1] with step ``d2 = 1/2^(b-1)``; R1 covers small values with step
    ``d1 = d2 / 2^m``. A value is coded in R1 when its R1 code fits, else in R2.
    ``kind="gelu"``: R1 codes negative values (step ``d1``), R2 non-negative ones (step ``d2``),
    ``d1 = d2 / 2^m``.
    Codes ``0 .. 2^(b-1)-1`` are R1, ``2^(b-1) .. 2^b - 1`` are R2. PTQ4ViT picks the steps with a
    Hessian-guided metric; without task gradients we use MSE on the calibration data.
    """

    name = "twin_uniform"

    def __init__(self, bits: int, kind: str = "softmax", max_shift: int = 12) -> None:
        super().__init__(bits)
        if kind not in ("softmax", "gelu"):
            raise ValueError(f"kind must be 'softmax' or 'gelu', got {kind!r}")
        self.kind = kind
        self.non_negative_input = kind == "softmax"
        self.max_shift = int(max_shift)
        self.register_buffer("step1", torch.tensor(1.0))
        self.register_buffer("step2", torch.tensor(1.0))

    @property
    def half(self) -> int:
        return 2 ** (self.bits - 1)

    def _calibrate(self, x: torch.Tensor) -> None:
        h = self.half
        if self.kind == "softmax":
            d2_cands = [1.0 / h]
        else:
            pos = x[x >= 0]
            top = float(pos.max()) if pos.numel() else 1.0
            d2_cands = [max(top * p, 1e-8) / (h - 1) for p in (1.0, 0.9999, 0.999, 0.99)]
        best, best_err = None, None
        for d2 in d2_cands:
            for m in range(self.max_shift + 1):
                self.step2.fill_(d2)
                self.step1.fill_(d2 / 2**m)
                err = float((self._dequant(self._codes(x, False)) - x).pow(2).mean())
                if best_err is None or err < best_err:
                    best, best_err = (d2, d2 / 2**m), err
        self.step2.fill_(best[0])
        self.step1.fill_(best[1])

    def _codes(self, x: torch.Tensor, ste: bool) -> torch.Tensor:
        h = self.half
        if self.kind == "softmax":
            c1 = rnd(x / self.step1, ste)
            in_r1 = c1.detach() <= h - 1
            c1 = clamp_ste(c1, 0, h - 1)
        else:
            c1 = clamp_ste(rnd(-x / self.step1, ste), 0, h - 1)
            in_r1 = x.detach() < 0
        c2 = clamp_ste(rnd(x / self.step2, ste), 0, h - 1)
        return torch.where(in_r1, c1, c2 + h)

    def _dequant(self, codes: torch.Tensor) -> torch.Tensor:
        h = self.half
        sign = 1.0 if self.kind == "softmax" else -1.0
        return torch.where(codes < h, sign * codes * self.step1, (codes - h) * self.step2)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, kind={self.kind!r}, step1={float(self.step1):.3g}, step2={float(self.step2):.3g}"
