"""Refuse silently-wrong results on an untested timm: warn clearly at import time.

The quant-aware modules re-implement the forward of timm's ``Attention`` and ``WindowAttention``;
a timm release that changes those classes could break the exact-FP guarantee without an error.
"""

from __future__ import annotations

import warnings
from importlib import metadata

SUPPORTED_TIMM = ((1, 0), (1, 1))  # [1.0, 1.1)


def check_timm_version(version: str | None = None) -> bool:
    """Warn (``RuntimeWarning``) if the installed timm is outside the tested range; return True if OK."""
    try:
        v = version or metadata.version("timm")
    except metadata.PackageNotFoundError:
        warnings.warn(
            "timm is not installed: isvit_viz needs timm>=1.0,<1.1 (pip install timm==1.0.31)", RuntimeWarning, stacklevel=3
        )
        return False
    try:
        major, minor = (int(p) for p in v.split(".")[:2])
    except ValueError:
        return True  # a development build we cannot parse: assume the user knows
    lo, hi = SUPPORTED_TIMM
    if not lo <= (major, minor) < hi:
        warnings.warn(
            f"timm {v} is installed but isvit_viz is tested with timm>=1.0,<1.1 (1.0.31); the quantized attention "
            "modules re-implement timm's forward and may not match this version. Install timm==1.0.31.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
