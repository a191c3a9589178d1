"""Architecture guard: which timm models isvit_viz quantizes exactly, and which it refuses.

A model is accepted only when every module it contains is of a kind whose quantized wrapping
(:func:`isvit_viz.quant.wrap.quantize_model`), SOS reparameterization (:mod:`isvit_viz.calib.reparam`)
and reconstruction units (:func:`isvit_viz.calib.reconstruction_units`) are implemented and covered by
``tests/test_model_coverage.py``. Anything else raises :class:`UnsupportedModelError` naming the module
path and its class, before any work. The tested list of timm names is :data:`isvit_viz.models.coverage.COVERAGE`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn


class UnsupportedModelError(ValueError):
    """A model (or one of its modules) that isvit_viz cannot quantize exactly.

    Attributes:
        path: module path inside the model (``""`` for the model itself).
        cls: class name of that module.
        reason: why it is refused.
    """

    def __init__(self, path: str, cls: str, reason: str) -> None:
        self.path, self.cls, self.reason = path, cls, reason
        where = f"at {path!r}" if path else "(the model itself)"
        super().__init__(f"unsupported {cls} {where}: {reason}")


#: Why known timm module kinds are refused (class name -> reason). Classes not listed here and not
#: accepted by the guard are refused with a generic reason.
REFUSED: dict[str, str] = {
    "ResPostBlock": "post-norm block (LayerNorm after attention and MLP): the qkv/fc1 inputs are not LayerNorm outputs, "
    "so SOS has no LayerNorm to fold the channel-wise scales into (folding norm1/norm2 into qkv/fc1 anyway changed the "
    "FP output of a 2-block random-init vit_base_patch16_rpn_224 by 115 % and 122 %, relative max error, two seeds)",
    "ParallelScalingBlock": "one fused in_proj Linear computes qkv and fc1 from a single (RMS)norm: no role-wise quantizer "
    "placement or reparameterization is implemented for it",
    "DiffParallelScalingBlock": "fused qkv+fc1 projection with differential attention: not implemented",
    "DiffAttention": "differential attention (difference of two softmax maps): the post-softmax quantizer assumes one "
    "probability map and the quantized attention does not implement it",
    "AttentionRope": "rotary position embedding applied between qkv and Q@K^T: not implemented in the quantized attention",
    "RmsNorm": "RMSNorm is not covered (and, having no bias, it cannot absorb the reparameterization's zero-point shift)",
    "GluMlp": "gated MLP (two fc1 paths multiplied): post-GELU quantizer placement does not apply",
    "SwiGLU": "gated MLP (two fc1 paths multiplied): post-GELU quantizer placement does not apply",
    "AttentionPoolLatent": "attention-pooling head (global_pool='map'): its cross-attention with a learned query is not wrapped",
    "AttentionPoolPrr": "attention-pooling head (global_pool='prr'): not wrapped",
    "HybridEmbed": "CNN stem (hybrid ResNet-ViT): only the patch-embedding convolution is quantized",
    "PatchDropout": "patch dropout (patch_drop_rate > 0) is a training-only token sampler: not covered",
    "VisionTransformerRelPos": "relative-position MLP bias inside every attention: not implemented in the quantized attention",
    "Eva": "EVA / EVA-02 / RoPE ViTs: rotary position embeddings inside attention, separate q/v biases and (EVA-02) "
    "SwiGLU MLPs: not implemented",
    "Beit": "BEiT attention adds a relative-position bias and builds the qkv bias from separate q/v biases with "
    "F.linear on the raw weight, bypassing a wrapped Linear",
    "Cait": "CaiT: talking-heads attention (Linears mixing heads before and after the softmax) and class-attention "
    "blocks: not implemented",
    "SwinTransformerV2": "Swin V2: cosine attention with a learned logit scale, continuous position-bias MLP and "
    "post-norm blocks (LayerNorm after attention, so nothing to fold into qkv/fc1)",
    "SwinTransformerV2Cr": "Swin V2 (CR): cosine attention and post-norm blocks (LayerNorm after attention, so nothing "
    "to fold into qkv/fc1)",
}

_GENERIC = (
    "no quantized wrapping, reparameterization and reconstruction are implemented and tested for this module kind; "
    "isvit_viz quantizes timm VisionTransformer (ViT/DeiT/DeiT-III), VisionTransformerDistilled and SwinTransformer "
    "models built from pre-norm blocks (see the README section 'Supported models')"
)

#: Linear layers outside blocks that are their own reconstruction units (method.md 2.2); used by
#: :func:`isvit_viz.calib.reconstruction_units` together with :func:`block_types`.
HEAD_LINEARS = ("head", "head.fc", "head_dist")


# ----------------------------------------------------------------------------------------------- classes


@functools.cache
def _timm() -> dict[str, Any]:
    import timm.layers as L
    from timm.layers import activations as A
    from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool, SelectAdaptivePool2d
    from timm.layers.classifier import ClassifierHead
    from timm.models import deit
    from timm.models import swin_transformer as sw
    from timm.models import vision_transformer as vt

    return {
        "models": (vt.VisionTransformer, deit.VisionTransformerDistilled, sw.SwinTransformer),
        "vit_models": (vt.VisionTransformer, deit.VisionTransformerDistilled),
        "Block": vt.Block,
        "ParallelThingsBlock": vt.ParallelThingsBlock,
        "SwinTransformerBlock": sw.SwinTransformerBlock,
        "Attention": L.Attention,
        "WindowAttention": sw.WindowAttention,
        "Mlp": L.Mlp,
        "PatchEmbed": L.PatchEmbed,
        "PatchMerging": sw.PatchMerging,
        "norms": (nn.LayerNorm, L.LayerNorm),
        "acts": (nn.GELU, A.GELU, A.GELUTanh, A.QuickGELU),
        # Modules that compute nothing our wrapping could get wrong: containers, dropouts (identity in
        # eval), layer scale (an FP per-channel product outside every quantized tensor), pooling.
        "passive": (
            nn.Sequential,
            nn.ModuleList,
            nn.Identity,
            nn.Dropout,
            nn.Flatten,
            nn.Softmax,
            L.DropPath,
            L.LayerScale,
            ClassifierHead,
            SelectAdaptivePool2d,
            FastAdaptiveAvgPool,
            sw.SwinTransformerStage,
        ),
    }


def block_types() -> tuple[type, ...]:
    """Transformer block classes that are reconstruction units (exact classes, no subclasses)."""
    t = _timm()
    return (t["Block"], t["ParallelThingsBlock"], t["SwinTransformerBlock"])


def block_post_ln_links(block: nn.Module) -> list[tuple[str, str]]:
    """``(norm path, linear path)`` inside ``block`` for each LayerNorm whose output feeds only that Linear.

    These are the SOS pairs (method.md 2.4): pre-norm ``Block`` / ``SwinTransformerBlock``:
    ``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1``; ``ParallelThingsBlock``: the same for every branch.
    """
    t = _timm()
    if type(block) in (t["Block"], t["SwinTransformerBlock"]):
        return [("norm1", "attn.qkv"), ("norm2", "mlp.fc1")]
    if type(block) is t["ParallelThingsBlock"]:
        links = [(f"attns.{i}.norm", f"attns.{i}.attn.qkv") for i in range(len(block.attns))]
        return links + [(f"ffns.{i}.norm", f"ffns.{i}.mlp.fc1") for i in range(len(block.ffns))]
    return []


def post_ln_links(model: nn.Module) -> list[tuple[str, str, str]]:
    """``(block path, norm path, linear path)`` (full paths) for every SOS pair of ``model``."""
    out = []
    for name, mod in model.named_modules():
        for ln, lin in block_post_ln_links(mod):
            out.append((name, f"{name}.{ln}" if name else ln, f"{name}.{lin}" if name else lin))
    return out


# ----------------------------------------------------------------------------------------------- the guard


def _refuse(path: str, mod: nn.Module, reason: str | None = None) -> UnsupportedModelError:
    cls = type(mod).__name__
    return UnsupportedModelError(path, cls, reason or REFUSED.get(cls, _GENERIC))


def _child(path: str, leaf: str) -> str:
    return f"{path}.{leaf}" if path else leaf


def _check_foldable_norm(path: str, ln: nn.Module) -> None:
    t = _timm()
    if type(ln) not in t["norms"]:
        raise _refuse(path, ln, REFUSED.get(type(ln).__name__, "only LayerNorm can precede qkv/fc1 (reparameterization)"))
    if ln.weight is None or ln.bias is None:
        raise _refuse(path, ln, "a LayerNorm before qkv/fc1 needs an affine weight and bias to absorb the reparameterization")


def _check_block(path: str, block: nn.Module) -> None:
    t = _timm()
    if type(block) is t["ParallelThingsBlock"]:
        for kind, branches, inner, want in (
            ("attns", block.attns, "attn", t["Attention"]),
            ("ffns", block.ffns, "mlp", t["Mlp"]),
        ):
            for i, seq in enumerate(branches):
                if type(seq) is not nn.Sequential or list(seq._modules) != ["norm", inner, "ls", "drop_path"]:
                    raise _refuse(_child(path, f"{kind}.{i}"), seq, "unexpected parallel branch layout")
                if type(seq[1]) is not want:
                    raise _refuse(_child(path, f"{kind}.{i}.{inner}"), seq[1])
    else:
        want_attn = t["WindowAttention"] if type(block) is t["SwinTransformerBlock"] else t["Attention"]
        if type(block.attn) is not want_attn:
            raise _refuse(_child(path, "attn"), block.attn)
        if type(block.mlp) is not t["Mlp"]:
            raise _refuse(_child(path, "mlp"), block.mlp)
    for ln, lin in block_post_ln_links(block):
        _check_foldable_norm(_child(path, ln), block.get_submodule(ln))
        if type(block.get_submodule(lin)) is not nn.Linear:
            raise _refuse(_child(path, lin), block.get_submodule(lin), "expected an nn.Linear after the LayerNorm")
    if type(block) is t["SwinTransformerBlock"]:
        res, win = tuple(block.input_resolution), tuple(block.window_size)
        if any(r % w for r, w in zip(res, win)):
            raise _refuse(
                path,
                block,
                f"feature map {res} is not a multiple of the window {win}: timm zero-pads after norm1, and the padded "
                "tokens no longer equal the folded LayerNorm's output, so the reparameterization would change the "
                "FP output (use the model's native input size)",
            )


def _check_attention(path: str, attn: nn.Module) -> None:
    if getattr(attn, "gate", None) is not None:
        raise _refuse(
            path, attn, "gated attention: the gate Linear also reads norm1's output, which the reparameterization changes"
        )


def _check_mlp(path: str, mlp: nn.Module) -> None:
    t = _timm()
    if type(mlp.act) not in t["acts"]:
        raise _refuse(_child(path, "act"), mlp.act, "the MLP activation must be GELU (exact, tanh or quick)")
    for leaf in ("fc1", "fc2"):
        if type(getattr(mlp, leaf)) is not nn.Linear:
            raise _refuse(_child(path, leaf), getattr(mlp, leaf), "the MLP must use nn.Linear layers")


def _check_linear(path: str, lin: nn.Module, parent: nn.Module) -> None:
    t = _timm()
    leaf = path.rpartition(".")[2]
    roles = {t["Attention"]: ("qkv", "proj"), t["WindowAttention"]: ("qkv", "proj"), t["Mlp"]: ("fc1", "fc2")}
    ok = leaf in roles.get(type(parent), ()) or (type(parent) is t["PatchMerging"] and leaf == "reduction")
    if not (ok or path in HEAD_LINEARS):
        raise _refuse(path, lin, "a Linear outside the attention, MLP, patch merging and classifier head has no quantizer role")


def _check_conv(path: str, conv: nn.Module) -> None:
    if path != "patch_embed.proj":
        raise _refuse(path, conv, "only the patch-embedding convolution is quantized")
    if conv.padding_mode != "zeros" or conv.groups != 1:
        raise _refuse(path, conv, "the patch-embedding convolution must use zero padding and groups=1")


def check_supported(model: nn.Module) -> str:
    """Raise :class:`UnsupportedModelError` unless every module of ``model`` is of a supported kind.

    Returns ``"vit"`` (timm ``VisionTransformer`` / ``VisionTransformerDistilled``) or ``"swin"``
    (``SwinTransformer``). Runs on the FP model and changes nothing; cost: one walk over the modules.
    """
    t = _timm()
    if type(model) not in t["models"]:
        raise _refuse("", model)
    kind = "vit" if type(model) in t["vit_models"] else "swin"
    if getattr(model, "attn_pool", None) is not None:
        raise _refuse("attn_pool", model.attn_pool)
    checks: dict[type, Callable[[str, nn.Module], None] | None] = {
        t["Block"]: _check_block,
        t["ParallelThingsBlock"]: _check_block,
        t["SwinTransformerBlock"]: _check_block,
        t["Attention"]: _check_attention,
        t["WindowAttention"]: None,
        t["Mlp"]: _check_mlp,
        t["PatchEmbed"]: None,
        t["PatchMerging"]: None,
        nn.Conv2d: _check_conv,
        **{c: None for c in (*t["norms"], *t["acts"], *t["passive"])},
    }
    mods = dict(model.named_modules())
    for path, mod in mods.items():
        if not path:
            continue
        cls = type(mod)
        if cls is nn.Linear:
            _check_linear(path, mod, mods[path.rpartition(".")[0]])
            continue
        if cls not in checks:
            raise _refuse(path, mod)
        check = checks[cls]
        if check is not None:
            check(path, mod)
    return kind


__all__ = [
    "HEAD_LINEARS",
    "REFUSED",
    "UnsupportedModelError",
    "block_post_ln_links",
    "block_types",
    "check_supported",
    "post_ln_links",
]
