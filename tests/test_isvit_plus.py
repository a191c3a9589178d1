"""``isvit+`` (issue #17 item 3): our own combination, registered with its provenance; each ablation
switch changes the modules or stages it claims to; the ablation benchmark resumes cell by cell."""

from __future__ import annotations

import json

import pytest
import torch

import isvit_viz as iv
from isvit_viz.calib import METHODS, ChooseSoftmax, Reconstruct, describe
from isvit_viz.calib.choose import softmax_matmuls
from isvit_viz.calib.methods import ISVIT_PLUS_CANDIDATES, isvit_plus
from isvit_viz.experiments import run_grid
from isvit_viz.models import load_embedded
from isvit_viz.quant.registry import QUANTIZERS
from isvit_viz.quant.sulq import SULQ

KW = dict(iters=2, batch_size=16, seed=0, progress=False)


@pytest.fixture(scope="module")
def vit():
    model, splits = load_embedded("vit")
    return model, splits.calib_tensors(32, seed=0)[0], splits


def test_isvit_plus_is_registered_as_our_own_combination():
    m = METHODS["isvit+"]
    kinds = [type(s).__name__ for s in m.stages]
    assert kinds == ["Calibrate", "ChooseSoftmax", "Reconstruct", "Reparameterize", "Requantize", "Reconstruct"]
    assert m.stages[1].candidates == ISVIT_PLUS_CANDIDATES == ("sulq", "uniform", "logsqrt2")
    s1, s3 = m.stages[2], m.stages[5]
    assert (s1.inputs, s1.weights, s1.act_drop_prob) == ("fp", "fp", 0.0)  # SOS stage one as I&S-ViT
    assert (s3.inputs, s3.weights, s3.act_drop_prob, s3.rounding, s3.loss) == ("quantized", "quantized", 0.0, "ste", "mse")
    assert (m.softmax, m.softmax_kwargs, m.post_ln) == ("sulq", {"mode": "paper"}, "channel")
    rows = {r["setting"]: r for r in describe("isvit+")}
    # nothing is a deviation (the name promises our combination); the additions give their reason
    assert not [k for k, r in rows.items() if r["deviation"]]
    assert rows["choose_softmax.candidates"]["source"].startswith("our choice, because")
    assert "QDrop" in rows["stage3.act_drop_prob"]["source"]  # measured off: the source says why
    # without the choice, isvit+ is I&S-ViT: the same placement and stages
    plain = isvit_plus(choose_softmax=False)
    assert plain.stages == METHODS["isvit"].stages and plain.quant_config(4, 4) == METHODS["isvit"].quant_config(4, 4)
    assert "(differs from the I&S-ViT paper)" in rows["stage2.zero_point"]["source"]  # isvit's own choices stay visible


def test_isvit_plus_installs_and_records_the_chosen_quantizers(vit):
    model, calib, _ = vit
    res = iv.quantize(model, "isvit+", 4, 4, calib, **KW)
    chosen = {u["unit"]: u["softmax_choice"] for u in res.unit_losses if "softmax_choice" in u}
    mms = dict(softmax_matmuls(res.model))
    assert set(chosen) == set(mms) and len(mms) == 6
    for path, name in chosen.items():  # the module in place is the recorded choice, not the placement's SULQ
        assert type(mms[path].quantizer_a) is QUANTIZERS[name]
    recon = [s for s in res.config["stages"] if s["stage"] == "Reconstruct"]
    assert [s["act_drop_prob"] for s in recon] == [0.0, 0.0]


def test_without_choice_every_attention_keeps_sulq(vit):
    model, calib, _ = vit
    m = isvit_plus(choose_softmax=False, name="plus-sulq")
    assert not any(isinstance(s, ChooseSoftmax) for s in m.stages)
    res = iv.quantize(model, m, 4, 4, calib, **KW)
    assert all(type(mm.quantizer_a) is SULQ for _, mm in softmax_matmuls(res.model))
    assert not any("softmax_choice" in u for u in res.unit_losses)


