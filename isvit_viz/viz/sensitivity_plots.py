"""Plots of quantizer sensitivity computed by :mod:`isvit_viz.analysis.sensitivity` (no model runs here).

Inputs are :class:`~isvit_viz.analysis.sensitivity.SensitivityReport` objects or their ``to_dict()``
form (as stored in the ``sensitivity`` artifact), keyed by a label such as the method name. Plotly
figures with several entries get a dropdown (``updatemenus``) that switches between them; matplotlib
(``backend="matplotlib"``) draws one entry, chosen by ``view``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..analysis.sensitivity import GROUPS, SensitivityReport, sweep_matrix
from .plots import _check_backend, _new_ax

_GROUP_COLORS = {
    "post_softmax": "#d62728",
    "post_ln": "#1f77b4",
    "post_gelu": "#2ca02c",
    "other_act": "#9467bd",
    "weight": "#7f7f7f",
}
METRIC_LABELS = {
    "kl_on": "KL(FP‖Q), only this quantizer on [nats]",
    "kl_on_self": "KL(Q_off‖Q), only this quantizer on [nats]",
    "sqnr_local_self_db": "local logit SQNR vs all quantizers off [dB]",
    "sqnr_cum_self_db": "cumulative logit SQNR vs all quantizers off [dB]",
    "kl_off_recovery": "KL recovered by switching it alone off [nats]",
    "sqnr_local_db": "local logit SQNR [dB]",
    "sqnr_cum_db": "cumulative logit SQNR [dB]",
    "agree_on": "top-1 agreement, only this quantizer on",
    "agree_off": "top-1 agreement, all but this quantizer on",
    "tensor_sqnr_local_db": "local tensor SQNR [dB]",
    "tensor_sqnr_cum_db": "cumulative tensor SQNR [dB]",
    "kl": "KL(FP‖Q) [nats]",
    "agree": "top-1 agreement with FP",
    "sqnr_db": "logit SQNR [dB]",
}


def _as_reports(reports: Any) -> dict[str, SensitivityReport]:
    if isinstance(reports, (SensitivityReport, Mapping)) and not _is_label_map(reports):
        reports = {"": reports}
    out = {}
    for k, r in reports.items():
        out[str(k)] = r if isinstance(r, SensitivityReport) else SensitivityReport.from_dict(r)
    if not out:
        raise ValueError("no sensitivity reports to plot")
    return out


def _is_label_map(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "rows" not in obj


def _dropdown(fig: Any, labels: Sequence[str], traces_per_view: Sequence[int], extra: Sequence[dict] | None = None) -> None:
    """One button per view; a view shows only its own traces. ``extra``: per-view layout updates."""
    if len(labels) < 2:
        return
    total = sum(traces_per_view)
    buttons, start = [], 0
    for i, (lab, n) in enumerate(zip(labels, traces_per_view)):
        vis = [start <= j < start + n for j in range(total)]
        buttons.append({"label": lab, "method": "update", "args": [{"visible": vis}, dict(extra[i]) if extra else {}]})
        start += n
    fig.update_layout(
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.18, "showactive": True}]
    )


def _value(v: Any, log: bool) -> float | None:
    if v is None:
        return None
    return math.log10(max(v, 1e-12)) if log else v


def plot_quantizer_sensitivity(
    reports: Any,
    metric: str = "kl_on",
    log: bool = False,
    backend: str = "plotly",
    view: str | None = None,
    title: str | None = None,
):
    """Bar per quantizer in forward order, coloured by group, of a per-quantizer ``metric``.

    ``reports``: one report or ``{label: report}`` (dropdown over labels). ``log``: logarithmic value
    axis (values <= 0, e.g. a negative KL recovery, are then left out).
    """
    _check_backend(backend)
    reps = _as_reports(reports)
    ylab = METRIC_LABELS.get(metric, metric)

    def val(v: Any) -> float | None:
        return None if v is None or (log and v <= 0) else v

    title = title or f"Per-quantizer sensitivity: {METRIC_LABELS.get(metric, metric)}"
    for lab, r in reps.items():
        if not any(metric in row for row in r.rows):
            raise ValueError(f"metric {metric!r} not in report {lab!r}")
    if backend == "matplotlib":
        lab = view if view is not None else next(iter(reps))
        rows = reps[lab].rows
        fig, ax = _new_ax(None, (11, 4))
        ys = [val(r.get(metric)) for r in rows]
        ax.bar(range(len(rows)), [math.nan if y is None else y for y in ys], color=[_GROUP_COLORS[r["group"]] for r in rows])
        if log:
            ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=90, fontsize=6)
        ax.set_ylabel(ylab)
        ax.set_title(f"{title} {lab}".strip(), fontsize=9)
        return fig
    import plotly.graph_objects as go

    fig = go.Figure()
    counts = []
    for i, r in enumerate(reps.values()):
        n = 0
        for g in GROUPS:
            rows = [row for row in r.rows if row["group"] == g]
            if not rows:
                continue
            fig.add_bar(x=[row["label"] for row in rows], y=[val(row.get(metric)) for row in rows], name=GROUPS[g],
                        marker_color=_GROUP_COLORS[g], visible=i == 0, legendgroup=g,
                        customdata=[[row["name"], row["bits"]] for row in rows],
                        hovertemplate="%{customdata[0]} (%{customdata[1]} bits)<br>%{y:.4g}<extra></extra>")  # fmt: skip
            n += 1
        counts.append(n)
    order = [row["label"] for row in next(iter(reps.values())).rows]
    fig.update_layout(title=title, yaxis={"title": ylab, "type": "log" if log else "linear"}, xaxis={"categoryorder": "array", "categoryarray": order, "tickfont": {"size": 8}},
                      bargap=0.1, height=450, legend={"orientation": "h", "y": -0.45})  # fmt: skip
    _dropdown(fig, list(reps), counts)
    return fig


def plot_sqnr_profile(reports: Any, backend: str = "plotly", view: str | None = None, title: str | None = None):
    """Local and cumulative SQNR along forward order: of the logits against FP and against the model with
    every quantizer off (equal for calibration-only methods), and of the tensor at the quantizer."""
    _check_backend(backend)
    reps = _as_reports(reports)
    series = [("sqnr_local_db", "logits vs FP, local"), ("sqnr_cum_db", "logits vs FP, cumulative"),
              ("sqnr_local_self_db", "logits vs all off, local"), ("sqnr_cum_self_db", "logits vs all off, cumulative"),
              ("tensor_sqnr_local_db", "tensor, local"), ("tensor_sqnr_cum_db", "tensor, cumulative")]  # fmt: skip
    title = title or "SQNR along the forward pass: only this quantizer on (local) vs all up to it on (cumulative)"
    if backend == "matplotlib":
        lab = view if view is not None else next(iter(reps))
        rows = reps[lab].rows
        fig, ax = _new_ax(None, (11, 4))
        for key, name in series:
            if key in rows[0]:
                ax.plot(range(len(rows)), [r[key] if r[key] is not None else math.nan for r in rows], marker=".", label=name)
        ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=90, fontsize=6)
        ax.set_ylabel("SQNR [dB]")
        ax.legend(fontsize=7)
        ax.set_title(f"{title} {lab}".strip(), fontsize=9)
        return fig
    import plotly.graph_objects as go

    fig = go.Figure()
    counts = []
    for i, r in enumerate(reps.values()):
        n = 0
        for key, name in series:
            if key not in r.rows[0]:
                continue
            fig.add_scatter(x=[row["label"] for row in r.rows], y=[row[key] for row in r.rows], mode="lines+markers", name=name,
                            visible=i == 0, line={"dash": "dot" if key.startswith("tensor") else "dash" if "self" in key else "solid"})  # fmt: skip
            n += 1
        counts.append(n)
    fig.update_layout(title=title, yaxis_title="SQNR [dB]", xaxis={"tickfont": {"size": 8}}, height=450,
                      legend={"orientation": "h", "y": -0.45})  # fmt: skip
    _dropdown(fig, list(reps), counts)
    return fig


def heatmap_views(
    studies: Mapping[str, Mapping[str, Any]], metric: str = "kl_on_self", cell_metric: str = "kl"
) -> dict[str, tuple[list[str], list[str], list[list[float | None]]]]:
    """Heatmap data for :func:`plot_block_group_heatmap` from ``{method: sensitivity_study(...) dict}``.

    Per method: ``"<method> · base bits, sum of <metric>"`` (per-quantizer measurements summed per
    cell) and, for every bit-width of the cell sweep, ``"<method> · cell at b bits"`` (the model's
    ``cell_metric`` when only that block x group cell is set to b bits, recalibrated).
    """
    views = {}
    for method, st in studies.items():
        rep = SensitivityReport.from_dict(st["report"])
        bits = sorted({q.bits for q in rep.quantizers})
        base = "/".join(str(b) for b in bits)
        views[f"{method} · {base} bits: sum of {metric}"] = rep.block_group_matrix(metric)
        for b in sorted({r["bits"] for r in st.get("cells", [])}):
            views[f"{method} · cell at {b} bits: {cell_metric}"] = sweep_matrix(st["cells"], b, cell_metric)
    return views


def plot_block_group_heatmap(
    views: Mapping[str, tuple[Sequence[str], Sequence[str], Sequence[Sequence[float | None]]]],
    log: bool = True,
    backend: str = "plotly",
    view: str | None = None,
    title: str | None = None,
    colorbar: str = "log10 KL",
):
    """Heatmap block x quantizer group; a dropdown switches between ``views`` (e.g. method and bit-width).

    ``views``: ``{label: (blocks, groups, Z)}`` (see :func:`heatmap_views`,
    ``SensitivityReport.block_group_matrix``, ``sweep_matrix``); ``None`` cells are blank.
    """
    _check_backend(backend)
    if not views:
        raise ValueError("no heatmap views to plot")
    title = title or "Sensitivity per block and quantizer group"
    if backend == "matplotlib":
        import numpy as np

        lab = view if view is not None else next(iter(views))
        blocks, groups, Z = views[lab]
        arr = np.array([[math.nan if v is None else _value(v, log) for v in row] for row in Z], dtype=float)
        fig, ax = _new_ax(None, (7, 0.4 * len(blocks) + 2))
        im = ax.imshow(arr, aspect="auto", cmap="magma_r")
        ax.set_xticks(range(len(groups)), [GROUPS.get(g, g) for g in groups], rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
        fig.colorbar(im, ax=ax, label=colorbar)
        ax.set_title(f"{title}: {lab}", fontsize=9)
        return fig
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (lab, (blocks, groups, Z)) in enumerate(views.items()):
        fig.add_heatmap(x=[GROUPS.get(g, g) for g in groups], y=list(blocks), z=[[_value(v, log) for v in row] for row in Z],
                        colorscale="Magma", reversescale=True, visible=i == 0, colorbar={"title": colorbar}, name=lab,
                        hovertemplate="%{y} · %{x}<br>%{z:.3g}<extra></extra>")  # fmt: skip
    labels = list(views)
    fig.update_layout(title=f"{title}: {labels[0]}", height=120 + 35 * len(next(iter(views.values()))[0]),
                      yaxis={"autorange": "reversed"})  # fmt: skip
    _dropdown(fig, labels, [1] * len(labels), [{"title": f"{title}: {lab}"} for lab in labels])
    return fig


def plot_bitwidth_sweep(sweeps: Mapping[str, Sequence[Mapping[str, Any]]], metric: str = "agree", backend: str = "plotly",
                        view: str | None = None, title: str | None = None):  # fmt: skip
    """``metric`` of the model vs the bit-width given to one quantizer group (others as quantized);
    ``sweeps``: ``{label: bitwidth_sweep(..., by="group") rows}`` (dropdown over labels)."""
    _check_backend(backend)
    if not sweeps:
        raise ValueError("no sweeps to plot")
    ylab = METRIC_LABELS.get(metric, metric)
    title = title or "Bit-width sweep per quantizer group (the other quantizers as quantized)"
    if backend == "matplotlib":
        lab = view if view is not None else next(iter(sweeps))
        fig, ax = _new_ax(None, (6, 4))
        for g in GROUPS:
            rows = sorted((r for r in sweeps[lab] if r.get("group") == g), key=lambda r: r["bits"])
            if rows:
                ax.plot([r["bits"] for r in rows], [r[metric] for r in rows], marker="o", label=GROUPS[g], color=_GROUP_COLORS[g])
        ax.set_xlabel("bits of the group")
        ax.set_ylabel(ylab)
        ax.legend(fontsize=7)
        ax.set_title(f"{title} {lab}".strip(), fontsize=9)
        return fig
    import plotly.graph_objects as go

    fig = go.Figure()
    counts = []
    for i, rows_all in enumerate(sweeps.values()):
        n = 0
        for g in GROUPS:
            rows = sorted((r for r in rows_all if r.get("group") == g), key=lambda r: r["bits"])
            if rows:
                fig.add_scatter(x=[r["bits"] for r in rows], y=[r[metric] for r in rows], mode="lines+markers", name=GROUPS[g],
                                line={"color": _GROUP_COLORS[g]}, visible=i == 0)  # fmt: skip
                n += 1
        counts.append(n)
    fig.update_layout(title=title, xaxis_title="bits of the group", yaxis_title=ylab, height=420)
    _dropdown(fig, list(sweeps), counts)
    return fig


def plot_mixed_precision(results: Mapping[str, Mapping[str, Any]], backend: str = "plotly", title: str | None = None):
    """Top-1 agreement with FP of the base model and of the mixed-precision proposal, per entry of
    ``results`` (``{label: MixedPrecisionResult.to_dict()}``), with the average bits in the hover."""
    _check_backend(backend)
    if not results:
        raise ValueError("no mixed-precision results to plot")
    labels = list(results)
    base = [results[k]["base_metrics"]["agree"] for k in labels]
    prop = [results[k]["metrics"]["agree"] for k in labels]
    title = title or "Agreement with FP: base vs mixed-precision proposal"
    if backend == "matplotlib":
        import numpy as np

        fig, ax = _new_ax(None, (7, 4))
        x = np.arange(len(labels))
        ax.bar(x - 0.2, base, 0.4, label="base")
        ax.bar(x + 0.2, prop, 0.4, label="mixed precision")
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("top-1 agreement with FP")
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        return fig
    import plotly.graph_objects as go

    hover = [f"{results[k]['base_avg_bits']:.2f} → {results[k]['avg_bits']:.2f} avg bits, {len(results[k]['upgraded'])} upgraded"
             for k in labels]  # fmt: skip
    fig = go.Figure()
    fig.add_bar(x=labels, y=base, name="base")
    fig.add_bar(x=labels, y=prop, name="mixed precision", hovertext=hover)
    lo = min(base + prop)
    fig.update_layout(
        title=title, yaxis={"title": "top-1 agreement with FP", "range": [max(0.0, lo - 0.05), 1.0]}, barmode="group", height=420
    )
    return fig
