"""Architectures of the embedded default models (small timm ViT and Swin for 28x28 Fashion-MNIST).

Kept free of heavy imports beyond timm so the training script and the loader build exactly the same
networks from one definition.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

#: Constructor kwargs of each embedded model; recorded verbatim in MODEL_CARD.md.
EMBEDDED_ARCH: dict[str, dict[str, Any]] = {
    "vit": dict(
        family="vit",
        img_size=28,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=192,
        depth=6,
        num_heads=3,
        mlp_ratio=4.0,
        drop_path_rate=0.05,
    ),
    "swin": dict(
        family="swin",
        img_size=28,
        patch_size=2,
        in_chans=1,
        num_classes=10,
        embed_dim=48,
        depths=(2, 4),
        num_heads=(3, 6),
        window_size=7,
        mlp_ratio=4.0,
        drop_path_rate=0.05,
    ),
}

#: Fashion-MNIST normalisation (train-split pixel mean/std on [0, 1]).
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530


def build_embedded_arch(name: str) -> nn.Module:
    """Build the (untrained) timm module for embedded model ``name`` ("vit" or "swin")."""
    if name not in EMBEDDED_ARCH:
        raise ValueError(f"unknown embedded model {name!r}; valid choices: {sorted(EMBEDDED_ARCH)}")
    kw = dict(EMBEDDED_ARCH[name])
    family = kw.pop("family")
    if family == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**kw)
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(**kw)
