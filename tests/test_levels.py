"""Levels told right: codes vs distinct vs used levels, one definition of "collapsed" (coverage and the
histogram agree), SULQ's integer-exponent bound, the eta trade-off, and the levels/attention artifacts."""

import math

import pytest
import torch

from isvit_viz import analysis, results, viz
from isvit_viz.models import build_from_spec
from isvit_viz.quant import SULQ, Log2Quantizer, UniformQuantizer, coverage
from isvit_viz.quant.coverage import lowest_level_threshold


# ----------------------------------------------------------------------------- coverage, hand-computed
def official_example():
    # method.md 1.6 (b): b = 3, eta = 0.01, calibrated on min 0 / max 0.9, official forward (9 codes)
    q = SULQ(3, mode="official", eta=0.01).calibrate(torch.tensor([0.0, 0.9]))
    x = torch.tensor([0.0, 0.002, 0.004, 0.02, 0.1, 0.3, 0.9])
    return q, x


def test_coverage_sulq_official_example_codes_distinct_used():
    q, x = official_example()
    cov = coverage(q, x)
    # exponents {-7, -6, -5, -4, -3, -3, -2, -1, 0}: 9 codes, 8 distinct levels 2^e - 0.01
    expected = torch.tensor([2.0**e - 0.01 for e in (-7, -6, -5, -4, -3, -2, -1, 0)])
    torch.testing.assert_close(cov.levels, expected, rtol=0, atol=1e-7)
    assert (cov.bits, cov.n_codes, cov.distinct_levels) == (3, 9, 8)
    assert cov.codes_per_level.tolist() == [1, 1, 1, 1, 2, 1, 1, 1]  # two codes share 2^-3 - 0.01
    # table of method.md: 0, 0.002 -> -0.0022; 0.004 -> 0.0056; 0.02 -> 0.0213; 0.1 -> 0.115; 0.3 -> 0.24; 0.9 -> 0.99
    assert cov.counts.tolist() == [2, 1, 1, 0, 1, 1, 0, 1]
    assert cov.used_levels == 6
    assert cov.frac_collapsed == 2 / 7 and cov.frac_next == 1 / 7
    assert cov.lowest_level == pytest.approx(2.0**-7 - 0.01, abs=1e-8) and cov.lowest_level < 0


def test_lowest_level_threshold_is_the_quantizers_decision_boundary():
    q, _ = official_example()
    # code 0 -> 1 where (log2(x + eta) - minv) / d = 1/2, d = (maxv - minv) / 8
    minv, maxv = math.log2(0.01), math.log2(0.91)
    assert lowest_level_threshold(q) == pytest.approx(2 ** (minv + (maxv - minv) / 16) - 0.01, rel=1e-5)
    # LQ 3-bit, s = 1: inputs round onto code 7 (2^-7) while -log2 x > 6.5
    lq = Log2Quantizer(3, scale=1.0).calibrate(torch.tensor([0.0, 1.0]))
    assert lowest_level_threshold(lq) == pytest.approx(2**-6.5, rel=1e-6)


def test_histogram_share_is_coverage_share_not_level_positions():
    q, x = official_example()
    vals = torch.cat([x, torch.full((3,), 0.01)])  # 0.01 lies between the two lowest POSITIVE levels' midpoint and the threshold
    cov = coverage(q, vals)
    assert cov.frac_collapsed == 2 / 10  # 0.01 is mapped onto 0.0056, not onto the negative lowest level
    fig = viz.plot_attention_histogram(vals, quantizer=q)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(lab.startswith("onto lowest level (-0.0022 < 0, off the log axis): 20.0%; next (0.0056): 40.0%") for lab in labels)
    pfig = viz.plot_attention_histogram(vals, quantizer=q, backend="plotly")
    assert pfig.layout.meta["collapsed"] == cov.frac_collapsed and pfig.layout.meta["next"] == cov.frac_next
    assert pfig.layout.meta["threshold"] == lowest_level_threshold(q)
    # the old cut, the geometric midpoint of the two lowest positive levels, would have counted 0.01 too
    assert math.sqrt(float(cov.levels[1] * cov.levels[2])) > 0.01


