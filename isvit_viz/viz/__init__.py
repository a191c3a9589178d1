"""Visualization helpers: attention capture, histograms with quantizer levels, transfer curves,
level coverage, loss landscapes, and ipywidgets explorers."""

from .attention import AttentionStats, attention_modules, capture_attention
from .landscape import (
    FIG3_CONFIGS,
    Landscape,
    block_landscape,
    fig3_models,
    landscape_for_setting,
    linear_path,
    model_landscape,
    plot_landscape,
)
from .plots import (
    coverage_table,
    plot_attention_histogram,
    plot_coverage_heatmap,
    plot_level_coverage,
    plot_log_domain_example,
    plot_transfer_curves,
    quantizer_for,
    save_figure,
)
from .widgets import explore_quantizer, landscape_bits_explorer, landscape_explorer, quantizer_explorer

__all__ = [
    "FIG3_CONFIGS",
    "AttentionStats",
    "Landscape",
    "attention_modules",
    "block_landscape",
    "capture_attention",
    "coverage_table",
    "explore_quantizer",
    "fig3_models",
    "landscape_bits_explorer",
    "landscape_explorer",
    "landscape_for_setting",
    "linear_path",
    "model_landscape",
    "plot_attention_histogram",
    "plot_coverage_heatmap",
    "plot_landscape",
    "plot_level_coverage",
    "plot_log_domain_example",
    "plot_transfer_curves",
    "quantizer_for",
    "quantizer_explorer",
    "save_figure",
]
