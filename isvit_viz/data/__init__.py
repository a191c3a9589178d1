"""Datasets: the embedded Fashion-MNIST splits and ImageNet folders with per-model preprocessing."""

from .fashion_mnist import CLASSES, EmbeddedSplits, load_debian_split, normalize

__all__ = ["CLASSES", "EmbeddedSplits", "load_debian_split", "normalize"]

from .imagenet import (  # noqa: E402
    build_transform,
    calibration_images,
    default_workers,
    imagefolder_dataset,
    imagefolder_loader,
    imagenet_data,
    preprocessing_config,
    preprocessing_differences,
    stratified_indices,
)

__all__ += [
    "build_transform",
    "calibration_images",
    "default_workers",
    "imagefolder_dataset",
    "imagefolder_loader",
    "imagenet_data",
    "preprocessing_config",
    "preprocessing_differences",
    "stratified_indices",
]