def test_sulq_extreme_levels_at_eta_one_half():
    # faithful to x_hat = 2^round(.) - eta: at eta = 0.5, x = 1 -> e = round(log2 1.5) = 1 -> 1.5; x = 0 -> 2^-1 - 0.5 = 0
    for mode in ("paper", "official"):
        q = SULQ(3, mode=mode, eta=0.5).calibrate(torch.tensor([0.0, 1.0]))
        assert q(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.5]


# ----------------------------------------------------------------------------- levels vs bits
def test_levels_vs_bits_sulq_bounded_by_exponent_range():
    x = torch.linspace(0, 0.999, 2001)
    rows = analysis.levels_vs_bits(x, bits=(2, 4, 6, 8))
    assert len(rows) == 6 * 4
    for r in rows:
        assert r["used_levels"] <= r["distinct_levels"] <= r["n_codes"]
        assert r["n_codes"] == 2 ** r["bits"] + (1 if r["label"] in ("log-sqrt2", "SULQ official") else 0)
        if r["label"].startswith("SULQ") and r["bits"] >= 4:
            # every integer exponent between the rounded extremes is hit, and nothing else
            e = r["eta"]
            assert r["distinct_levels"] == round(math.log2(0.999 + e)) - round(math.log2(e)) + 1
        if r["label"] == "UQ (uniform)":
            assert r["distinct_levels"] == 2 ** r["bits"]


def test_synthetic_softmax_six_bit_numbers_of_the_issue():
    # softmax over the last axis of torch.randn((8, 6, 197, 197), generator=manual_seed(0)) * 2.5
    x = analysis.synthetic_softmax(0)
    rows = {
        r["label"]: r
        for r in analysis.levels_vs_bits(
            x, bits=(6,), quantizers={k: analysis.LEVEL_QUANTIZERS[k] for k in ("UQ (uniform)", "SULQ paper", "SULQ official")}
        )
    }
    paper, official, uq = rows["SULQ paper"], rows["SULQ official"], rows["UQ (uniform)"]
    assert (paper["n_codes"], paper["distinct_levels"]) == (64, 18)
    assert official["distinct_levels"] == 9
    assert paper["eta"] == pytest.approx(1e-5)
    torch.testing.assert_close(torch.tensor(paper["top_levels"]), torch.tensor([0.125, 0.25, 0.5, 1.0]) - 1e-5, rtol=0, atol=1e-7)
    assert f"{paper['mse']:.1e}" == "3.4e-05" and f"{uq['mse']:.1e}" == "4.2e-06"


# ----------------------------------------------------------------------------- softmax-only quantized model, eta trade-off
@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_from_spec({"kind": "embedded", "name": "vit"})


