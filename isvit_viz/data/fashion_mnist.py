"""Fashion-MNIST, embedded in the package (10k test split + 2048-image calibration subset).

When Debian's ``dataset-fashion-mnist`` is installed, :func:`load_debian_split` reads the full splits.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .._assets import AssetError, asset_path
from ..models.embedded_arch import FMNIST_MEAN, FMNIST_STD

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def normalize(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], normalised with the train mean/std."""
    x = torch.as_tensor(np.array(images_u8, copy=True)).float().div_(255.0)
    return ((x - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1)


def _load_npz(name: str) -> tuple[np.ndarray, np.ndarray]:
    path = asset_path(name)
    try:
        with np.load(path) as z:
            return z["images"], z["labels"]
    except Exception as e:  # zip/pickle errors all mean the file is damaged
        raise AssetError(f"cannot read packaged asset {path}: {e}") from e


def read_debian_split(kind: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 images [N, 28, 28] and int64 labels [N] from Debian's ``dataset-fashion-mnist``
    (``kind`` = ``"train"`` or ``"test"``)."""
    if kind not in ("train", "test"):
        raise ValueError(f"kind must be 'train' or 'test', got {kind!r}")
    stem = "train" if kind == "train" else "t10k"
    lab, img = DEBIAN_DIR / f"{stem}-labels-idx1-ubyte.gz", DEBIAN_DIR / f"{stem}-images-idx3-ubyte.gz"
    if not img.is_file():
        raise FileNotFoundError(f"{img} not found: install it with `apt-get install dataset-fashion-mnist`")
    with gzip.open(lab, "rb") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    with gzip.open(img, "rb") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(len(y), 28, 28)
    return x, y


def load_debian_split(kind: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Full split from Debian's ``dataset-fashion-mnist``, normalised: ([N, 1, 28, 28], [N])."""
    x, y = read_debian_split(kind)
    return normalize(x), torch.from_numpy(y)


@dataclass
class EmbeddedSplits:
    """The embedded Fashion-MNIST data as DataLoaders of normalised [B, 1, 28, 28] images.

    ``calib(n, seed)`` draws ``n`` of the 2048 packaged train images (seeded, without replacement);
    ``test(n)`` gives the first ``n`` (default all 10,000) test images in order.
    """

    batch_size: int = 256

    def _calib_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return _load_npz("fashion_mnist_calib.npz")

    def calib_tensors(self, n: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._calib_arrays()
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(y):
            raise ValueError(f"n must be an int in [1, {len(y)}] (packaged calibration images), got {n!r}")
        idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:n])
        return normalize(x[idx]), torch.from_numpy(y[idx])

    def calib(self, n: int = 1024, seed: int = 0, batch_size: int | None = None) -> DataLoader:
        x, y = self.calib_tensors(n, seed)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size or self.batch_size, shuffle=False)

    def test_tensors(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _load_npz("fashion_mnist_test.npz")
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(y):
                raise ValueError(f"n must be None or an int in [1, {len(y)}], got {n!r}")
            x, y = x[:n], y[:n]
        return normalize(x), torch.from_numpy(y)

    def test(self, n: int | None = None, batch_size: int | None = None) -> DataLoader:
        x, y = self.test_tensors(n)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size or self.batch_size, shuffle=False)
