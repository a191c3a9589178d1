"""Computations on models for figures: attention capture, loss landscapes, quantizer sensitivity.

Everything here runs a model; :mod:`isvit_viz.viz` only draws what these functions return.
"""

from .attention import AttentionStats, attention_modules, capture_attention
from .landscape import (
    FIG3_CONFIGS,
    Landscape,
    block_landscape,
    fig3_models,
    landscape_for_setting,
    linear_path,
    model_landscape,
    sos_study,
)
from .levels import (
    ETA_GRID,
    LEVEL_QUANTIZERS,
    attention_from_artifact,
    attention_to_artifact,
    calibrate_softmax_quantizers,
    eta_tradeoff,
    level_stats,
    levels_vs_bits,
    softmax_quantized,
    synthetic_softmax,
)
from .mixed_precision import MixedPrecisionResult, average_bits, mixed_precision_search, sensitivity_study
from .sensitivity import (
    GROUPS,
    QuantizerInfo,
    SensitivityReport,
    StreamingEvaluator,
    analyze_sensitivity,
    apply_precision,
    bitwidth_sweep,
    list_quantizers,
    precision_override,
    quantizers_enabled,
)

__all__ = [
    "FIG3_CONFIGS",
    "AttentionStats",
    "Landscape",
    "attention_modules",
    "block_landscape",
    "capture_attention",
    "fig3_models",
    "landscape_for_setting",
    "linear_path",
    "model_landscape",
    "sos_study",
    "ETA_GRID",
    "LEVEL_QUANTIZERS",
    "attention_from_artifact",
    "attention_to_artifact",
    "calibrate_softmax_quantizers",
    "eta_tradeoff",
    "level_stats",
    "levels_vs_bits",
    "softmax_quantized",
    "synthetic_softmax",
    "GROUPS",
    "MixedPrecisionResult",
    "QuantizerInfo",
    "SensitivityReport",
    "StreamingEvaluator",
    "analyze_sensitivity",
    "apply_precision",
    "average_bits",
    "bitwidth_sweep",
    "list_quantizers",
    "mixed_precision_search",
    "precision_override",
    "quantizers_enabled",
    "sensitivity_study",
]
