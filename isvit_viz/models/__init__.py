"""Model factory: the embedded Fashion-MNIST models and the paper's timm ViT/DeiT/Swin models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .embedded import disable_fused_attention, load_embedded
from .embedded_arch import EMBEDDED_ARCH, build_embedded_arch

#: The seven models of the paper's Table 1, with their FP top-1 (%) as reported there.
PAPER_MODELS: dict[str, float] = {
    "vit_small_patch16_224": 81.39,
    "vit_base_patch16_224": 84.54,
    "deit_tiny_patch16_224": 72.21,
    "deit_small_patch16_224": 79.85,
    "deit_base_patch16_224": 81.80,
    "swin_small_patch4_window7_224": 83.23,
    "swin_base_patch4_window7_224": 85.27,
}
#: Further timm models the official code accepts (no paper numbers).
EXTRA_MODELS = ("vit_tiny_patch16_224", "swin_tiny_patch4_window7_224")
EMBEDDED_MODELS = tuple(f"embedded-{k}" for k in EMBEDDED_ARCH)


def available_models() -> list[str]:
    return [*EMBEDDED_MODELS, *PAPER_MODELS, *EXTRA_MODELS]


def create(name: str, weights: str | Path | None = None, **timm_kwargs: Any) -> nn.Module:
    """Create a model ready for quantization (eval mode, unfused attention).

    Args:
        name: ``embedded-vit`` / ``embedded-swin`` (trained weights shipped in the package) or any timm
            model name (``deit_small_patch16_224``, ``vit_base_patch16_224.augreg_in21k_ft_in1k``, ...; the
            paper's seven are :data:`PAPER_MODELS`). Whether an architecture can be quantized is checked
            by :func:`isvit_viz.quantize`; an unknown name raises ``ValueError`` here.
        weights: for timm models: ``None`` (random init: structure tests and timing only), ``"timm"``
            (timm's own pretrained download; needs network access), or a local weight file
            (``.safetensors`` / ``.pth`` / ``.bin``, e.g. from the Hugging Face hub), loaded through
            timm's pretrained-config overlay. A file that does not fit the architecture raises
            ``ValueError`` naming the first mismatched key. ``model.isvit_weights`` records the file's
            sha256 and timm's pretrained tag (:func:`isvit_viz.models.weights.weights_record`).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``).
    """
    if name in EMBEDDED_MODELS:
        if weights is not None:
            raise ValueError(f"{name} ships its own weights; do not pass weights=")
        model, _ = load_embedded(name.split("-", 1)[1])
        return model
    if isinstance(name, str) and name.startswith("embedded"):
        raise ValueError(f"unknown model {name!r}; embedded models: {list(EMBEDDED_MODELS)}")
    from .weights import create_timm

    model = create_timm(name, weights, **timm_kwargs)
    model.isvit_build_spec = {"kind": "timm", "name": name, "kwargs": dict(timm_kwargs)}  # type: ignore[attr-defined]
    return disable_fused_attention(model).eval()


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) FP architecture from a ``isvit_build_spec`` record."""
    if spec.get("kind") == "embedded":
        model = disable_fused_attention(build_embedded_arch(spec["name"])).eval()
        model.isvit_build_spec = dict(spec)  # type: ignore[attr-defined]
        return model
    if spec.get("kind") == "timm":
        return create(spec["name"], None, **spec.get("kwargs", {}))
    raise ValueError(f"unknown build spec {spec!r}")


__all__ = [
    "EMBEDDED_MODELS",
    "EXTRA_MODELS",
    "PAPER_MODELS",
    "available_models",
    "build_embedded_arch",
    "build_from_spec",
    "create",
    "disable_fused_attention",
    "load_embedded",
]