@pytest.fixture(scope="module")
def images():
    return torch.randn(24, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_softmax_quantized_replaces_only_the_maps(vit, images):
    qs = [SULQ(3, eta=0.01) for _ in range(6)]
    analysis.calibrate_softmax_quantizers(vit, qs, images[:8])
    with analysis.softmax_quantized(vit, qs):
        st = analysis.capture_attention(vit, images[8:12], sample_per_layer=2000)
    for q, s in zip(qs, st.samples):  # every captured probability is one of that layer's levels
        assert torch.isin(s, q.levels()).all()
    with torch.no_grad():
        fp = vit(images[:4])
        with analysis.softmax_quantized(
            vit, [UniformQuantizer(16, init="minmax").calibrate(torch.tensor([0.0, 1.0])) for _ in range(6)]
        ):
            near = vit(images[:4])
        assert torch.equal(vit(images[:4]), fp)  # hooks removed
    torch.testing.assert_close(near, fp, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="one quantizer per attention module"):
        with analysis.softmax_quantized(vit, qs[:2]):
            pass


def test_eta_tradeoff_rows(vit, images):
    vals = analysis.capture_attention(vit, images[:4], sample_per_layer=1000).sample()
    labels = torch.arange(8) % 10
    t = analysis.eta_tradeoff(vals, 3, "paper", etas=(1e-3, 0.5), model=vit, calib_images=images[:8],
                              eval_images=images[8:16], eval_labels=labels, baselines={"UQ": ("uniform", {})}, progress=False)  # fmt: skip
    assert t["searched_eta"] == float(SULQ(3).calibrate(vals).eta)
    assert len(t["searched"]["eta_per_layer"]) == 6
    lo = t["rows"][0]
    cov = coverage(SULQ(3, eta=1e-3).calibrate(vals), vals)
    assert (lo["collapsed"], lo["next"], lo["mse"], lo["lowest_level"]) == (
        cov.frac_collapsed,
        cov.frac_next,
        cov.mse,
        cov.lowest_level,
    )
    assert all(0 <= r["agree_top1"] <= 1 and r["kl_to_fp"] >= 0 for r in t["rows"] + [t["searched"], t["baselines"]["UQ"]])
    fig = viz.plot_eta_tradeoff(t)
    assert len(fig.axes) == 4
    assert len(viz.plot_levels_vs_bits(analysis.levels_vs_bits(vals, bits=(3, 4))).axes) == 2


# ----------------------------------------------------------------------------- artifacts
def test_benchmark_smoke_writes_loadable_artifacts(tmp_path):
    from benchmarks import levels as bench

    bench.main(["--smoke", "--root", str(tmp_path)])
    att = results.load_artifact("attention", root=tmp_path)
    lv = results.load_artifact("levels", root=tmp_path)
    stats = analysis.attention_from_artifact(att)
    assert stats.n_layers == 6 and stats.n_values() == 16 * 3 * 50 * 50 * 6
    values = stats.sample()
    assert lv["n_values"] == values.numel() == 6 * 300
    # every levels number is reproducible from the attention artifact's stored values
    assert analysis.levels_vs_bits(values, lv["settings"]["bits"]) == lv["levels_vs_bits"]
    assert lv["eta_tradeoff"][0]["rows"] and "searched" in lv["eta_tradeoff"][0]


def test_committed_artifacts_load_and_match_the_code():
    att, lv = results.load_artifact("attention"), results.load_artifact("levels")
    values = analysis.attention_from_artifact(att).sample()
    assert lv["n_values"] == values.numel()
    subset = {k: analysis.LEVEL_QUANTIZERS[k] for k in ("LQ (log2)", "SULQ paper")}
    want = [r for r in lv["levels_vs_bits"] if r["label"] in subset and r["bits"] == 3]
    assert analysis.levels_vs_bits(values, (3,), subset) == want


@pytest.mark.notebook
def test_notebook01_results_cells_print_the_committed_numbers():
    import json
    from pathlib import Path

    import nbformat
    from nbclient import NotebookClient

    root = Path(__file__).resolve().parents[1]
    nb = nbformat.read(root / "notebooks" / "01_post_softmax_quantizers.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tags = [c.metadata.get("tags", []) for c in code]
    n_res = sum("results" in t for t in tags)
    assert "parameters" in tags[0] and n_res >= 4 and all("results" in t for t in tags[2 : 2 + n_res])
    nb.cells = code[: 2 + n_res]
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    text = "".join(o.get("text", "") or o.get("data", {}).get("text/markdown", "") for c in nb.cells[2:] for o in c.outputs)
    assert "Error" not in text
    raw = json.loads((root / "benchmarks" / "results" / "artifacts" / "levels.json").read_text())
    for r in raw["levels_vs_bits"]:
        if r["bits"] == 3 and r["label"] in ("LQ (log2)", "SULQ paper"):
            assert (
                f"3-bit {r['label']:14s}: lowest level {r['lowest_level']:+.2g} gets {r['collapsed']:.1%}, the next {r['next']:.1%}"
                in text
            )
    six = {r["label"]: r for r in raw["levels_vs_bits"] if r["bits"] == 6}
    assert (
        "| SULQ paper | 4 / 4 / 4 |" in text
        and f"{six['SULQ paper']['n_codes']} / {six['SULQ paper']['distinct_levels']} / " in text
    )
    t3 = raw["eta_tradeoff"][0]
    assert f"| {t3['bits']} | UQ (uniform) | {t3['baselines']['UQ (uniform)']['agree_top1']:.4g} |" in text
