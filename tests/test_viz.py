"""Visualization helpers: content checks (levels drawn, histogram mass, landscape centre, restoration)."""

import numpy as np
import pytest
import torch

from isvit_viz import analysis, viz
from isvit_viz.models import build_from_spec
from isvit_viz.quant import SULQ, Log2Quantizer


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_from_spec({"kind": "embedded", "name": "vit"})


@pytest.fixture(scope="module")
def images():
    return torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def stats(vit, images):
    return analysis.capture_attention(vit, images, batch_size=16)


def test_histogram_mass_equals_captured_values(stats):
    # 48 images x 3 heads x 50 x 50 probabilities x 6 layers
    assert stats.n_values() == 48 * 3 * 50 * 50 * 6
    assert stats.n_values(2) == 48 * 3 * 50 * 50
    assert int(stats.histogram(1, 2).sum()) == 48 * 50 * 50
    assert stats.row_max_mean.shape == (6,)
    assert len(stats.samples) == 6


def test_capture_works_on_quantized_model_and_removes_hooks(vit, images):
    import isvit_viz as iv

    res = iv.quantize(vit, "repq-vit", 4, 4, images, progress=False)
    st = analysis.capture_attention(res.model, images[:8])
    assert st.n_layers == 6
    # softmax rows still sum to one after capture; hooks are gone
    assert all(len(m.attn_drop._forward_hooks) == 0 for _, m in analysis.attention_modules(res.model))


def test_levels_drawn_equal_quantizer_levels(stats):
    q = Log2Quantizer(3).calibrate(stats.sample(3))
    fig = viz.plot_attention_histogram(stats, layer=3, quantizer=q)
    ax = fig.axes[0]
    (lines,) = [c for c in ax.collections if c.get_label().startswith("Log2Quantizer levels")]
    drawn = sorted(seg[0][0] for seg in lines.get_segments())
    expected = sorted(v for v in q.levels().tolist() if v > 0)
    np.testing.assert_allclose(drawn, expected, rtol=1e-6)
    pfig = viz.plot_attention_histogram(stats, layer=3, quantizer=q, backend="plotly")
    np.testing.assert_allclose(pfig.layout.meta["levels"], q.levels().tolist())
    np.testing.assert_allclose(sum(pfig.data[0].y), 1.0 - pfig.layout.meta["below_first_edge"], rtol=1e-9)


def test_bad_layer_head_and_empty_capture(stats):
    with pytest.raises(ValueError, match=r"layer must be in \[0, 5\]"):
        stats.histogram(6)
    with pytest.raises(ValueError, match=r"head must be in \[0, 2\]"):
        stats.histogram(0, 3)
    with pytest.raises(ValueError, match="empty attention capture"):
        viz.plot_attention_histogram(torch.empty(0))
    with pytest.raises(ValueError, match="empty attention capture"):
        viz.explore_quantizer(torch.empty(0))


def test_transfer_and_example_plots():
    fig = viz.plot_transfer_curves(3, etas=(1e-3, 0.1))
    assert len(fig.axes[0].lines) == 5  # LQ, UQ, two SULQ, identity
    assert len(viz.plot_transfer_curves(3, backend="plotly").data) == 7
    assert len(viz.plot_log_domain_example((3, 4)).axes) == 1


def test_coverage_table_and_heatmap(stats):
    rows = viz.coverage_table(stats.sample(2)[:5000], quantizers=("log2", "sulq"), bits=(3, 4))
    assert [(r["quantizer"], r["bits"]) for r in rows] == [("log2", 3), ("log2", 4), ("sulq", 3), ("sulq", 4)]
    assert all(r["used_levels"] <= r["distinct_levels"] <= r["n_codes"] for r in rows)
    fig = viz.plot_coverage_heatmap(rows)
    assert fig.axes[0].images[0].get_array().shape == (2, 2)


def test_block_landscape_centre_and_restoration(vit, images):
    models = analysis.fig3_models(vit, images, bits=4, init_images=32)
    assert set(models) == set(analysis.FIG3_CONFIGS)
    q = models["fp_w_a_channel"]
    before = {k: v.clone() for k, v in q.state_dict().items()}
    land = analysis.block_landscape(q, vit, block=2, images=images[:16], steps=5, extent=0.3)
    assert land.Z.shape == (5, 5)
    # the centre equals the unperturbed loss
    from isvit_viz.analysis.landscape import _block_io
    from isvit_viz.calib.recon import recon_loss

    x, y = _block_io(vit, vit.blocks[2], images[:16])
    with torch.no_grad():
        ref = float(recon_loss(q.blocks[2](x), y))
    assert land.center == pytest.approx(ref, rel=1e-6)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    with pytest.raises(ValueError, match=r"block must be in \[0, 5\]"):
        analysis.block_landscape(q, vit, block=9, images=images[:4])
    with pytest.raises(ValueError, match="range must be > 0"):
        analysis.block_landscape(q, vit, block=0, images=images[:4], extent=0)


