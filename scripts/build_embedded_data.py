#!/usr/bin/env python
"""Write the embedded Fashion-MNIST data shipped in ``isvit_viz/assets``.

* ``fashion_mnist_test.npz``: the full 10k test split (uint8 images [N, 28, 28], int64 labels).
* ``fashion_mnist_calib.npz``: 2048 train images drawn with seed 0 (calibration set).

Source: Debian package ``dataset-fashion-mnist`` (MIT licence, Zalando Research).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

DST = Path(__file__).resolve().parents[1] / "isvit_viz" / "assets"
sys.path.insert(0, str(DST.parents[1]))

from isvit_viz.data.fashion_mnist import read_debian_split  # noqa: E402


def main() -> None:
    DST.mkdir(parents=True, exist_ok=True)
    xte, yte = read_debian_split("test")
    np.savez_compressed(DST / "fashion_mnist_test.npz", images=xte, labels=yte)
    xtr, ytr = read_debian_split("train")
    idx = np.sort(np.random.default_rng(0).choice(len(ytr), 2048, replace=False))
    np.savez_compressed(DST / "fashion_mnist_calib.npz", images=xtr[idx], labels=ytr[idx], train_index=idx)
    for p in sorted(DST.glob("*.npz")):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
