"""Static (matplotlib) and interactive (plotly) plots of quantizers on post-softmax data.

Every function returns the figure and never calls ``show()``; notebooks display the return value.
With ``ax=None`` a bare ``matplotlib.figure.Figure`` is built (no pyplot global state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis.attention import AttentionStats
from ..quant import SULQ, LevelCoverage, Log2Quantizer, Quantizer, UniformQuantizer, coverage, make_quantizer
from ..quant.coverage import lowest_level_threshold

BACKENDS = ("matplotlib", "plotly")
PAPER_RANGE = (1.08e-8, 0.868)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _new_ax(ax: Any = None, figsize: tuple[float, float] = (7, 4)):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def quantizer_for(name: str, bits: int, values: torch.Tensor, **kw: Any) -> Quantizer:
    """Build quantizer ``name`` at ``bits`` and calibrate it on ``values`` (post-softmax)."""
    q = UniformQuantizer(bits, **kw) if name == "uniform" else make_quantizer(name, bits, **kw)
    return q.calibrate(values)


def _collapse(
    stats: AttentionStats | torch.Tensor,
    layer: int | None,
    head: int | None,
    quantizer: Quantizer,
    counts: torch.Tensor,
    edges: torch.Tensor,
) -> tuple[LevelCoverage | None, float, float, float]:
    """Share on the quantizer's lowest level with the one definition of :mod:`isvit_viz.quant.coverage`.

    Exact (``coverage`` of the quantizer's output) when the values are at hand: a raw tensor, or an
    :class:`AttentionStats` with samples and ``head=None``. For one head only the histogram exists,
    so the share is the histogram mass below the quantizer's decision threshold, the bin that holds
    the threshold split in proportion to its log-width (flagged approximate). Returns
    ``(coverage or None, share on lowest level, share on next level or nan, threshold)``.
    """
    thr = lowest_level_threshold(quantizer)
    if not isinstance(stats, AttentionStats) or (head is None and stats.samples):
        vals = stats.sample(layer) if isinstance(stats, AttentionStats) else torch.as_tensor(stats).flatten()
        cov = coverage(quantizer, vals)
        return cov, cov.frac_collapsed, cov.frac_next, thr
    c = counts / counts.sum()
    share = float(c[0]) if thr > 0 else 0.0  # the underflow bin holds values below edges[0] (incl. 0)
    lo, hi = edges[:-1], edges[1:]
    full = hi <= thr
    share += float(c[1:-1][full].sum())
    part = (lo < thr) & (hi > thr)
    if part.any():
        j = int(torch.nonzero(part)[0])
        share += float(c[1 + j]) * math.log(thr / float(lo[j])) / math.log(float(hi[j] / lo[j]))
    return None, share, float("nan"), thr


def _histogram_counts(
    stats: AttentionStats | torch.Tensor, layer: int | None, head: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts, edges)``: float64 counts with under- and overflow bins, for a capture or a raw tensor
    (``ValueError`` when there is nothing to plot)."""
    if isinstance(stats, AttentionStats):
        counts, edges = stats.histogram(layer, head).double(), stats.edges
    else:
        from ..analysis.attention import DEFAULT_EDGES

        vals = torch.as_tensor(stats).detach().double().flatten()
        edges = DEFAULT_EDGES
        counts = torch.bincount(torch.bucketize(vals, edges, right=True), minlength=len(edges) + 1).double()
    if counts.sum() == 0:
        raise ValueError("empty attention capture: nothing to plot")
    return counts, edges


def _collapse_label(levels: np.ndarray, collapsed: float, nxt: float, exact: bool) -> str:
    """Legend text: the share on the lowest level (and the next, when exact); says where level 0 is."""
    lv0 = float(levels[0])
    where = (" < 0" if lv0 < 0 else "") + (", off the log axis" if lv0 <= 0 else "")
    label = f"onto lowest level ({lv0:.2g}{where}): {'' if exact else '≈ '}{collapsed:.1%}"
    if exact and len(levels) > 1:
        label += f"; next ({float(levels[1]):.2g}): {nxt:.1%}"
    return label


def plot_attention_histogram(
    stats: AttentionStats | torch.Tensor,
    layer: int | None = None,
    head: int | None = None,
    quantizer: Quantizer | None = None,
    backend: str = "matplotlib",
    ax: Any = None,
    title: str | None = None,
):
    """Paper Fig. 1 on real data: log-x histogram of post-softmax probabilities with the levels of
    ``quantizer`` drawn as vertical lines and the inputs it maps onto its lowest level shaded.

    The shaded share is ``coverage(quantizer, values).frac_collapsed``: what the quantizer's own output
    puts on its lowest level (the shading ends at :func:`lowest_level_threshold`). Levels <= 0 cannot
    sit on the log axis; the legend names them (SULQ's lowest level ``2^e_min - eta`` is negative
    whenever ``eta > 2^e_min``; flush-to-zero quantizers have a level at 0).

    ``stats``: an :class:`AttentionStats` (histogram of one layer/head or pooled; the share uses its
    samples when ``head is None``, otherwise the histogram, marked with "≈") or a raw tensor.
    """
    _check_backend(backend)
    counts, edges = _histogram_counts(stats, layer, head)
    total = counts.sum()
    inner = counts[1:-1] / total  # bins between edges; underflow reported in the legend
    lo, hi = edges[:-1].numpy(), edges[1:].numpy()
    centers = np.sqrt(lo * hi)
    levels = quantizer.levels().double().numpy() if quantizer is not None else np.array([])
    pos_levels = levels[levels > 0]
    below = float(counts[0] / total)
    title = (
        title or f"post-softmax probabilities (layer {'all' if layer is None else layer}, head {'all' if head is None else head})"
    )
    collapsed = nxt = thr = None
    label = ""
    if quantizer is not None:
        cov, collapsed, nxt, thr = _collapse(stats, layer, head, quantizer, counts, edges)
        label = _collapse_label(levels, collapsed, nxt, exact=cov is not None)
    if backend == "plotly":
        import plotly.graph_objects as go

        fig = go.Figure(go.Bar(x=centers, y=inner.numpy(), width=hi - lo, name="share of probabilities"))
        for v in pos_levels:
            fig.add_vline(x=float(v), line_color="crimson", line_width=1)
        if quantizer is not None and thr > edges[0]:
            fig.add_vrect(x0=float(edges[0]), x1=thr, fillcolor="orange", opacity=0.15, line_width=0)
        fig.update_xaxes(type="log", title="probability")
        fig.update_yaxes(title="share of values")
        fig.update_layout(title=title + (f"<br><sup>{label}</sup>" if label else ""), showlegend=False, bargap=0)
        fig.layout.meta = {"levels": levels.tolist(), "below_first_edge": below, "collapsed": collapsed,
                           "next": nxt, "threshold": thr}  # fmt: skip
        return fig
    fig, ax = _new_ax(ax)
    ax.bar(
        lo,
        inner.numpy(),
        width=hi - lo,
        align="edge",
        color="steelblue",
        label=f"probabilities (n={int(total):,}; {below:.1%} < {edges[0]:.0e})",
    )
    if quantizer is not None:
        ax.vlines(
            pos_levels,
            0,
            1,
            transform=ax.get_xaxis_transform(),
            colors="crimson",
            lw=1,
            label=f"{type(quantizer).__name__} levels ({quantizer.n_codes} codes, {len(levels)} distinct, {len(pos_levels)} > 0 drawn)",
        )
        ax.axvspan(edges[0].item(), max(thr, edges[0].item()), color="orange", alpha=0.15, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("probability")
    ax.set_ylabel("share of values")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def plot_log_domain_example(bits: Sequence[int] = (3, 4), eta: float = 1e-6, ax: Any = None):
    """Paper Fig. 1 (a)/(b): on the range [1.08e-8, 0.868] (s = 1), the rounded exponents span 0..26;
    LQ keeps 2^b of them and collapses the rest onto the last code; SULQ spreads 2^b codes over the
    whole range. Returns a matplotlib figure with one row per quantizer and bit-width."""
    from matplotlib.figure import Figure

    x = torch.tensor(PAPER_RANGE)
    rows = [(f"LQ {b}-bit", Log2Quantizer(b, scale=1.0).calibrate(x)) for b in bits]
    rows += [(f"SULQ {b}-bit (eta={eta:g})", SULQ(b, eta=eta).calibrate(x)) for b in bits]
    fig = Figure(figsize=(8, 0.8 + 0.7 * len(rows)), layout="constrained") if ax is None else ax.figure
    ax = ax or fig.add_subplot()
    full = range(0, 27)
    for i, (label, q) in enumerate(rows):
        exps = sorted({int(round(-math.log2(float(v) + (float(q.eta) if isinstance(q, SULQ) else 0.0)))) for v in q.levels()})
        ax.scatter(list(full), [i] * len(full), s=8, color="lightgray")
        ax.scatter(exps, [i] * len(exps), s=40, color="crimson" if "LQ" in label else "seagreen", zorder=3)
        if "LQ" in label:
            top = max(exps)
            ax.plot([top, 26], [i, i], color="orange", lw=6, alpha=0.4, solid_capstyle="butt")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xlabel("-log2(x): exponent of the de-quantized value (gray: all rounded exponents of the range; orange: collapsed)")
    ax.set_xlim(-1, 27)
    ax.set_title("log-domain coverage on the paper's range [1.08e-8, 0.868]", fontsize=10)
    return fig


def plot_transfer_curves(
    bits: int = 3, etas: Sequence[float] = (1e-4, 1e-3, 1e-2, 0.1), backend: str = "matplotlib", ax: Any = None
):
    """Paper Fig. 2: x -> x_hat for b-bit LQ and UQ (a) and SULQ at several shifts eta (b), on [0, 1]."""
    _check_backend(backend)
    x = torch.logspace(-6, 0, 2000)
    calib = torch.cat([x, torch.zeros(1)])
    curves: dict[str, torch.Tensor] = {
        f"LQ {bits}-bit": Log2Quantizer(bits, scale=1.0).calibrate(calib)(x),
        f"UQ {bits}-bit": UniformQuantizer(bits, init="minmax").calibrate(calib)(x),
    }
    for eta in etas:
        curves[f"SULQ {bits}-bit eta={eta:g}"] = SULQ(bits, eta=eta).calibrate(calib)(x)
    if backend == "plotly":
        import plotly.graph_objects as go

        fig = go.Figure([go.Scatter(x=x.numpy(), y=v.numpy(), name=k, mode="lines", line_shape="hv") for k, v in curves.items()])
        fig.add_trace(go.Scatter(x=x.numpy(), y=x.numpy(), name="identity", line={"dash": "dot", "color": "gray"}))
        fig.update_xaxes(type="log", title="x")
        fig.update_yaxes(type="log", title="x_hat")
        fig.update_layout(title=f"transfer curves, {bits}-bit")
        return fig
    fig, ax = _new_ax(ax)
    for k, v in curves.items():
        ax.step(x.numpy(), v.clamp_min(1e-7).numpy(), where="mid", label=k, lw=1.4 if "SULQ" not in k else 1.0)
    ax.plot(x.numpy(), x.numpy(), ":", color="gray", label="identity")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("x (post-softmax)")
    ax.set_ylabel("x_hat (values <= 0 drawn at 1e-7)")
    ax.set_title(f"transfer curves, {bits}-bit", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def coverage_table(
    values: torch.Tensor,
    quantizers: Sequence[str] = ("log2", "uniform", "logsqrt2", "twin_uniform", "adalog", "sulq"),
    bits: Sequence[int] = (3, 4, 6),
) -> list[dict[str, Any]]:
    """Level coverage of every quantizer x bit-width on ``values``: list of dict rows with ``n_codes``,
    ``distinct_levels``, ``used_levels``, ``entropy_bits``, ``mse``, ``lowest_level`` and ``collapsed``
    (share mapped onto the lowest level, :attr:`LevelCoverage.frac_collapsed`)."""
    if values.numel() == 0:
        raise ValueError("empty attention capture: no values to measure coverage on")
    rows = []
    for name in quantizers:
        for b in bits:
            q = quantizer_for(name, b, values)
            cov = coverage(q, values)
            rows.append({"quantizer": name, "bits": b, "n_codes": cov.n_codes, "distinct_levels": cov.distinct_levels,
                         "used_levels": cov.used_levels, "entropy_bits": cov.entropy_bits, "mse": cov.mse,
                         "lowest_level": cov.lowest_level, "collapsed": cov.frac_collapsed})  # fmt: skip
    return rows


def plot_level_coverage(coverages: Mapping[str, LevelCoverage], backend: str = "matplotlib"):
    """Per-level occupancy bars, one panel per quantizer: one bar per distinct level (gray: unused),
    labelled with the level value and, where several codes share it, ``xN codes``; the title gives
    codes / distinct levels / used levels, entropy, MSE and the share on the lowest level."""
    _check_backend(backend)
    if not coverages:
        raise ValueError("no coverages to plot")

    def tick(cov: LevelCoverage, i: int) -> str:
        k = int(cov.codes_per_level[i])
        return f"{float(cov.levels[i]):.1e}" + (f" x{k}" if k > 1 else "")

    if backend == "plotly":
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=len(coverages), cols=1, subplot_titles=[f"{k}: {c.summary()}" for k, c in coverages.items()])
        for i, cov in enumerate(coverages.values(), start=1):
            fig.add_trace(
                go.Bar(x=[tick(cov, j) for j in range(cov.distinct_levels)], y=cov.fractions.tolist(), showlegend=False),
                row=i,
                col=1,
            )
        fig.update_layout(height=260 * len(coverages), title="level coverage")
        return fig
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.3 * len(coverages)), layout="constrained")
    axes = fig.subplots(len(coverages), 1, squeeze=False)[:, 0]
    for ax, (name, cov) in zip(axes, coverages.items()):
        ax.bar(
            range(cov.distinct_levels),
            cov.fractions.numpy(),
            color=["steelblue" if c > 0 else "lightgray" for c in cov.counts.tolist()],
        )
        ax.set_xticks(range(cov.distinct_levels), [tick(cov, j) for j in range(cov.distinct_levels)], rotation=90, fontsize=6)
        ax.set_ylabel("share")
        ax.set_title(f"{name}: {cov.summary()}", fontsize=8)
    return fig


