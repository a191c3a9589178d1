"""The straight-through gradient rule of every fake quantizer, in one place.

Fake quantization is ``x_hat = dequant(clamp(round(f(x)), lo, hi))``. Its true derivative is zero almost
everywhere, so reconstruction trains through it with a straight-through estimator (STE):

* **round** passes the gradient unchanged: ``round_ste(v) = v + (round(v) - v).detach()``, the
  official code's ``round_ste``.
* **clamp** passes the gradient where the rounded code lies inside the range, **both edges
  included** (``lo <= code <= hi``), and zero outside.

So for the uniform quantizer ``d x_hat / d x = 1`` when ``0 <= round(x/s) + z <= 2^b - 1`` (that is,
``x/s + z`` in about ``[-0.5, 2^b - 0.5]``) and ``0`` otherwise; log-domain quantizers multiply that by
the chain rule of their transform (SULQ: ``(x_hat + eta) / (x + eta)``, log2: ``x_hat / x``).

Why inclusive edges: the official I&S-ViT code (built on RepQ-ViT's, timm 0.4.12, PyTorch 1.x era)
calls ``torch.clamp(round_ste(x / s) + z, 0, n_levels - 1)``. From PyTorch 0.4.1 (pytorch#7049) its
backward was ``grad * (min <= x <= max)``, "subgradient 1 at min and max"; recent releases switched
scalar-bound clamp to strict inequalities (zero gradient at the bounds, pytorch#184574) and tensor
bounds to a split gradient. Codes sit exactly on a bound whenever the input rounds to the first or last
level, so the choice matters. :func:`clamp_ste` states the rule with an explicit mask and never relies
on ``torch.clamp``'s backward, so results do not depend on the installed PyTorch.

Quantizer parameters (scales, zero-points, SULQ's eta/minv/maxv, log bases) are buffers: no gradient
flows to them, as in the official code, which freezes them during reconstruction. The one exception is
opt-in: ``ReconConfig.act_scale_lr`` (QDrop/BRECQ) turns uniform activation step sizes into parameters
for the duration of a reconstruction (LSQ gradient, :meth:`UniformQuantizer.learn_scale`).
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (identity backward).

    ``x + (round(x) - x).detach()`` is exactly ``round(x)`` in floating point: ``round(x) - x`` is the
    fractional part, which is always representable. Without autograd this is plain ``torch.round``
    (one pass instead of three: the evaluation forward of a fake-quantized model rounds a lot).
    """
    if not (x.requires_grad and torch.is_grad_enabled()):
        return torch.round(x)
    return x + (torch.round(x) - x).detach()


def rnd(x: torch.Tensor, ste: bool) -> torch.Tensor:
    """Round to nearest, straight-through when ``ste``."""
    return round_ste(x) if ste else torch.round(x)


def clamp_ste(x: torch.Tensor, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """``torch.clamp(x, lo, hi)`` whose gradient is 1 where ``lo <= x <= hi`` (edges included), else 0.

    Values are bit-identical to ``torch.clamp``; ``None`` leaves that side open. Without autograd this
    is plain ``torch.clamp``.
    """
    out = torch.clamp(x.detach() if x.requires_grad else x, lo, hi)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return out
    inside = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:
        inside &= x >= lo
    if hi is not None:
        inside &= x <= hi
    return torch.where(inside, x, out)
