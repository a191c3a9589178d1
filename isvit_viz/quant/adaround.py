"""AdaRound: learned up/down rounding of quantized weights (Nagel et al., ICML 2020).

Our reading of the authors' code used by BRECQ (``yhhhli/BRECQ`` ``quant/adaptive_rounding.py``,
``quant/block_recon.py``) and QDrop (``wimh966/QDrop`` ``qdrop/quantization/fake_quant.py``,
``qdrop/solver/recon.py``):

* soft weight ``W~ = s * (clamp(floor(W/s) + h(alpha) + z, 0, 2^b - 1) - z)`` with the rectified
  sigmoid ``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``,
  ``gamma = -0.1``; the weight and the quantizer's scale / zero-point stay fixed, only ``alpha`` learns;
* ``alpha`` starts where ``h(alpha)`` equals the fractional part of ``W/s`` (``W~ = W`` inside the range);
* regulariser ``sum(1 - |2 h(alpha) - 1| ** beta)``, weight 0.01, off for the first 20 % of the
  iterations, ``beta`` decaying linearly from 20 to 2 over the rest (:func:`beta_at`);
* at the end, hard decisions ``floor(W/s) + (alpha >= 0)``, baked into the weight
  (:func:`harden_adaround`) so the layer is again a plain round-to-nearest quantized layer.

The clamp passes gradients by the rule of :mod:`isvit_viz.quant.ste` (edges included).
"""

from __future__ import annotations

import torch
from torch import nn

from .ste import clamp_ste
from .uniform import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``, in [0, 1]."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def alpha_for(rest: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rectified_sigmoid` on [0, 1): the ``alpha`` with ``h(alpha) = rest``.

    Computed in float64 and returned in float32, so ``h(alpha)`` matches ``rest`` to float32 rounding.
    """
    r = rest.double()
    return (-torch.log((ZETA - GAMMA) / (r - GAMMA) - 1)).float()


def round_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2h - 1| ** beta)``: 0 when every ``h`` is 0 or 1, largest at ``h = 0.5``."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def beta_at(count: int, iters: int, warmup: float = 0.2, b_range: tuple[float, float] = (20.0, 2.0)) -> float | None:
    """Annealed exponent at 1-based step ``count`` of ``iters``; ``None`` during the warm-up.

    As the authors' ``LinearTempDecay``: with ``t0 = warmup * iters``, no regulariser while
    ``count < t0``, then ``beta = b_end + (b_start - b_end) * max(0, 1 - (count - t0) / (iters - t0))``
    (``b_start`` at ``t0``, ``b_end`` at the last step).
    """
    start = warmup * iters
    if count < start:
        return None
    b0, b1 = b_range
    if iters <= start:
        return float(b1)
    rel = (count - start) / (iters - start)
    return float(b1 + (b0 - b1) * max(0.0, 1.0 - rel))


class AdaRound(nn.Module):
    """The learnable rounding of one weight tensor, attached to a layer as ``layer.adaround``.

    Args:
        weight: the layer's weight (shape of ``alpha``), left untouched.
        quantizer: its calibrated :class:`UniformQuantizer` (per tensor or per output channel) with an
            integer zero-point, whose scale / zero-point stay fixed.
    """

    def __init__(self, weight: torch.Tensor, quantizer: UniformQuantizer) -> None:
        super().__init__()
        check_quantizer(quantizer)
        with torch.no_grad():
            v = weight.detach().float() / quantizer.scale
            self.alpha = nn.Parameter(alpha_for(v - torch.floor(v)).to(weight.device))

    def h(self) -> torch.Tensor:
        """Soft rounding decisions in [0, 1], shape of the weight."""
        return rectified_sigmoid(self.alpha)

    def hard(self) -> torch.Tensor:
        """Hard decisions (1.0 = round up), ``alpha >= 0``."""
        return (self.alpha >= 0).to(self.alpha.dtype)

    def forward(self, weight: torch.Tensor, quantizer: UniformQuantizer, hard: bool = False) -> torch.Tensor:
        """Soft (or, with ``hard``, final) de-quantized weight."""
        s, z = quantizer.scale, quantizer.zero_point
        up = self.hard() if hard else self.h()
        code = clamp_ste(torch.floor(weight.detach() / s) + up + z, 0, quantizer.qmax)
        return ((code - z) * s).to(weight.dtype)


def check_quantizer(quantizer: object) -> None:
    """AdaRound needs a calibrated uniform weight quantizer with integer zero-points."""
    if not isinstance(quantizer, UniformQuantizer):
        raise ValueError(f"AdaRound needs a UniformQuantizer weight quantizer, got {type(quantizer).__name__}")
    if not quantizer.is_calibrated:
        raise ValueError("AdaRound needs a calibrated weight quantizer (run calibrate_weights first)")
    if not quantizer.has_integer_zero_point:
        raise ValueError("AdaRound needs an integer weight zero-point (the hard rounding is baked into the weight)")


def adaround_layers(unit: nn.Module) -> list[nn.Module]:
    """The unit's ``QuantLinear`` / ``QuantConv2d`` layers whose weights are quantized."""
    from .modules import QuantConv2d, QuantLinear

    return [m for m in unit.modules() if isinstance(m, (QuantLinear, QuantConv2d)) and m.weight_quant]


def attach_adaround(unit: nn.Module) -> list[AdaRound]:
    """Give every weight-quantized layer of ``unit`` an :class:`AdaRound` (``layer.adaround``).

    Returns the new modules (their ``alpha`` are the parameters to learn). While attached, the layer's
    forward uses the soft-rounded weight.
    """
    out = []
    for layer in adaround_layers(unit):
        if "adaround" in layer._modules:
            raise ValueError("layer already has an AdaRound attached")
        layer.adaround = AdaRound(layer.weight, layer.weight_quantizer)
        out.append(layer.adaround)
    return out


@torch.no_grad()
def harden_adaround(unit: nn.Module) -> int:
    """Bake the hard decisions into the weights and detach AdaRound; returns the number of layers.

    The weight becomes ``s * (clamp(floor(W/s) + (alpha >= 0) + z, 0, 2^b - 1) - z)``, a value on the
    quantizer's grid, so the plain round-to-nearest quantizer reproduces it bit for bit afterwards
    (``W/s`` is then within float error of an integer).
    """
    n = 0
    for layer in adaround_layers(unit):
        ada = layer._modules.get("adaround")
        if ada is None:
            continue
        layer.weight.copy_(ada(layer.weight, layer.weight_quantizer, hard=True))
        del layer.adaround
        n += 1
    return n


def detach_adaround(unit: nn.Module) -> None:
    """Remove AdaRound from every layer of ``unit`` without changing the weights."""
    for layer in unit.modules():
        if "adaround" in getattr(layer, "_modules", {}):
            del layer.adaround