def _after_calibration(model, method, calib) -> tuple[bool, int]:
    """Block 0's qkv layer when the ``calibrated`` callback runs (before any reconstruction): whether its
    weights are quantized, and how many scales its input quantizer has."""
    seen = {}

    def look(stage, q):
        qkv = q.blocks[0].attn.qkv
        seen.setdefault(stage, (qkv.weight_quant, qkv.input_quantizer.scale.numel()))

    iv.quantize(model, method, 4, 4, calib, callbacks=look, **KW)
    return seen["calibrated"]


def test_without_sos_one_reconstruction_with_layer_wise_post_ln(vit):
    model, calib, _ = vit
    m = isvit_plus(sos=False, name="plus-no-sos")
    assert [type(s).__name__ for s in m.stages] == ["Calibrate", "ChooseSoftmax", "Reconstruct"]
    assert _after_calibration(model, m, calib) == (True, 1)  # weights quantized, post-LN input per tensor
    assert _after_calibration(model, "isvit+", calib) == (False, 192)  # isvit+: FP weights, channel-wise until stage 2


@pytest.mark.parametrize(
    "kw,field,value",
    [({"rounding": "adaround"}, "rounding", "adaround"), ({"act_drop_prob": 0.5}, "act_drop_prob", 0.5)],
)
def test_switches_change_only_the_quantized_weight_reconstruction(kw, field, value):
    base, m = isvit_plus(), isvit_plus(name="v", **kw)
    recon = [(a, b) for a, b in zip(base.stages, m.stages) if isinstance(a, Reconstruct)]
    assert getattr(recon[0][1], field) == getattr(recon[0][0], field)  # stage one untouched
    assert getattr(recon[1][1], field) == value != getattr(recon[1][0], field)
    assert [type(s) for s in base.stages] == [type(s) for s in m.stages]


def test_run_grid_takes_a_composed_method_and_names_its_checkpoints(vit, tmp_path):
    model, calib, splits = vit
    m = isvit_plus(sos=False, name="plus-grid")
    (rec,) = run_grid(model, calib, splits.test(32), [m], [(4, 4)], iters=1, checkpoint_root=tmp_path, batch_size=16)
    assert rec["method"] == "plus-grid" and rec["paper_deit_s_top1"] is None
    assert sorted(rec["softmax_choice"]) == [f"blocks.{i}.attn" for i in range(6)]  # what each attention got
    assert (tmp_path / "plus-grid_w4a4_s0").is_dir()


def test_ablation_benchmark_writes_one_cell_per_run_and_resumes(tmp_path):
    from benchmarks import isvit_plus as bench

    torch.manual_seed(0)
    argv = ["--smoke", "--out", str(tmp_path), "--bits", "4", "--variants", "isvit+", "no-sos"]
    bench.main(argv)
    cells = sorted(p.name for p in tmp_path.glob("*.json"))
    assert cells == ["vit_isvit+_w4_s0.json", "vit_no-sos_w4_s0.json"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
    bench.main(argv)  # every cell exists: nothing reruns
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")} == before
    run = json.loads((tmp_path / "vit_no-sos_w4_s0.json").read_text())["run"]
    assert run["method"] == "isvit+_no-sos" and 0 <= run["agree_top1"] <= 1
    table = bench.report(tmp_path, accuracy=None)
    assert f"| vit | no-sos | {bench.VARIANTS['no-sos'][0]} | – | {100 * run['agree_top1']:.1f} /" in table


def test_readme_isvit_plus_table_is_the_committed_measurements():
    from pathlib import Path

    from benchmarks import isvit_plus as bench

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- isvit-plus-table:begin -->\n")[1].split("\n<!-- isvit-plus-table:end -->")[0]
    assert table == bench.report(bench.RESULTS)  # regenerate: python -m benchmarks.isvit_plus --report
    assert any(c["variant"] == "isvit+" for c in bench.load_cells(bench.RESULTS))
