"""Plots and widgets: histograms with quantizer levels, transfer curves, level coverage, loss
landscapes, and ipywidgets explorers. Nothing here computes on a model by itself; the data come
from :mod:`isvit_viz.analysis` (widgets call it to recompute live)."""

from .landscape_plots import plot_landscape
from .level_plots import plot_eta_tradeoff, plot_levels_vs_bits
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
from .result_plots import plot_calibration_size, plot_runtime_accuracy
from .sensitivity_plots import (
    heatmap_views,
    plot_bitwidth_sweep,
    plot_block_group_heatmap,
    plot_mixed_precision,
    plot_quantizer_sensitivity,
    plot_sqnr_profile,
)
from .widgets import explore_quantizer, landscape_bits_explorer, landscape_explorer, quantizer_explorer

__all__ = [
    "heatmap_views",
    "plot_bitwidth_sweep",
    "plot_block_group_heatmap",
    "plot_mixed_precision",
    "plot_quantizer_sensitivity",
    "plot_sqnr_profile",
    "coverage_table",
    "explore_quantizer",
    "landscape_bits_explorer",
    "landscape_explorer",
    "plot_attention_histogram",
    "plot_calibration_size",
    "plot_coverage_heatmap",
    "plot_eta_tradeoff",
    "plot_landscape",
    "plot_level_coverage",
    "plot_levels_vs_bits",
    "plot_log_domain_example",
    "plot_runtime_accuracy",
    "plot_transfer_curves",
    "quantizer_for",
    "quantizer_explorer",
    "save_figure",
]
