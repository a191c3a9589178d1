"""ipywidgets front-ends. The logic lives in plain functions (testable without a browser); the
widgets only wire sliders to them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..analysis.attention import AttentionStats
from ..analysis.landscape import Landscape, landscape_for_setting
from ..quant import coverage
from .landscape_plots import plot_landscape
from .plots import plot_attention_histogram, quantizer_for

EXPLORER_QUANTIZERS = ("sulq", "log2", "uniform", "logsqrt2", "twin_uniform", "adalog")


def explore_quantizer(
    values: torch.Tensor, name: str = "sulq", bits: int = 4, eta: float = 1e-3, mode: str = "paper"
) -> tuple[Any, str]:
    """One explorer frame: histogram of ``values`` with the levels of quantizer ``name`` at ``bits``
    (SULQ uses the fixed shift ``eta``) and a one-line coverage summary. Returns ``(figure, text)``."""
    if values.numel() == 0:
        raise ValueError("empty attention capture: no values to explore")
    kw = {"eta": eta, "mode": mode} if name == "sulq" else {}
    q = quantizer_for(name, bits, values, **kw)
    cov = coverage(q, values)
    title = f"{name} {bits}-bit" + (f", eta={eta:.2g}" if name == "sulq" else "")
    fig = plot_attention_histogram(values, quantizer=q, title=title)
    text = f"RESULT {name} bits={bits} eta={eta:.3g}: {cov.summary()}"
    return fig, text


def _values(attn: AttentionStats | torch.Tensor, layer: int | None) -> torch.Tensor:
    return attn.sample(layer) if isinstance(attn, AttentionStats) else torch.as_tensor(attn).flatten()


def quantizer_explorer(attn: AttentionStats | torch.Tensor, layer: int | None = None, bits: int = 4, eta: float = 1e-3):
    """Sliders for bit-width (2-8) and the SULQ shift eta (log scale), a quantizer dropdown, and a
    live histogram + levels + coverage readout on real attention probabilities."""
    import ipywidgets as W
    from IPython.display import display

    vals = _values(attn, layer)
    w_bits = W.IntSlider(value=bits, min=2, max=8, description="bits", continuous_update=False)
    w_eta = W.FloatLogSlider(
        value=eta, base=10, min=-6, max=0, step=0.25, description="shift eta", readout_format=".1e", continuous_update=False
    )
    w_q = W.Dropdown(options=EXPLORER_QUANTIZERS, value="sulq", description="quantizer")
    out = W.Output()
    readout = W.HTML()

    def redraw(*_: Any) -> None:
        fig, text = explore_quantizer(vals, w_q.value, w_bits.value, w_eta.value)
        readout.value = f"<code>{text}</code>"
        with out:
            out.clear_output(wait=True)
            display(fig)  # the RESULT line is shown once, in the readout above (not printed here too)

    for w in (w_bits, w_eta, w_q):
        w.observe(redraw, names="value")
    redraw()
    box = W.VBox([W.HBox([w_q, w_bits, w_eta]), readout, out])
    box.redraw = redraw  # type: ignore[attr-defined]
    return box


def landscape_explorer(landscapes: Mapping[tuple[int, str, str], Landscape], log: bool = True):
    """Pick block, stage and configuration from precomputed landscapes keyed ``(block, stage, config)``."""
    import ipywidgets as W
    from IPython.display import display

    if not landscapes:
        raise ValueError("no landscapes to explore")
    keys = list(landscapes)

    def opts(i: int) -> Sequence[Any]:
        return sorted({k[i] for k in keys}, key=str)

    w_block = W.Dropdown(options=opts(0), description="block")
    w_stage = W.Dropdown(options=opts(1), description="stage")
    w_cfg = W.Dropdown(options=opts(2), description="config")
    out = W.Output()

    def redraw(*_: Any) -> None:
        key = (w_block.value, w_stage.value, w_cfg.value)
        with out:
            out.clear_output(wait=True)
            if key in landscapes:
                land = landscapes[key]
                display(plot_landscape(land, title=f"block {key[0]}, {key[1]}, {key[2]}", log=log))
                print(f"RESULT block={key[0]} stage={key[1]} config={key[2]} center={land.center:.4g} max={land.Z.max():.4g}")
            else:
                print(f"no landscape computed for {key}")

    for w in (w_block, w_stage, w_cfg):
        w.observe(redraw, names="value")
    redraw()
    box = W.VBox([W.HBox([w_block, w_stage, w_cfg]), out])
    box.redraw = redraw  # type: ignore[attr-defined]
    return box


def landscape_bits_explorer(
    fp_model: Any, images: torch.Tensor, block: int = 0, bits: int = 4, eta: float = 1e-3, steps: int = 7, extent: float = 0.5
):
    """Sliders for activation bit-width (2-8) and the SULQ shift eta: recompute and redraw the
    block-local landscape of configuration (c) for block ``block`` (a few seconds per change)."""
    import ipywidgets as W
    from IPython.display import display

    w_bits = W.IntSlider(value=bits, min=2, max=8, description="bits", continuous_update=False)
    w_eta = W.FloatLogSlider(
        value=eta, base=10, min=-6, max=0, step=0.25, description="shift eta", readout_format=".1e", continuous_update=False
    )
    readout = W.HTML()
    out = W.Output()

    def redraw(*_: Any) -> None:
        land = landscape_for_setting(fp_model, images, block, w_bits.value, w_eta.value, steps, extent)
        text = f"RESULT landscape bits={w_bits.value} eta={w_eta.value:.3g} centre={land.center:.5g} max={land.Z.max():.5g}"
        readout.value = f"<code>{text}</code>"
        with out:
            out.clear_output(wait=True)
            display(plot_landscape(land, title=f"block {block}, {w_bits.value}-bit activations, eta={w_eta.value:.1e}", log=True))

    for w in (w_bits, w_eta):
        w.observe(redraw, names="value")
    redraw()
    box = W.VBox([W.HBox([w_bits, w_eta]), readout, out])
    box.redraw = redraw  # type: ignore[attr-defined]
    return box
