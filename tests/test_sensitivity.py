"""Quantizer sensitivity: ranking of a deliberately broken quantizer, SQNR against hand computations,
the mixed-precision budget and its reported accuracy, resume from a checkpoint, and the benchmark's
artifact format (smoke mode)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
from torch import nn

import isvit_viz as iv
from isvit_viz.analysis import mixed_precision as mp
from isvit_viz.analysis import sensitivity as sens
from isvit_viz.evaluate import compare_to_fp
from isvit_viz.quant.base import Quantizer


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8, num_classes=10).eval()
    return iv.models.disable_fused_attention(m)


@pytest.fixture(scope="module")
def fp():
    return _tiny_vit()


@pytest.fixture(scope="module")
def calib():
    return torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 10, (24,), generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]


@pytest.fixture(scope="module")
def q4(fp, calib):
    return iv.quantize(fp, "reparam-logsqrt2", 4, 4, calib, progress=False).model  # no image quantizer: 27 quantizers


@pytest.fixture(scope="module")
def report4(q4, fp, data):
    return sens.analyze_sensitivity(q4, data, fp_model=fp, progress=False)


def _hand_order() -> list[str]:
    names = ["patch_embed.proj.weight_quantizer"]
    for b in range(2):
        p = f"blocks.{b}."
        names += [p + "attn.qkv.input_quantizer", p + "attn.qkv.weight_quantizer", p + "attn.matmul1.quantizer_a",
                  p + "attn.matmul1.quantizer_b", p + "attn.matmul2.quantizer_a", p + "attn.matmul2.quantizer_b",
                  p + "attn.proj.input_quantizer", p + "attn.proj.weight_quantizer", p + "mlp.fc1.input_quantizer",
                  p + "mlp.fc1.weight_quantizer", p + "mlp.fc2.input_quantizer", p + "mlp.fc2.weight_quantizer"]  # fmt: skip
    return names + ["head.input_quantizer", "head.weight_quantizer"]


def _only(model: nn.Module, keep: set[str]) -> nn.Module:
    """Independent of the library's bypass: a copy whose other quantizers are replaced by nn.Identity."""
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, Quantizer) and name not in keep:
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent), leaf, nn.Identity())
    return m


@torch.no_grad()
def _logits(model: nn.Module, data) -> torch.Tensor:
    return torch.cat([model(x) for x, _ in data])


def _sqnr(ref: torch.Tensor, z: torch.Tensor) -> float:
    ref, z = ref.double(), z.double()
    return 10 * math.log10(float(ref.square().sum()) / float((z - ref).square().sum()))


def test_forward_order_groups_and_elements(report4):
    qs = report4.quantizers
    assert [q.name for q in qs] == _hand_order()
    by_name = {q.name: q for q in qs}
    assert by_name["blocks.1.attn.matmul2.quantizer_a"].group == "post_softmax"
    assert by_name["blocks.0.mlp.fc1.input_quantizer"].group == "post_ln"
    assert by_name["blocks.0.mlp.fc2.input_quantizer"].group == "post_gelu"
    assert by_name["blocks.0.attn.matmul1.quantizer_b"].role == "k"
    assert (
        by_name["head.weight_quantizer"].block == "head" and by_name["patch_embed.proj.weight_quantizer"].block == "patch_embed"
    )
    # 17 tokens x 192 channels per image; fc2 input 17 x 768; P: 3 heads x 17 x 17; weights: their size
    assert by_name["blocks.0.attn.qkv.input_quantizer"].elements == 17 * 192
    assert by_name["blocks.0.mlp.fc2.input_quantizer"].elements == 17 * 768
    assert by_name["blocks.0.attn.matmul2.quantizer_a"].elements == 3 * 17 * 17
    assert by_name["blocks.0.attn.qkv.weight_quantizer"].elements == 576 * 192


