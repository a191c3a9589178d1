"""The embedded default models: timm ViT and Swin trained on Fashion-MNIST by scripts/train_embedded.py."""

from __future__ import annotations

from torch import nn

from .._assets import AssetError, asset_path
from ..data.fashion_mnist import EmbeddedSplits
from .embedded_arch import EMBEDDED_ARCH, build_embedded_arch


def disable_fused_attention(model: nn.Module) -> nn.Module:
    """Make timm attention materialise the softmax (needed to capture or quantize it)."""
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    return model


def load_embedded(name: str = "vit") -> tuple[nn.Module, EmbeddedSplits]:
    """Load embedded model ``"vit"`` or ``"swin"`` (fp16 weights -> fp32, eval mode, unfused attention).

    Returns ``(model, splits)`` where ``splits.calib(n, seed)`` / ``splits.test(n)`` are DataLoaders.
    """
    if name not in EMBEDDED_ARCH:
        raise ValueError(f"unknown embedded model {name!r}; valid choices: {sorted(EMBEDDED_ARCH)}")
    path = asset_path(f"embedded_{name}.safetensors")
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged headers/data
        raise AssetError(f"cannot read packaged weights {path}: {e}") from e
    model = build_embedded_arch(name)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise AssetError(f"weights in {path} do not match the {name!r} architecture: {e}") from e
    disable_fused_attention(model).eval()
    model.isvit_build_spec = {"kind": "embedded", "name": name}  # lets save/load rebuild the architecture
    return model, EmbeddedSplits()


__all__ = ["disable_fused_attention", "load_embedded"]
