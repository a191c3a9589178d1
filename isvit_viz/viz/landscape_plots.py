"""Plots of loss landscapes computed by :mod:`isvit_viz.analysis.landscape`."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..analysis.landscape import Landscape
from .plots import _check_backend, _new_ax


def plot_landscape(land: Landscape, backend: str = "matplotlib", title: str | None = None, ax: Any = None, log: bool = False):
    """Contour plot (matplotlib) or 3-D surface (plotly) of a :class:`Landscape`."""
    _check_backend(backend)
    Z = np.log10(np.maximum(land.Z, 1e-12)) if log else land.Z
    title = title or f"loss landscape ({land.meta.get('kind', '')})"
    if backend == "plotly":
        import plotly.graph_objects as go

        fig = go.Figure(go.Surface(x=land.betas, y=land.alphas, z=Z, colorscale="Viridis"))
        fig.update_layout(
            title=title,
            scene={
                "xaxis_title": "perturbation 2",
                "yaxis_title": "perturbation 1",
                "zaxis_title": "log10 loss" if log else "loss",
            },
        )
        return fig
    fig, ax = _new_ax(ax, (5, 4))
    cs = ax.contourf(land.betas, land.alphas, Z, levels=20, cmap="viridis")
    ax.contour(land.betas, land.alphas, Z, levels=10, colors="white", linewidths=0.4)
    ax.plot([0], [0], "r+", ms=10)
    ax.set_xlabel("perturbation 2")
    ax.set_ylabel("perturbation 1")
    ax.set_title(title, fontsize=9)
    fig.colorbar(cs, ax=ax, label="log10 loss" if log else "loss")
    return fig
