"""Level coverage: how a quantizer's codes, distinct levels and used levels meet real data.

Three counts are kept apart everywhere in isvit_viz:

* **codes**: the integers the quantizer can emit (``n_codes``: ``2^b``, or ``2^b + 1`` where a
  reference implementation adds a flush-to-zero or an extra code);
* **distinct levels**: the distinct values those codes de-quantize to. Fewer than the codes when
  several codes share a value, e.g. SULQ, which rounds the de-quantized exponent to an integer, so
  its distinct levels are bounded by the exponent range, not by ``2^b``;
* **used levels**: the distinct levels that at least one input of the data lands on.

"Collapsed" has one definition: the share of inputs that the quantizer's own output maps onto its
lowest level (``LevelCoverage.frac_collapsed``), computed from ``decode(encode(x))``, never from
where the levels sit. For LQ that lowest level is the clamp value ``s * 2^-(2^b - 1)``; for SULQ it
is ``2^e_min - eta``, negative whenever ``eta > 2^e_min``; for flush-to-zero quantizers it is 0.
"""

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
        codes_per_level: how many codes de-quantize to each level, shape [L] (sums to ``n_codes``).
        n: number of inputs.
        bits: the quantizer's bit-width b.
        n_codes: codes the quantizer can emit (``2^b``, or ``2^b + 1`` for some reference variants).
        distinct_levels: L, the number of distinct representable values (``<= n_codes``).
        used_levels: levels with at least one input (``<= distinct_levels``).
        entropy_bits: entropy of the level histogram in bits (at most ``log2(used_levels)``).
        mse: mean squared quantization error.
        frac_clipped_low / frac_clipped_high: fraction of inputs below the lowest / above the highest level.
        frac_collapsed: fraction of inputs the quantizer maps onto its lowest level (``levels[0]``).
    """

    levels: torch.Tensor
    counts: torch.Tensor
    codes_per_level: torch.Tensor
    n: int
    bits: int
    n_codes: int
    distinct_levels: int
    used_levels: int
    entropy_bits: float
    mse: float
    frac_clipped_low: float
    frac_clipped_high: float
    frac_collapsed: float

    @property
    def fractions(self) -> torch.Tensor:
        """Share of inputs on each level, shape [L] (float64)."""
        return self.counts.double() / max(self.n, 1)

    @property
    def lowest_level(self) -> float:
        """The lowest representable value (can be negative: SULQ with ``eta > 2^e_min``)."""
        return float(self.levels[0])

    @property
    def frac_next(self) -> float:
        """Fraction of inputs on the second-lowest level (0 if there is only one level)."""
        return float(self.fractions[1]) if self.distinct_levels > 1 else 0.0

    def summary(self) -> str:
        return (
            f"{self.n_codes} codes, {self.distinct_levels} distinct levels, {self.used_levels} used; "
            f"entropy {self.entropy_bits:.2f} bits, MSE {self.mse:.3g}; "
            f"lowest level {self.lowest_level:.3g} gets {self.frac_collapsed:.1%}, next {self.frac_next:.1%}"
        )


def _check_per_tensor(quantizer: Quantizer) -> None:
    if getattr(quantizer, "scale", torch.zeros(())).numel() > 1:
        raise ValueError("coverage is defined for per-tensor quantizers; pass one channel's quantizer")


@torch.no_grad()
def coverage(quantizer: Quantizer, x: torch.Tensor) -> LevelCoverage:
    """Measure how the calibrated ``quantizer`` uses its codes and levels on ``x`` (any shape, flattened).

    Per-channel uniform quantizers are not supported here (their levels differ per channel).
    """
    if not isinstance(x, torch.Tensor) or x.numel() == 0:
        raise ValueError("coverage needs a non-empty tensor")
    _check_per_tensor(quantizer)
    xf = x.detach().float().flatten()
    levels = quantizer.levels().float()
    # decode() reproduces levels() bit for bit, so searchsorted finds the exact level index
    xq = quantizer.decode(quantizer.encode(xf))
    idx = torch.searchsorted(levels, xq).clamp_max(len(levels) - 1)
    counts = torch.bincount(idx, minlength=len(levels))
    code_vals = quantizer.decode(torch.arange(quantizer.n_codes, device=levels.device)).float()
    codes_per_level = torch.bincount(torch.searchsorted(levels, code_vals).clamp_max(len(levels) - 1), minlength=len(levels))
    n = xf.numel()
    p = counts.double() / n
    nz = p[p > 0]
    entropy = float(-(nz * torch.log2(nz)).sum()) if nz.numel() else 0.0
    lo, hi = levels[0], levels[-1]
    return LevelCoverage(
        levels=levels,
        counts=counts,
        codes_per_level=codes_per_level,
        n=n,
        bits=quantizer.bits,
        n_codes=quantizer.n_codes,
        distinct_levels=len(levels),
        used_levels=int((counts > 0).sum()),
        entropy_bits=0.0 if math.isnan(entropy) else abs(entropy),
        mse=float((xq - xf).double().pow(2).mean()),
        frac_clipped_low=float((xf < lo).double().mean()),
        frac_clipped_high=float((xf > hi).double().mean()),
        frac_collapsed=float(counts[0]) / n,
    )


@torch.no_grad()
def lowest_level_threshold(quantizer: Quantizer, hi: float = 1.0) -> float:
    """The largest input in ``[0, hi]`` that ``quantizer`` maps onto its lowest level.

    Found from the quantizer's own output: a log-spaced scan, then bisection between the last input
    on the lowest level and the first one above it (post-softmax quantizers are non-decreasing in
    their input). Inputs in ``[0, threshold]`` are exactly the ones counted by ``frac_collapsed``.
    Returns 0.0 if even 0 is mapped above the lowest level, ``hi`` if all of ``[0, hi]`` collapses.
    """
    _check_per_tensor(quantizer)
    lowest = quantizer.levels().float()[0]

    def on_lowest(v: torch.Tensor) -> torch.Tensor:
        return quantizer.decode(quantizer.encode(v.float())) == lowest

    grid = torch.cat([torch.zeros(1), torch.logspace(-30, math.log10(hi), 3001)])
    on = on_lowest(grid)
    if not bool(on[0]):
        return 0.0
    if bool(on.all()):
        return float(hi)
    i = int(torch.nonzero(~on)[0]) - 1  # last grid point still on the lowest level
    a, b = float(grid[i]), float(grid[i + 1])
    for _ in range(60):  # float32 inputs: 60 halvings reach adjacent representable values
        mid = 0.5 * (a + b)
        if mid in (a, b):
            break
        if bool(on_lowest(torch.tensor([mid]))[0]):
            a = mid
        else:
            b = mid
    return a