def plot_coverage_heatmap(rows: Sequence[Mapping[str, Any]], metric: str = "entropy_bits", ax: Any = None):
    """Heatmap of a coverage metric (rows: quantizers, columns: bit-widths) from :func:`coverage_table`."""
    if not rows:
        raise ValueError("no coverage rows to plot")
    names = list(dict.fromkeys(r["quantizer"] for r in rows))
    bits = sorted({r["bits"] for r in rows})
    grid = np.full((len(names), len(bits)), np.nan)
    for r in rows:
        grid[names.index(r["quantizer"]), bits.index(r["bits"])] = r[metric]
    fig, ax = _new_ax(ax, (5, 0.5 + 0.45 * len(names)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    for i in range(len(names)):
        for j in range(len(bits)):
            ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(len(bits)), [f"{b}-bit" for b in bits])
    ax.set_yticks(range(len(names)), names)
    ax.set_title(metric, fontsize=10)
    fig.colorbar(im, ax=ax)
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib or plotly figure; the format follows the suffix (.png, .svg, .pdf, .html).

    Static plotly export uses kaleido with the system Chromium (``BROWSER_PATH``); HTML needs nothing.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg", ".pdf", ".html"):
        raise ValueError(f"unsupported figure format {suffix!r}; use .png, .svg, .pdf or .html")
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(fig, "savefig"):
        if suffix == ".html":
            raise ValueError("matplotlib figures export to .png/.svg/.pdf, not .html")
        fig.savefig(path, dpi=120)
    elif hasattr(fig, "write_html"):
        if suffix == ".html":
            fig.write_html(str(path), include_plotlyjs=True)
        else:
            fig.write_image(str(path))
    else:
        raise ValueError(f"not a matplotlib or plotly figure: {type(fig).__name__}")
    return path
