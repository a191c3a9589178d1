"""Plots of result records (accuracy vs runtime, accuracy vs calibration images): paper Figs. 4 and 5."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .plots import _new_ax


def plot_runtime_accuracy(points: Sequence[Mapping[str, Any]], title: str = "W3/A3", ax: Any = None):
    """Paper Fig. 4: agreement with the FP top-1 (%) against calibration wall time (s, log scale),
    one labelled point per record (``method``, ``wall_s``, ``agree_top1``)."""
    if not points:
        raise ValueError("no records to plot")
    fig, ax = _new_ax(ax, (5, 3.5))
    for r in points:
        ax.scatter(r["wall_s"], 100 * r["agree_top1"])
        ax.annotate(r["method"], (r["wall_s"], 100 * r["agree_top1"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("calibration wall time (s)")
    ax.set_ylabel("agreement with FP top-1 (%)")
    ax.set_title(title, fontsize=9)
    return fig


def plot_calibration_size(rows: Sequence[Mapping[str, Any]], title: str = "I&S-ViT W3/A3", ax: Any = None):
    """Paper Fig. 5: measured agreement (%) and the paper's DeiT-S top-1 (%, right axis) against the
    number of calibration images (log scale). Rows need ``calib_images``, ``agree_top1``, ``paper_deit_s``."""
    if not rows:
        raise ValueError("no records to plot")
    fig, ax = _new_ax(ax, (5, 3.5))
    n = [r["calib_images"] for r in rows]
    ax.plot(n, [100 * r["agree_top1"] for r in rows], "o-", label="embedded ViT: agreement with FP")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("calibration images")
    ax.set_ylabel("agreement with FP top-1 (%)")
    paper = [(r["calib_images"], r["paper_deit_s"]) for r in rows if r.get("paper_deit_s") is not None]
    if paper:
        ax2 = ax.twinx()
        ax2.plot(*zip(*paper), "s--", color="tab:orange", label="paper: DeiT-S top-1 (ImageNet)")
        ax2.set_ylabel("paper DeiT-S top-1 (%)", color="tab:orange")
        fig.legend(loc="lower right", fontsize=7)
    ax.set_title(title, fontsize=9)
    return fig
