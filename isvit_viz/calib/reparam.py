"""SOS stage 2: fold channel-wise post-LayerNorm activation scales into LayerNorm and the next Linear.

For the channel-wise quantizer (s, z) in R^D of the input of ``next`` (qkv or fc1), with
``s~ = mean(s)``, ``z~ = mean(z)`` (rounded to an integer unless ``round_zero_point=False``),
``r1 = s / s~`` and ``r2 = z - z~`` (method.md 2.4, paper Eq. 15-16):

* LayerNorm: ``gamma <- gamma / r1``, ``beta <- (beta + s * r2) / r1``;
* next Linear: ``b <- b - W (s * r2)``, then ``W[:, j] <- r1[j] W[:, j]``;
* the quantizer becomes per-tensor ``(s~, z~)``.

In floating point the block computes the same function. With an integer ``z~`` the quantized codes
are also unchanged: ``round(x~/s~) + z~ = round(x/s_c) + z_c`` exactly when ``z_c - z~`` is an
integer, so the transition is lossless in the quantized domain too. The official code keeps the
fractional mean (``round_zero_point=False``), which shifts the rounding grid of most channels.

RepQ-ViT (``test_quant.py`` lines 95-143) also folds Swin PatchMerging ``norm -> reduction`` when the
reduction input is channel-wise (``QuantConfig.reduction_post_ln="channel"``); :func:`reparameterize`
does so for every channel-wise one. :func:`repq_vit_calibrate` runs RepQ-ViT's whole calibration.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..models.support import post_ln_links
from ..quant.modules import QuantLinear
from ..quant.uniform import UniformQuantizer
from ..quant.wrap import calibrate_activations, calibrate_weights, patch_merging_links, set_quant_state


def post_ln_pairs(model: nn.Module) -> Iterator[tuple[str, nn.LayerNorm, QuantLinear]]:
    """(block name, LayerNorm, following QuantLinear) for every SOS pair of a wrapped model.

    The pairs come from the architecture guard (:func:`isvit_viz.models.support.post_ln_links`):
    ``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1`` of pre-norm blocks (and of every branch of a
    parallel block), where the LayerNorm output feeds only that Linear, so folding is exact.
    """
    for block, ln_path, lin_path in post_ln_links(model):
        ln, nxt = model.get_submodule(ln_path), model.get_submodule(lin_path)
        if isinstance(ln, nn.LayerNorm) and isinstance(nxt, QuantLinear):
            yield block, ln, nxt


def patch_merging_pairs(model: nn.Module) -> Iterator[tuple[str, nn.LayerNorm, QuantLinear]]:
    """(PatchMerging name, its ``norm``, its ``reduction`` QuantLinear) for every Swin patch merging."""
    for ln_path, lin_path in patch_merging_links(model):
        ln, nxt = model.get_submodule(ln_path), model.get_submodule(lin_path)
        if isinstance(ln, nn.LayerNorm) and isinstance(nxt, QuantLinear):
            yield ln_path.rpartition(".")[0], ln, nxt


def _is_channel_wise(q: object) -> bool:
    return isinstance(q, UniformQuantizer) and q.is_calibrated and q.scale.numel() > 1


@torch.no_grad()
def fold_channel_scales(ln: nn.LayerNorm, linear: QuantLinear, round_zero_point: bool = True) -> None:
    """Reparameterize one (LayerNorm, Linear) pair in place; see the module docstring."""
    q = linear.input_quantizer
    if not isinstance(q, UniformQuantizer) or not q.is_calibrated:
        raise ValueError("the Linear's input quantizer must be a calibrated UniformQuantizer")
    if q.scale.numel() == 1:
        return  # already layer-wise
    if ln.weight is None or ln.bias is None:
        raise ValueError("reparameterization needs a LayerNorm with affine weight and bias")
    s, z = q.scale.flatten().double(), q.zero_point.flatten().double()
    s_t = s.mean()
    z_t = z.mean().round() if round_zero_point else z.mean()
    r1, r2 = s / s_t, z - z_t
    w = linear.weight.double()
    shift = w @ (s * r2)
    if linear.bias is None:
        # A bias-free Linear (qkv_bias=False) needs one for the shift; QuantLinear recreates it when a
        # state dict that carries it is loaded, so save/load and resume round-trip bit-identically.
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device))
    linear.bias.copy_((linear.bias.double() - shift).to(linear.bias.dtype))
    linear.weight.copy_((w * r1[None, :]).to(linear.weight.dtype))
    ln.bias.copy_(((ln.bias.double() + s * r2) / r1).to(ln.bias.dtype))
    ln.weight.copy_((ln.weight.double() / r1).to(ln.weight.dtype))
    q.set_params(s_t.float(), z_t.float(), channel_axis=None)


def reparameterize(model: nn.Module, round_zero_point: bool = True) -> int:
    """Fold every channel-wise post-LN quantizer of ``model`` (SOS stage 2 / RepQ-ViT).

    Returns the number of pairs handled: every block pair (``post_ln_pairs``; layer-wise ones are left
    as they are but counted) plus every PatchMerging pair whose reduction input is channel-wise.
    """
    n = 0
    for _, ln, nxt in list(post_ln_pairs(model)):
        fold_channel_scales(ln, nxt, round_zero_point)
        n += 1
    for _, ln, nxt in list(patch_merging_pairs(model)):
        if _is_channel_wise(nxt.input_quantizer):
            fold_channel_scales(ln, nxt, round_zero_point)
            n += 1
    return n


@torch.no_grad()
def repq_vit_calibrate(model: nn.Module, images: torch.Tensor, round_zero_point: bool = False) -> int:
    """RepQ-ViT's calibration (``test_quant.py`` lines 89-148) of a wrapped model, in place.

    RepQ-ViT initialises every quantizer lazily in one forward pass with weight and activation
    quantization on: each Linear calibrates its input quantizer and then its weight quantizer, so every
    activation quantizer sees the outputs of fully quantized earlier layers (quantized weights and
    activations). Weight initialisation does not depend on data, so this equals: all weights first,
    then one activation pass with everything quantized. Then it reparameterizes (fractional mean
    zero-point) and re-initialises only the weight quantizers of the folded Linears (``inited = False``)
    in a second pass; activation quantizers keep their parameters. Re-calibrating every weight here
    gives the same result (the other weights are unchanged and their search is deterministic).

    Args:
        model: wrapped with RepQ-ViT's placement (``QuantConfig`` with ``post_ln="channel"``,
            ``reduction_post_ln="channel"``, ``input_bits=8``, ``softmax="logsqrt2"`` with
            ``softmax_kwargs={"include_max": False}``, ``weight_percentiles=ACT_PERCENTILES``).
        images: calibration batch [N, C, H, W] (RepQ-ViT: one batch of 32 training images).
        round_zero_point: RepQ-ViT keeps the fractional mean zero-point (``False``).

    Returns:
        the number of folded pairs (:func:`reparameterize`). Leaves weight and activation quantization on.
    """
    calibrate_weights(model)
    set_quant_state(model, weight=True, act=True)
    calibrate_activations(model, images)
    n = reparameterize(model, round_zero_point=round_zero_point)
    calibrate_weights(model)
    return n
