"""Datasets: the embedded Fashion-MNIST splits and ImageNet folders with per-model preprocessing."""

from .fashion_mnist import CLASSES, EmbeddedSplits, load_debian_split, normalize

__all__ = ["CLASSES", "EmbeddedSplits", "load_debian_split", "normalize"]

from .imagenet import build_transform, imagefolder_loader, preprocessing_config  # noqa: E402

__all__ += ["build_transform", "imagefolder_loader", "preprocessing_config"]
