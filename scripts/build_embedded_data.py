#!/usr/bin/env python
"""Write the embedded Fashion-MNIST data shipped in ``isvit_viz/assets``.

* ``fashion_mnist_test.npz``: the full 10k test split (uint8 images [N, 28, 28], int64 labels).
* ``fashion_mnist_calib.npz``: 2048 train images drawn with seed 0 (calibration set).

Source: Debian package ``dataset-fashion-mnist`` (MIT licence, Zalando Research).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

SRC = Path("/usr/share/datasets/fashion-mnist")
DST = Path(__file__).resolve().parents[1] / "isvit_viz" / "assets"


def read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load(kind: str) -> tuple[np.ndarray, np.ndarray]:
    y = read_idx(SRC / f"{kind}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    x = read_idx(SRC / f"{kind}-images-idx3-ubyte.gz", 16).reshape(len(y), 28, 28)
    return x, y


def main() -> None:
    DST.mkdir(parents=True, exist_ok=True)
    xte, yte = load("t10k")
    np.savez_compressed(DST / "fashion_mnist_test.npz", images=xte, labels=yte)
    xtr, ytr = load("train")
    idx = np.sort(np.random.default_rng(0).choice(len(ytr), 2048, replace=False))
    np.savez_compressed(DST / "fashion_mnist_calib.npz", images=xtr[idx], labels=ytr[idx], train_index=idx)
    for p in sorted(DST.glob("*.npz")):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
