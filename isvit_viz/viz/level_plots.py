"""Figures of what post-softmax quantizers' levels are: distinct levels vs bits and SULQ's eta trade-off.

Both draw the rows of :mod:`isvit_viz.analysis.levels` (or of the committed ``levels`` artifact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def plot_levels_vs_bits(rows: Sequence[Mapping[str, Any]], title: str = "levels vs bits"):
    """Two panels from :func:`isvit_viz.analysis.levels_vs_bits` rows: (a) per bit-width one group of
    bars per quantizer: hollow bar = codes, filled bar = distinct levels, black tick = levels used by
    the data (log2 axis); (b) MSE on the values against bits. Returns a matplotlib figure."""
    if not rows:
        raise ValueError("no level rows to plot")
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(r["label"] for r in rows))
    bits = sorted({r["bits"] for r in rows})
    by = {(r["label"], r["bits"]): r for r in rows}
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax_l, ax_m = fig.subplots(1, 2, width_ratios=[1.6, 1])
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        color = f"C{i}"
        pts = [(j + (i - (len(labels) - 1) / 2) * width, by[label, b]) for j, b in enumerate(bits) if (label, b) in by]
        xs = [x for x, _ in pts]
        ax_l.bar(xs, [r["n_codes"] for _, r in pts], width, facecolor="none", edgecolor=color, lw=0.8)
        ax_l.bar(xs, [r["distinct_levels"] for _, r in pts], width, color=color, alpha=0.8, label=label)
        ax_l.scatter(xs, [r["used_levels"] for _, r in pts], marker="_", color="black", s=60, zorder=3)
        rs = [by[label, b] for b in bits if (label, b) in by]
        ax_m.plot([r["bits"] for r in rs], [r["mse"] for r in rs], "o-", color=color, label=label)
    ax_l.set_yscale("log", base=2)
    ax_l.set_ylim(bottom=1)
    ax_l.set_xticks(range(len(bits)), [f"{b}-bit" for b in bits])
    ax_l.set_ylabel("hollow: codes, filled: distinct levels, tick: used")
    ax_l.set_title("(a) codes vs distinct levels vs used levels", fontsize=10)
    ax_l.legend(fontsize=7, ncols=2)
    ax_m.set_yscale("log")
    ax_m.set_xticks(bits)
    ax_m.set_xlabel("bits")
    ax_m.set_ylabel("MSE on the values")
    ax_m.set_title("(b) reconstruction MSE", fontsize=10)
    ax_m.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_eta_tradeoff(tradeoffs: Sequence[Mapping[str, Any]] | Mapping[str, Any], title: str = "SULQ's shift eta trade-off"):
    """SULQ at a fixed shift eta (log x axis), one line per :func:`isvit_viz.analysis.eta_tradeoff`
    result: share on the lowest level (solid) and next level (dotted), MSE, and, where measured, the
    agreement with the FP top-1 and KL(FP || Q) of the model with only its post-softmax maps quantized.
    The eta the calibration search picks on the values is a dashed vertical line; the model whose layers
    each search their own eta is a dash-dotted horizontal line; hollow markers: etas whose lowest level
    is negative (``2^e_min - eta < 0``). Returns a matplotlib figure."""
    tradeoffs = [tradeoffs] if isinstance(tradeoffs, Mapping) else list(tradeoffs)
    if not tradeoffs or not all(t.get("rows") for t in tradeoffs):
        raise ValueError("no eta trade-off rows to plot")
    from matplotlib.figure import Figure

    task = all("agree_top1" in t["rows"][0] for t in tradeoffs)
    panels = [("collapsed", "share of values on the lowest level\n(dotted: on the next level)"), ("mse", "MSE on the values")]
    if task:
        panels += [("agree_top1", "agreement with FP top-1"), ("kl_to_fp", "KL(FP || Q), nats")]
    fig = Figure(figsize=(3.6 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for i, t in enumerate(tradeoffs):
        color = f"C{i}"
        rows = t["rows"]
        eta = np.array([r["eta"] for r in rows])
        neg = np.array([r["lowest_level"] < 0 for r in rows])
        label = f"{t['bits']}-bit {t['mode']} (searched eta {t['searched_eta']:.2g})"
        for ax, (key, ylabel) in zip(axes, panels):
            y = np.array([r[key] for r in rows])
            ax.plot(eta, y, "-", color=color, label=label)
            ax.scatter(eta[~neg], y[~neg], color=color, s=18, zorder=3)
            ax.scatter(eta[neg], y[neg], facecolors="white", edgecolors=color, s=18, zorder=3)
            if key == "collapsed":
                ax.plot(eta, [r["next"] for r in rows], ":", color=color)
            ax.axvline(t["searched_eta"], color=color, ls="--", lw=1)
            if key in ("agree_top1", "kl_to_fp") and "searched" in t:
                ax.axhline(t["searched"][key], color=color, ls="-.", lw=1)
            ax.set_xscale("log")
            ax.set_xlabel("eta (fixed for every layer)")
            ax.set_ylabel(ylabel, fontsize=9)
            if key in ("mse", "kl_to_fp"):
                ax.set_yscale("log")
    axes[0].legend(fontsize=7, title="hollow: lowest level < 0", title_fontsize=7)
    fig.suptitle(title, fontsize=11)
    return fig