def test_local_and_cumulative_sqnr_equal_hand_computation(q4, fp, data, report4):
    ref, off = _logits(fp, data), _logits(_only(q4, set()), data)
    names = _hand_order()
    for i, row in enumerate(report4.rows):
        local = _logits(_only(q4, {row["name"]}), data)
        cum = _logits(_only(q4, set(names[: i + 1])), data)
        assert row["sqnr_local_db"] == pytest.approx(_sqnr(ref, local), rel=1e-9, abs=1e-9)
        assert row["sqnr_cum_db"] == pytest.approx(_sqnr(ref, cum), rel=1e-9, abs=1e-9)
        # against the model's own unquantized output (all quantizers off)
        assert row["sqnr_local_self_db"] == pytest.approx(_sqnr(off, local), rel=1e-9, abs=1e-9)
        assert row["sqnr_cum_self_db"] == pytest.approx(_sqnr(off, cum), rel=1e-9, abs=1e-9)
    # task-level metrics of "only on" / "only off" match compare_to_fp on the hand-built models
    row = report4.rows[names.index("blocks.1.mlp.fc2.input_quantizer")]
    on = compare_to_fp(fp, _only(q4, {row["name"]}), data, progress=False)
    off = compare_to_fp(fp, _only(q4, set(names) - {row["name"]}), data, progress=False)
    assert (row["agree_on"], row["top1_on"]) == (on["agree_top1"], on["q_top1"])
    assert (row["agree_off"], row["top1_off"]) == (off["agree_top1"], off["q_top1"])
    assert row["kl_on"] == pytest.approx(on["kl_to_fp"], rel=1e-9) and row["kl_off"] == pytest.approx(off["kl_to_fp"], rel=1e-9)
    on_self = compare_to_fp(_only(q4, set()), _only(q4, {row["name"]}), data, progress=False)
    assert row["kl_on_self"] == pytest.approx(on_self["kl_to_fp"], rel=1e-9)
    # the last cumulative configuration is the quantized model itself
    assert (
        report4.rows[-1]["sqnr_cum_db"] == report4.baseline["all_on"]["sqnr_db"] == pytest.approx(_sqnr(ref, _logits(q4, data)))
    )


def test_tensor_sqnr_equals_hand_computation(q4, data, report4):
    name = "blocks.1.mlp.fc2.input_quantizer"
    qz = q4.get_submodule(name)
    ref_in, on_out = [], []
    off = _only(q4, set())
    h1 = off.get_submodule("blocks.1.mlp.fc2").register_forward_pre_hook(lambda m, a: ref_in.append(a[0]))
    h2 = qz.register_forward_hook(lambda m, a, o: on_out.append(o))
    _logits(off, data), _logits(q4, data)
    h1.remove(), h2.remove()
    x, y_on = torch.cat([t.flatten() for t in ref_in]), torch.cat([t.flatten() for t in on_out])
    with torch.no_grad():
        y_local = torch.cat([qz(t).flatten() for t in ref_in])
    row = next(r for r in report4.rows if r["name"] == name)
    assert row["tensor_sqnr_local_db"] == pytest.approx(_sqnr(x, y_local), rel=1e-9)
    assert row["tensor_sqnr_cum_db"] == pytest.approx(_sqnr(x, y_on), rel=1e-9)
    assert row["tensor_sqnr_cum_db"] < row["tensor_sqnr_local_db"]  # errors of the quantizers before it add up


@pytest.mark.parametrize("broken", ["blocks.0.mlp.fc2.input_quantizer", "blocks.1.attn.qkv.weight_quantizer"])
def test_broken_quantizer_ranks_first(fp, calib, data, broken):
    q = iv.quantize(fp, "minmax", 8, 8, calib, progress=False).model
    sens.apply_precision(q, {broken: 2}, calib)
    rep = sens.analyze_sensitivity(q, data, fp_model=fp, measure=("on", "off", "tensor"), progress=False)
    for metric in ("kl_on_self", "kl_on", "sqnr_local_db", "sqnr_local_self_db", "kl_off_recovery", "tensor_sqnr_local_db"):
        assert rep.worst(1, by=metric)[0]["name"] == broken, metric
    top = rep.worst(10)
    assert [r["rank"] for r in top] == list(range(1, 11)) and all(
        a["kl_on_self"] >= b["kl_on_self"] for a, b in zip(top, top[1:])
    )


def test_group_views_and_bypass_restores(q4, fp, data, report4):
    groups = {g["group"]: g for g in report4.groups}
    assert set(groups) == set(sens.GROUPS) and sum(g["n_quantizers"] for g in groups.values()) == 27
    assert report4.baseline["all_off"]["sqnr_db"] > 80  # reparameterization is exact up to float round-off
    before = _logits(q4, data)
    with pytest.raises(RuntimeError):
        with sens.quantizers_enabled(q4, set()):
            raise RuntimeError("boom")
    assert torch.equal(_logits(q4, data), before) and not any("forward" in m.__dict__ for m in q4.modules())
    with pytest.raises(ValueError, match="unknown quantizer"):
        with sens.quantizers_enabled(q4, {"blocks.9.nope"}):
            pass


