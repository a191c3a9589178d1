"""Name -> quantizer class registry and the ``make_quantizer`` factory."""

from __future__ import annotations

from typing import Any

from .base import Quantizer
from .log_quantizers import AdaLogQuantizer, Log2Quantizer, LogSqrt2Quantizer
from .sulq import SULQ
from .twin_uniform import TwinUniformQuantizer
from .uniform import UniformQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    "uniform": UniformQuantizer,
    "log2": Log2Quantizer,
    "logsqrt2": LogSqrt2Quantizer,
    "twin_uniform": TwinUniformQuantizer,
    "adalog": AdaLogQuantizer,
    "sulq": SULQ,
}


def make_quantizer(name: str, bits: int, **kwargs: Any) -> Quantizer:
    """Build a quantizer by name (``uniform``, ``log2``, ``logsqrt2``, ``twin_uniform``, ``adalog``, ``sulq``).

    Extra keyword arguments go to the class constructor, e.g.
    ``make_quantizer("sulq", 3, mode="official")``.
    """
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; valid names: {sorted(QUANTIZERS)}")
    return QUANTIZERS[name](bits, **kwargs)
