"""Swap timm ViT/DeiT/Swin layers for quant-aware modules (in place, no global monkeypatching)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.support import HEAD_LINEARS, UnsupportedModelError, check_supported, post_ln_links  # noqa: F401 (re-exported: raised here)
from .base import Quantizer
from .config import PTQ4VIT_TWIN, QuantConfig
from .modules import QuantAttention, QuantConv2d, QuantLinear, QuantMatMul, QuantModule, QuantWindowAttention
from .ptq4vit import PTQ4ViTGeluQuantizer, PTQ4ViTSoftmaxQuantizer
from .registry import make_quantizer
from .twin_uniform import TwinUniformQuantizer
from .uniform import WEIGHT_PERCENTILES, UniformQuantizer

#: Leaf names of the Linears that read a LayerNorm output inside a block (method.md 2.1). Placement uses
#: the exact pairs of :func:`isvit_viz.models.support.post_ln_links`; this constant is informational.
POST_LN_LINEARS = ("qkv", "fc1")


def _timm_attention_classes() -> tuple[type, type]:
    from timm.layers import Attention
    from timm.models.swin_transformer import WindowAttention

    return Attention, WindowAttention


def supported_model(model: nn.Module) -> str:
    """Return ``"vit"`` or ``"swin"`` for supported timm models, else raise ``UnsupportedModelError``.

    The architecture guard (:func:`isvit_viz.models.support.check_supported`): every block, attention,
    norm and layer must be of a kind whose wrapping, reparameterization and reconstruction are
    implemented and tested; the error names the first offending module path and its class.
    """
    return check_supported(model)


def _act_quantizer(cfg: QuantConfig, channel_wise: bool = False, bits: int | None = None) -> UniformQuantizer:
    return UniformQuantizer(bits or cfg.a_bits, channel_axis=-1 if channel_wise else None, init=cfg.act_init)


def _weight_quantizer(cfg: QuantConfig, bits: int | None = None) -> UniformQuantizer:
    axis = 0 if cfg.weight_granularity == "channel" else None
    pcts = WEIGHT_PERCENTILES if cfg.weight_percentiles is None else cfg.weight_percentiles
    return UniformQuantizer(bits or cfg.w_bits, channel_axis=axis, init=cfg.weight_init, percentiles=pcts)


def _matmul_quantizer(cfg: QuantConfig) -> UniformQuantizer:
    """Quantizer of an attention-matmul operand [B, heads, N, d]: per tensor or per head (axis 1)."""
    return UniformQuantizer(cfg.a_bits, channel_axis=1 if cfg.matmul_granularity == "head" else None, init=cfg.act_init)


def softmax_quantizer(cfg: QuantConfig, name: str | None = None) -> Quantizer:
    """A fresh post-softmax quantizer of type ``name`` (default ``cfg.softmax``) at ``cfg.a_bits``;
    ``cfg.softmax_kwargs`` apply when ``name`` is ``cfg.softmax``."""
    name = cfg.softmax if name is None else name
    kw = cfg.softmax_kwargs if name == cfg.softmax else {}
    if name == PTQ4VIT_TWIN:
        return PTQ4ViTSoftmaxQuantizer(cfg.a_bits, **kw)
    if name == "uniform":
        axis = 1 if cfg.matmul_granularity == "head" else None
        return UniformQuantizer(cfg.a_bits, init=cfg.act_init, **{"channel_axis": axis, **kw})
    if name == "twin_uniform":
        return TwinUniformQuantizer(cfg.a_bits, kind="softmax", **kw)
    return make_quantizer(name, cfg.a_bits, **kw)


def patch_merging_links(model: nn.Module) -> list[tuple[str, str]]:
    """``(norm path, reduction path)`` of every timm Swin ``PatchMerging`` (``norm`` then ``reduction``).

    The LayerNorm output feeds only ``reduction``, so a channel-wise quantizer on the reduction input
    folds into the norm exactly as for qkv/fc1 (RepQ-ViT's ``test_quant.py`` does it for every ``norm``
    under ``model.layers``). Works on FP and wrapped models.
    """
    from timm.models.swin_transformer import PatchMerging

    return [(f"{n}.norm", f"{n}.reduction") for n, m in model.named_modules() if type(m) is PatchMerging]


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def quantize_model(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Replace the layers of a timm ViT/DeiT/Swin in place by quant-aware modules; returns ``model``.

    Placement (method.md 2.1): every ``nn.Linear`` (qkv, proj, fc1, fc2, head, Swin reduction) gets a
    weight quantizer and an input quantizer (channel-wise for the Linears that read a block LayerNorm,
    qkv/fc1, when ``cfg.post_ln == "channel"``, and for a Swin PatchMerging reduction when
    ``cfg.reduction_post_ln == "channel"``; ``cfg.post_gelu`` for fc2); the patch-embedding conv gets a
    weight quantizer, and a per-tensor ``cfg.input_bits`` quantizer on the image when that is set; both
    attention matmuls get operand quantizers, with ``cfg.softmax`` on the post-softmax operand. With
    ``cfg.first_last_bits`` the patch-embedding weights and the head's weights and input use that width.
    ``cfg.mlp_act == "relu"`` replaces the GELU of every MLP by a ReLU (APHQ-ViT).
    ``cfg.softmax_layers`` overrides the post-softmax quantizer of single attentions (by module path).
    Quantization starts switched off (see :func:`set_quant_state`), so the model still computes FP.

    Raises:
        UnsupportedModelError: (a ``ValueError``) for unsupported models, naming the module path and class,
            before anything is changed.
        ValueError: if the model is already quantized.
    """
    Attention, WindowAttention = _timm_attention_classes()
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantModule, QuantAttention, QuantWindowAttention)):
            raise ValueError(f"model is already quantized (found {type(mod).__name__} at {name!r})")
    kind = check_supported(model)  # validate everything before changing anything
    post_ln = {lin for _, _, lin in post_ln_links(model)}
    reductions = {lin for _, lin in patch_merging_links(model)}
    edge = cfg.first_last_bits  # None: every layer at w_bits / a_bits

    for name, mod in list(model.named_modules()):
        if isinstance(mod, (Attention, WindowAttention)):
            mm1 = QuantMatMul(_matmul_quantizer(cfg), _matmul_quantizer(cfg))
            mm2 = QuantMatMul(softmax_quantizer(cfg, cfg.softmax_layers.get(name)), _matmul_quantizer(cfg))
            if isinstance(mod, Attention):
                mod.fused_attn = False
                new: nn.Module = QuantAttention(mod, mm1, mm2)
            else:
                new = QuantWindowAttention(mod, mm1, mm2)
            _set_submodule(model, name, new)
    if cfg.mlp_act == "relu":  # APHQ-ViT: every block MLP computes with a ReLU (retrained by the ReluMLP stage)
        for mod in list(model.modules()):
            if isinstance(getattr(mod, "act", None), nn.GELU) and hasattr(mod, "fc1") and hasattr(mod, "fc2"):
                mod.act = nn.ReLU()
    for name, mod in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if isinstance(mod, nn.Linear):
            if name in post_ln:
                aq: Quantizer = _act_quantizer(cfg, channel_wise=cfg.post_ln == "channel")
            elif name in reductions:
                aq = _act_quantizer(cfg, channel_wise=cfg.reduction_post_ln == "channel")
            elif leaf == "fc2" and cfg.post_gelu == "twin_uniform":
                aq = TwinUniformQuantizer(cfg.a_bits, kind="gelu")
            elif leaf == "fc2" and cfg.post_gelu == PTQ4VIT_TWIN:
                aq = PTQ4ViTGeluQuantizer(cfg.a_bits)
            else:
                aq = _act_quantizer(cfg, bits=edge if name in HEAD_LINEARS else None)
            wq = _weight_quantizer(cfg, bits=edge if name in HEAD_LINEARS else None)
            _set_submodule(model, name, QuantLinear(mod, wq, aq))
        elif isinstance(mod, nn.Conv2d):
            iq = None if cfg.input_bits is None else UniformQuantizer(cfg.input_bits, init=cfg.act_init)
            _set_submodule(model, name, QuantConv2d(mod, _weight_quantizer(cfg, bits=edge), iq))
    model.isvit_quant_kind = kind  # type: ignore[attr-defined]
    return model


def quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantModule]]:
    for name, mod in model.named_modules():
        if isinstance(mod, QuantModule):
            yield name, mod


def set_quant_state(model: nn.Module, weight: bool, act: bool) -> None:
    """Switch weight and activation fake-quantization on or off for every quant module."""
    for _, mod in quant_modules(model):
        mod.weight_quant = bool(weight)
        mod.act_quant = bool(act)


@contextmanager
def quant_state(model: nn.Module, weight: bool, act: bool) -> Iterator[None]:
    """Context manager version of :func:`set_quant_state` that restores the previous switches."""
    saved = [(m, m.weight_quant, m.act_quant) for _, m in quant_modules(model)]
    set_quant_state(model, weight, act)
    try:
        yield
    finally:
        for m, w, a in saved:
            m.weight_quant, m.act_quant = w, a


def activation_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """All activation quantizers with their qualified names (``<module>.input_quantizer`` etc.)."""
    for name, mod in quant_modules(model):
        if isinstance(mod, (QuantLinear, QuantConv2d)) and mod.input_quantizer is not None:
            yield f"{name}.input_quantizer", mod.input_quantizer
        elif isinstance(mod, QuantMatMul):
            yield f"{name}.quantizer_a", mod.quantizer_a
            yield f"{name}.quantizer_b", mod.quantizer_b


def weight_quantizers(model: nn.Module) -> Iterator[tuple[str, QuantLinear | QuantConv2d]]:
    for name, mod in quant_modules(model):
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            yield name, mod


@torch.no_grad()
def calibrate_weights(model: nn.Module) -> None:
    """Initialise every weight quantizer on its (current) weight tensor."""
    for _, mod in weight_quantizers(model):
        mod.weight_quantizer.calibrate(mod.weight.detach())


@torch.no_grad()
def calibrate_activations(model: nn.Module, images: torch.Tensor) -> None:
    """Initialise all activation quantizers with one forward pass of ``images`` (official: 64 images).

    Quantizers are calibrated in forward order on their first input, with activation quantization on,
    so each one sees the already-quantized outputs of the layers before it (as the official code).
    Weight quantization keeps its current switch.
    """
    for _, q in activation_quantizers(model):
        q.calibrate_on_next_forward = True
    try:
        with quant_state(model, weight=any(m.weight_quant for _, m in quant_modules(model)), act=True):
            model(images)
    finally:
        for _, q in activation_quantizers(model):
            q.calibrate_on_next_forward = False