def test_sweep_at_base_bits_is_the_model_and_restores_state(q4, fp, data, calib, report4):
    state = {k: v.clone() for k, v in q4.state_dict().items()}
    before = _logits(q4, data)
    rows = sens.bitwidth_sweep(q4, data, calib, bits=(2, 4), fp_model=fp, progress=False)
    base = {k: v for k, v in report4.baseline["all_on"].items()}
    for r in rows:
        if r["bits"] == 4:
            assert {k: r[k] for k in base} == base
    assert all(r["kl"] > base["kl"] for r in rows if r["bits"] == 2)
    assert torch.equal(_logits(q4, data), before)
    assert all(torch.equal(v, state[k]) for k, v in q4.state_dict().items())
    assert all(q.bits == 4 for q in q4.modules() if isinstance(q, Quantizer))


@pytest.mark.parametrize("weighting", ["count", "elements"])
def test_mixed_precision_budget_and_direct_evaluation(q4, fp, data, calib, report4, weighting):
    res = mp.mixed_precision_search(
        q4, data, calib, extra_bits=0.5, weighting=weighting, gains=report4, fp_model=fp, progress=False
    )
    assert res.upgraded, "the search should upgrade at least one quantizer"
    assert res.avg_bits <= res.budget_avg_bits + 1e-9 and res.budget_avg_bits == pytest.approx(res.base_avg_bits + 0.5)
    assert res.avg_bits == pytest.approx(mp.average_bits(report4.quantizers, res.bits, weighting))
    assert res.metrics["kl"] < res.base_metrics["kl"]
    direct_model = sens.apply_precision(copy.deepcopy(q4), res.bits, calib)
    direct = compare_to_fp(fp, direct_model, data, progress=False)
    assert res.metrics["agree"] == direct["agree_top1"] and res.metrics["top1"] == direct["q_top1"]
    assert res.metrics["kl"] == pytest.approx(direct["kl_to_fp"], rel=1e-9)
    round_trip = mp.MixedPrecisionResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert round_trip.bits == res.bits and round_trip.metrics == res.metrics


def test_resume_skips_finished_measurements(q4, fp, data, tmp_path):
    ckpt = tmp_path / "sens.json"
    first = sens.analyze_sensitivity(q4, data, fp_model=fp, measure=("on", "off"), checkpoint=ckpt, progress=False)
    calls = []
    h = q4.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        again = sens.analyze_sensitivity(q4, data, fp_model=fp, measure=("on", "off"), checkpoint=ckpt, progress=False)
        assert len(calls) == 1 + len(data)  # the pass that lists the quantizers, the all-off logits
        payload = json.loads(ckpt.read_text())
        dropped = ["on|blocks.0.mlp.fc2.input_quantizer", "off|head.weight_quantizer"]
        for k in dropped:
            del payload["results"][k]
        ckpt.write_text(json.dumps(payload))
        calls.clear()
        third = sens.analyze_sensitivity(q4, data, fp_model=fp, measure=("on", "off"), checkpoint=ckpt, progress=False)
        assert len(calls) == 1 + len(data) + len(dropped) * len(data)
    finally:
        h.remove()
    assert again.rows == first.rows and third.rows == first.rows
    with pytest.raises(ValueError, match="another model"):
        sens.analyze_sensitivity(q4, data[:2], fp_model=fp, measure=("on",), checkpoint=ckpt, progress=False)


def test_bad_inputs(q4, fp, data):
    with pytest.raises(ValueError, match="re-iterable"):
        sens.analyze_sensitivity(q4, iter(data), fp_model=fp, progress=False)
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    shuffled = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="shuffled"):
        sens.analyze_sensitivity(q4, shuffled, fp_model=fp, measure=("on",), progress=False)
    with pytest.raises(ValueError, match="unknown measurements"):
        sens.analyze_sensitivity(q4, data, fp_model=fp, measure=("nope",), progress=False)
    with pytest.raises(ValueError, match="no quantizers"):
        sens.analyze_sensitivity(fp, data, progress=False)
    with pytest.raises(ValueError, match="needs calib"):
        sens.apply_precision(copy.deepcopy(q4), {"blocks.0.mlp.fc2.input_quantizer": 8})
    with pytest.raises(ValueError, match="weighting"):
        mp.average_bits([], weighting="bytes")


