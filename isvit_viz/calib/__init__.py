"""Calibration: quantizer initialisation, reparameterization, reconstruction and the PTQ methods.

A PTQ method is data: a :class:`Method` (quantizer placement + an ordered tuple of stages:
:class:`Calibrate`, :class:`HessianCalibrate`, :class:`Reconstruct`, :class:`Reparameterize`,
:class:`Requantize`) that
:func:`quantize` runs with one engine. :data:`METHODS` holds the registered ones and :func:`describe`
lists every setting of a method with its source.
"""

from .methods import METHODS, Method, resolve_method
from .pipeline import QuantResult, quantize, reconstruction_units
from .provenance import Source, describe, describe_markdown
from .recon import ReconConfig, reconstruct_unit
from .reparam import fold_channel_scales, reparameterize
from .stages import Calibrate, ChooseSoftmax, HessianCalibrate, Loss, Mix, Reconstruct, ReluMLP, Reparameterize, Requantize, Stage

__all__ = [
    "METHODS",
    "Calibrate",
    "ChooseSoftmax",
    "HessianCalibrate",
    "Loss",
    "Method",
    "Mix",
    "QuantResult",
    "ReconConfig",
    "Reconstruct",
    "ReluMLP",
    "Reparameterize",
    "Requantize",
    "Source",
    "Stage",
    "describe",
    "describe_markdown",
    "fold_channel_scales",
    "quantize",
    "reconstruct_unit",
    "reconstruction_units",
    "reparameterize",
    "resolve_method",
]
