"""Calibration: quantizer initialisation, reparameterization, reconstruction and the PTQ methods."""

from .methods import METHODS, MethodSpec, resolve_method
from .pipeline import QuantResult, quantize, reconstruction_units
from .recon import ReconConfig, reconstruct_unit
from .reparam import fold_channel_scales, reparameterize

__all__ = [
    "METHODS",
    "MethodSpec",
    "QuantResult",
    "ReconConfig",
    "fold_channel_scales",
    "quantize",
    "reconstruct_unit",
    "reconstruction_units",
    "reparameterize",
    "resolve_method",
]
