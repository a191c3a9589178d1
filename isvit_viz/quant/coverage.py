"""Level coverage: how a quantizer's representable levels are used by real data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Quantizer


@dataclass(frozen=True)
class LevelCoverage:
    """Occupancy of a per-tensor quantizer's levels on data ``x``.

    Attributes:
        levels: sorted distinct representable values, shape [L].
        counts: number of inputs quantized onto each level, shape [L] (sums to ``n``).
        n: number of inputs.
        used_levels: levels with at least one input.
        distinct_levels: L, the number of distinct representable values (``<= n_codes``).
        n_codes: codes the quantizer spends (``2^b``, or ``2^b + 1`` for some reference variants).
        entropy_bits: entropy of the level histogram in bits (at most ``log2(L)``).
        mse: mean squared quantization error.
        frac_clipped_low / frac_clipped_high: fraction of inputs below the lowest / above the highest level.
        frac_collapsed: fraction of inputs that land on a boundary level (lowest or highest): for
            log2 quantizers this is the near-zero mass that "collapses" onto the clamp value.
    """

    levels: torch.Tensor
    counts: torch.Tensor
    n: int
    used_levels: int
    distinct_levels: int
    n_codes: int
    entropy_bits: float
    mse: float
    frac_clipped_low: float
    frac_clipped_high: float
    frac_collapsed: float

    @property
    def fractions(self) -> torch.Tensor:
        """Share of inputs on each level, shape [L]."""
        return self.counts.double() / max(self.n, 1)

    def summary(self) -> str:
        return (
            f"used {self.used_levels}/{self.distinct_levels} levels ({self.n_codes} codes), "
            f"entropy {self.entropy_bits:.2f} bits, MSE {self.mse:.3g}, "
            f"clipped low {self.frac_clipped_low:.1%} / high {self.frac_clipped_high:.1%}, "
            f"on boundary {self.frac_collapsed:.1%}"
        )


@torch.no_grad()
def coverage(quantizer: Quantizer, x: torch.Tensor) -> LevelCoverage:
    """Measure how the calibrated ``quantizer`` uses its levels on ``x`` (any shape, flattened).

    Per-channel uniform quantizers are not supported here (their levels differ per channel).
    """
    if not isinstance(x, torch.Tensor) or x.numel() == 0:
        raise ValueError("coverage needs a non-empty tensor")
    if getattr(quantizer, "scale", torch.zeros(())).numel() > 1:
        raise ValueError("coverage is defined for per-tensor quantizers; pass one channel's quantizer")
    xf = x.detach().float().flatten()
    levels = quantizer.levels().float()
    xq = quantizer.decode(quantizer.encode(xf))
    idx = torch.searchsorted(levels, xq).clamp_max(len(levels) - 1)
    # decode() reproduces levels() bit for bit, so searchsorted finds the exact level index
    counts = torch.bincount(idx, minlength=len(levels))
    n = xf.numel()
    p = counts.double() / n
    nz = p[p > 0]
    entropy = float(-(nz * torch.log2(nz)).sum()) if nz.numel() else 0.0
    lo, hi = levels[0], levels[-1]
    return LevelCoverage(
        levels=levels,
        counts=counts,
        n=n,
        used_levels=int((counts > 0).sum()),
        distinct_levels=len(levels),
        n_codes=quantizer.n_codes,
        entropy_bits=0.0 if math.isnan(entropy) else entropy,
        mse=float((xq - xf).pow(2).mean()),
        frac_clipped_low=float((xf < lo).double().mean()),
        frac_clipped_high=float((xf > hi).double().mean()),
        frac_collapsed=float(((xq == lo) | (xq == hi)).double().mean()),
    )
