"""ImageNet (or any ImageFolder tree) with each paper model's evaluation preprocessing (method.md 3.1)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocessing_config(model_name: str) -> dict:
    """Resize/crop/normalisation of the official code: ViT mean=std=0.5 with crop_pct 0.9; DeiT
    ImageNet statistics with crop_pct 0.875; Swin ImageNet statistics with crop_pct 0.9."""
    if model_name.startswith("vit_"):
        return {"input_size": 224, "crop_pct": 0.9, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    if model_name.startswith("deit_"):
        return {"input_size": 224, "crop_pct": 0.875, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if model_name.startswith("swin_"):
        return {"input_size": 224, "crop_pct": 0.9, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    raise ValueError(f"no ImageNet preprocessing known for {model_name!r} (expected a vit_/deit_/swin_ model)")


def build_transform(model_name: str):
    """torchvision transform: bicubic resize to int(224 / crop_pct), centre crop 224, normalise."""
    from torchvision import transforms as T

    cfg = preprocessing_config(model_name)
    size = int(cfg["input_size"] / cfg["crop_pct"])
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(cfg["input_size"]),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])  # fmt: skip


def imagefolder_loader(
    root: str | Path,
    model_name: str,
    n: int | None = None,
    batch_size: int = 64,
    shuffle_seed: int | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """DataLoader over an ImageFolder tree (``root/<class>/<image>``) with ``model_name``'s preprocessing.

    ``n`` keeps a subset: the first ``n`` images, or ``n`` random ones when ``shuffle_seed`` is given
    (the official calibration set is 1024 random train images, seed 0).
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    ds = ImageFolder(str(root), transform=build_transform(model_name))
    if len(ds) == 0:
        raise ValueError(f"no images found under {root}")
    if n is not None:
        if not 1 <= n <= len(ds):
            raise ValueError(f"n must be in [1, {len(ds)}] for {root}, got {n}")
        if shuffle_seed is None:
            idx = list(range(n))
        else:
            idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(shuffle_seed))[:n].tolist()
        ds = Subset(ds, idx)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
