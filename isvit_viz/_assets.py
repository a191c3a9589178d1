"""Locating and verifying the files shipped in ``isvit_viz/assets``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
MANIFEST = ASSETS_DIR / "MANIFEST.json"


class AssetError(RuntimeError):
    """A packaged asset is missing or corrupted."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def asset_path(name: str, verify: bool = True) -> Path:
    """Path of packaged asset ``name``; raises :class:`AssetError` naming the file if missing or corrupt."""
    path = ASSETS_DIR / name
    if not path.is_file():
        raise AssetError(f"packaged asset missing: {path} (reinstall isvit_viz or restore the file)")
    if verify and MANIFEST.is_file():
        expected = json.loads(MANIFEST.read_text()).get(name)
        if expected is not None and sha256(path) != expected:
            raise AssetError(f"packaged asset corrupted (sha256 mismatch): {path}")
    return path