def test_model_landscape_restores_and_matches_loss_landscapes(vit, images):
    import copy

    import loss_landscapes as ll
    from loss_landscapes.metrics import Loss

    labels = torch.arange(16) % 10
    metric = Loss(torch.nn.functional.cross_entropy, images[:16], labels)
    m = copy.deepcopy(vit)
    flags = [p.requires_grad for p in m.parameters()]
    before = [p.detach().clone() for p in m.parameters()]
    land = analysis.model_landscape(m, metric, extent=0.5, steps=3)
    with torch.no_grad():
        ref = float(torch.nn.functional.cross_entropy(m(images[:16]), labels))
    assert land.center == pytest.approx(ref, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert flags == [p.requires_grad for p in m.parameters()]
    # cross-check our line walk against loss_landscapes.linear_interpolation (t = 1/steps .. 1)
    end = copy.deepcopy(m)
    with torch.no_grad():
        for p in end.parameters():
            p.mul_(1.05)
    ours = analysis.linear_path(m, end, metric, steps=4)
    theirs = ll.linear_interpolation(copy.deepcopy(m), copy.deepcopy(end), metric, steps=4, deepcopy_model=True)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_loss_landscapes_upstream_quirks_still_present(vit):
    """Documents the upstream bugs our wrapper avoids, so an upstream change gets noticed."""
    import copy

    import loss_landscapes as ll
    from loss_landscapes.metrics import Loss

    x, y = torch.randn(4, 1, 28, 28), torch.arange(4)
    m = copy.deepcopy(vit)
    before = [p.detach().clone() for p in m.parameters()]
    ll.random_line(m, Loss(torch.nn.functional.cross_entropy, x, y), distance=1, steps=3, normalization="layer")
    # default deepcopy_model=False leaves the caller's parameters displaced
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    # filter normalization crashes on exactly-zero parameters (timm zero-inits some)
    with pytest.raises(ZeroDivisionError):
        ll.random_line(copy.deepcopy(vit), Loss(torch.nn.functional.cross_entropy, x, y), steps=3, normalization="filter")


def test_explorer_callbacks_redraw(stats):
    fig3, text3 = viz.explore_quantizer(stats.sample(4), "sulq", 3, 1e-3)
    fig6, text6 = viz.explore_quantizer(stats.sample(4), "sulq", 6, 1e-5)
    assert text3 != text6 and "bits=3" in text3 and "bits=6" in text6
    box = viz.quantizer_explorer(stats, layer=4)
    sliders = {w.description: w for w in box.children[0].children}
    before = box.children[1].value
    sliders["bits"].value = 7
    assert box.children[1].value != before and "bits=7" in box.children[1].value
    sliders["shift eta"].value = 1e-5
    assert "eta=1e-05" in box.children[1].value


def _widget_texts(box) -> list[str]:
    """Every text a widget tree shows: HTML/label values and the Output widgets' stored outputs."""
    texts = []
    for w in getattr(box, "children", ()):
        texts += _widget_texts(w)
    if hasattr(box, "outputs"):
        texts += [str(o) for o in box.outputs]
    elif isinstance(getattr(box, "value", None), str):
        texts.append(box.value)
    return texts


def test_explorer_readout_shown_once(stats, capsys):
    # outside a kernel, what the widget prints into its Output area goes to stdout: count it there too
    capsys.readouterr()
    box = viz.quantizer_explorer(stats, layer=4, bits=3)
    box.children[0].children[1].value = 5  # a redraw must not add a second copy either
    shown = "\n".join(_widget_texts(box)) + capsys.readouterr().out
    assert shown.count("RESULT") == 1 and "RESULT sulq bits=5" in box.children[1].value


def test_landscape_explorer(vit, images):
    land = analysis.Landscape(np.linspace(-1, 1, 3), np.linspace(-1, 1, 3), np.arange(9.0).reshape(3, 3) + 1)
    box = viz.landscape_explorer({(0, "stage1", "a"): land, (0, "stage3", "a"): land})
    with pytest.raises(ValueError):
        viz.landscape_explorer({})
    assert box.children[0].children[1].options == ("stage1", "stage3")


def test_save_figure_formats(tmp_path):
    fig = viz.plot_transfer_curves(3)
    for suf in (".png", ".svg"):
        p = viz.save_figure(fig, tmp_path / f"f{suf}")
        assert p.stat().st_size > 1000
    p = viz.save_figure(viz.plot_transfer_curves(3, backend="plotly"), tmp_path / "f.html")
    assert p.stat().st_size > 10_000
    with pytest.raises(ValueError, match="unsupported figure format"):
        viz.save_figure(fig, tmp_path / "f.gif")


def test_sulq_levels_on_real_shift():
    q = SULQ(4, eta=1e-4).calibrate(torch.tensor([0.0, 1.0]))
    fig = viz.plot_attention_histogram(torch.rand(1000) ** 6, quantizer=q)
    assert fig.axes[0].get_xscale() == "log"


def test_landscape_bits_explorer_redraws(vit, images, capsys):
    capsys.readouterr()
    box = viz.landscape_bits_explorer(vit, images[:32], block=1, bits=3, eta=1e-2, steps=3)
    # the RESULT line appears once: in the readout, not also printed into the Output area
    assert ("\n".join(_widget_texts(box)) + capsys.readouterr().out).count("RESULT") == 1
    sliders = {w.description: w for w in box.children[0].children}
    first = box.children[1].value
    assert "bits=3" in first
    sliders["bits"].value = 6
    assert "bits=6" in box.children[1].value and box.children[1].value != first
    sliders["shift eta"].value = 1e-4
    assert "eta=0.0001" in box.children[1].value
