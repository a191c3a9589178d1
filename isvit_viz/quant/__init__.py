"""Quantizers, quantized timm modules and model wrapping."""

from .base import Quantizer, round_ste
from .coverage import LevelCoverage, coverage
from .log_quantizers import AdaLogQuantizer, Log2Quantizer, LogSqrt2Quantizer
from .registry import QUANTIZERS, make_quantizer
from .sulq import OFFICIAL_ETA_GRID, PAPER_ETA_GRID, SULQ
from .twin_uniform import TwinUniformQuantizer
from .uniform import ACT_PERCENTILES, WEIGHT_PERCENTILES, UniformQuantizer

__all__ = [
    "ACT_PERCENTILES",
    "AdaLogQuantizer",
    "LevelCoverage",
    "Log2Quantizer",
    "LogSqrt2Quantizer",
    "OFFICIAL_ETA_GRID",
    "PAPER_ETA_GRID",
    "QUANTIZERS",
    "Quantizer",
    "SULQ",
    "TwinUniformQuantizer",
    "UniformQuantizer",
    "WEIGHT_PERCENTILES",
    "coverage",
    "make_quantizer",
    "round_ste",
]