def test_plots_from_report_dicts(report4, q4, fp, data, calib):
    from isvit_viz.viz import sensitivity_plots as sp

    study = {
        "report": report4.to_dict(),
        "cells": sens.bitwidth_sweep(q4, data, calib, bits=(2,), by="cell", fp_model=fp, progress=False),
    }
    reps = {"a": study["report"], "b": report4}
    fig = sp.plot_quantizer_sensitivity(reps, "kl_on", log=True)
    assert len(fig.data) == 10 and len(fig.layout.updatemenus[0].buttons) == 2
    assert sum(len(t.x) for t in fig.data if t.visible) == 27
    views = sp.heatmap_views({"m": study})
    assert list(views) == ["m · 4 bits: sum of kl_on_self", "m · cell at 2 bits: kl"]
    blocks, groups, Z = views["m · 4 bits: sum of kl_on_self"]
    assert blocks == ["patch_embed", "blocks.0", "blocks.1", "head"] and groups == list(sens.GROUPS)
    assert Z[1][groups.index("post_gelu")] == pytest.approx(report4.rows[11]["kl_on_self"])
    assert Z[0][groups.index("post_ln")] is None
    heat = sp.plot_block_group_heatmap(views)
    assert len(heat.layout.updatemenus[0].buttons) == 2
    assert sp.plot_block_group_heatmap(views, backend="matplotlib") is not None
    assert sp.plot_quantizer_sensitivity(reps, backend="matplotlib", view="a") is not None
    assert len(sp.plot_sqnr_profile(reps).data) == 12
    assert sp.plot_bitwidth_sweep({"m": [{"group": "weight", "bits": 2, "agree": 0.5}]}).data[0].y == (0.5,)


def test_benchmark_smoke_writes_artifact(tmp_path):
    from benchmarks import sensitivity as bench

    bench.main(["--smoke", "--results-root", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    payload = iv.results.load_artifact("sensitivity", root=tmp_path)
    assert set(payload["methods"]) == {"isvit", "reparam-logsqrt2"}
    for st in payload["methods"].values():
        rep = sens.SensitivityReport.from_dict(st["report"])
        assert len(rep.rows) == 75 and len(rep.worst(10)) == 10
        m = st["mixed_precision"]["count+0.5"]
        assert m["avg_bits"] <= m["budget_avg_bits"] + 1e-9
        assert st["validation"]["base"]["n"] == st["validation"]["mixed_precision"]["n"] > 0
    assert payload["settings"]["smoke"] is True and payload["command"].startswith("python -m benchmarks.sensitivity")


@pytest.mark.notebook
def test_notebook_05_opens_on_the_committed_artifact():
    """Notebook 05's results cells (right after setup) print the committed artifact's numbers."""
    from pathlib import Path

    import nbformat
    from nbclient import NotebookClient

    root = Path(__file__).resolve().parents[1]
    nb = nbformat.read(root / "notebooks" / "05_sensitivity.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    n_res = sum("results" in c.metadata.get("tags", []) for c in code)
    assert "parameters" in code[0].metadata["tags"] and n_res >= 3
    assert all("results" in c.metadata.get("tags", []) for c in code[2 : 2 + n_res])
    nb.cells = code[: 2 + n_res]
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    outs = [o for c in nb.cells[2:] for o in c.outputs]
    assert not [o for o in outs if o.output_type == "error"]
    text = "".join(o.get("text", "") or o.get("data", {}).get("text/markdown", "") for o in outs)
    payload = json.loads((root / "benchmarks" / "results" / "artifacts" / "sensitivity.json").read_text())
    for st in payload["methods"].values():
        first = st["worst10"][0]
        assert f"| 1 | {first['label']} | {first['group']} | {first['type']} | {first['kl_on_self']:.4g} |" in text
        vb, vm = st["validation"]["base"]["agree_top1"], st["validation"]["mixed_precision"]["agree_top1"]
        assert f"held-out agreement {100 * vb:.2f} % -> {100 * vm:.2f} %" in text
