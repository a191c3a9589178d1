"""Methods as data: stage validation, provenance of every setting, the ``methods`` CLI, user-composed
methods end to end, and where each reconstruction stage reads its inputs (embedded ViT, tiny settings)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import pytest
import torch

import isvit_viz as iv
from isvit_viz.calib import (
    METHODS,
    Calibrate,
    HessianCalibrate,
    Method,
    Mix,
    Reconstruct,
    Reparameterize,
    Requantize,
    Stage,
    describe,
    engine,
    resolve_method,
)
from isvit_viz.cli import main
from isvit_viz.quant.modules import QuantLinear

KW = dict(iters=2, batch_size=16, seed=0, progress=False)


@pytest.fixture(scope="module")
def data():
    model, splits = iv.load_embedded("vit")
    return model, splits.calib_tensors(32, seed=0)[0], splits.test_tensors(16)[0]


def _is_quantized_model(model: torch.nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


# --------------------------------------------------------------------------- provenance and the CLI
def _all_configs():
    yield from METHODS.items()
    yield "isvit sos=False", resolve_method("isvit", sos=False)
    yield "isvit softmax=log2", resolve_method("isvit", softmax_quantizer="log2")


@pytest.mark.parametrize("name,method", list(_all_configs()), ids=lambda x: x if isinstance(x, str) else "")
def test_describe_gives_every_setting_a_source(name, method):
    rows = describe(method)
    keys = [r["setting"] for r in rows]
    placement = ["softmax", "softmax_kwargs", "post_ln", "post_gelu", "weight_granularity", "act_init", "weight_init",
                 "input_bits", "reduction_post_ln", "weight_percentiles", "first_last_bits", "matmul_granularity", "mlp_act"]  # fmt: skip
    stage_keys = [f"{s.name}.{k}" for s in method.stages for k in s.settings()]
    assert keys == ["stages", *placement, *stage_keys]  # every field of the placement and of every stage
    assert [k for k, r in zip(keys, rows) if not r["source"]] == []  # no setting without a source
    assert set(method.provenance) == set(keys)  # and no source for a setting that does not exist
    assert {r["setting"]: r["value"] for r in rows}["post_ln"] == method.post_ln


def test_isvit_deviations_are_marked():
    dev = {name: {r["setting"] for r in describe(name) if r["deviation"]} for name in ("isvit", "isvit-official")}
    # the three non-paper choices of `isvit`: integer zero-point, 256 init images, eta grid down to 1e-6
    assert dev["isvit"] == {"stage2.zero_point", "calibrate.images", "softmax_kwargs"}
    assert dev["isvit-official"] == set()  # every setting from the paper or the released code
    rows = {r["setting"]: r for r in describe("isvit")}
    assert rows["stage2.zero_point"]["value"] == "round" and "Eq. 15" in rows["stage2.zero_point"]["source"]
    assert rows["calibrate.images"]["value"] == 256 and "1024" in rows["calibrate.images"]["source"]
    assert "1e-6" in rows["softmax_kwargs"]["source"] and "1e-3" in rows["softmax_kwargs"]["source"]


def test_cli_methods_prints_markdown_tables(capsys):
    assert main(["methods", "isvit"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## isvit\n") and "| setting | value | source |" in out
    assert "| stage2.zero_point | 'round' | **deviation**: our choice, because" in out
    assert "| stage1.inputs | 'fp' | official code quant/data_utils.py GetLayerInpOut_T" in out
    assert sum(line.startswith("| ") for line in out.splitlines()) == 1 + len(describe("isvit"))  # header + one row each
    assert main(["methods"]) == 0
    assert [line[3:] for line in capsys.readouterr().out.splitlines() if line.startswith("## ")] == list(METHODS)
    with pytest.raises(SystemExit):
        main(["methods", "nope"])


# --------------------------------------------------------------------------- bad input
def _m(*stages: Stage, **kw) -> Method:
    return Method(name="bad", stages=stages, **kw)


BAD = [
    (lambda: _m(), r"stages: the stage list is empty"),
    (lambda: _m(Reconstruct(name="fit", weights="fp")), r"stages\[0\] \(Reconstruct 'fit'\): stage order: reconstruction before calibration"),
    (lambda: _m(Reparameterize()), r"stages\[0\] \(Reparameterize 'reparameterize'\): stage order"),
    (lambda: _m(Calibrate(), Reparameterize(name="fold"), post_ln="layer"), r"stages\[1\] \(Reparameterize 'fold'\): post_ln"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", weights="fp", loss="kl")), r"stages\[1\] \(Reconstruct 'fit'\): loss: unknown loss 'kl'"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", rounding="nearest"), Requantize()), r"stages\[1\] \(Reconstruct 'fit'\): rounding: unknown rounding 'nearest'"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", weights="fp", iters=-1)), r"stages\[1\] \(Reconstruct 'fit'\): iters: must be None or an int >= 0, got -1"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", weights="fp", inputs=Mix(0.0))), r"stages\[1\] \(Reconstruct 'fit'\): inputs: Mix\(p\) needs 0 < p < 1"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", weights="fp", inputs=Mix(1.0))), r"stages\[1\] \(Reconstruct 'fit'\): inputs: Mix\(p\)"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", weights="fp", inputs=Mix(1.5))), r"stages\[1\] \(Reconstruct 'fit'\): inputs: .*p=1.5"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", inputs="teacher", weights="fp")), r"stages\[1\] \(Reconstruct 'fit'\): inputs"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit")), r"stages\[1\] \(Reconstruct 'fit'\): weights: 'quantized' needs calibrated"),
    (lambda: _m(Calibrate(weights="calibrate"), Reparameterize(), Reconstruct(name="fit")), r"stages\[2\] \(Reconstruct 'fit'\): weights"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", weights="fp", rounding="adaround")), r"stages\[1\] \(Reconstruct 'fit'\): rounding: 'adaround'"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", weights="fp", act_scale_lr=-1.0)), r"stages\[1\] \(Reconstruct 'fit'\): act_scale_lr"),
    (lambda: _m(Calibrate(images=0)), r"stages\[0\] \(Calibrate 'calibrate'\): images"),
    (lambda: _m(Calibrate(), Reparameterize(name="x"), Reparameterize(name="x")), r"stages\[2\] \(Reparameterize 'x'\): name: setting 'x.zero_point' repeats stages\[1\]"),
    (lambda: _m(Calibrate(), "recalibrate"), r"stages\[1\]: 'recalibrate' is not a stage"),
    (lambda: _m(Calibrate(), softmax="nope"), r"unknown softmax quantizer 'nope'"),
    (lambda: _m(Calibrate(weights="teacher")), r"stages\[0\] \(Calibrate 'calibrate'\): weights: must be one of"),
    (lambda: _m(Calibrate(weights="quantized")), r"stages\[0\] \(Calibrate 'calibrate'\): weights: 'quantized' needs calibrated"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", weights="fp", activations="int")), r"stages\[1\] \(Reconstruct 'fit'\): activations: must be one of"),
    (lambda: _m(Requantize(), Reconstruct(name="fit", weights="fp", activations="fp")), r"stages\[1\] \(Reconstruct 'fit'\): activations: .*nothing is quantized"),
    (lambda: _m(Requantize(), Reconstruct(name="fit")), r"stages\[1\] \(Reconstruct 'fit'\): stage order: reconstruction before calibration"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", weights="fp", loss="lp", loss_p=0.0)), r"stages\[1\] \(Reconstruct 'fit'\): loss_p: must be a positive"),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", weights="fp", loss_p=2.4)), r"stages\[1\] \(Reconstruct 'fit'\): loss_p: .*2 unless loss=.lp."),
    (lambda: _m(Calibrate(), Reconstruct(name="fit", weights="fp", rounding="fixed")), r"stages\[1\] \(Reconstruct 'fit'\): rounding: 'fixed' trains no weights"),
    (lambda: _m(Calibrate(), HessianCalibrate(), post_ln="layer"), r"stages\[1\] \(HessianCalibrate 'hessian'\): stage order: .*first calibrating stage"),
    (lambda: _m(HessianCalibrate(), Requantize(), post_ln="layer"), r"stages\[1\] \(Requantize 'requantize'\): stage order: .*overwrite"),
    (lambda: _m(HessianCalibrate(), Calibrate(), post_ln="layer"), r"stages\[1\] \(Calibrate 'calibrate'\): stage order: .*overwrite"),
    (lambda: _m(HessianCalibrate(candidates=0), post_ln="layer"), r"stages\[0\] \(HessianCalibrate 'hessian'\): candidates"),
]  # fmt: skip


@pytest.mark.parametrize("build,match", BAD, ids=[m for _, m in BAD])
def test_bad_stage_lists_raise_naming_stage_and_field(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_quantize_refuses_bad_input_before_any_work(data, monkeypatch):
    model, calib, _ = data
    monkeypatch.setattr(engine, "calibrate_activations", lambda *a: pytest.fail("work started"))
    with pytest.raises(ValueError, match="unknown method 'isvit2'"):
        iv.quantize(model, "isvit2", 4, 4, calib, **KW)
    with pytest.raises(ValueError, match="sos=False only applies to the I&S-ViT methods, not 'mine'"):
        iv.quantize(model, Method(name="mine", stages=(Calibrate(),)), 4, 4, calib, sos=False, **KW)
    big = Method(name="big", stages=(Calibrate(), Reconstruct(name="fit", weights="fp", batch_size=64)))
    with pytest.raises(ValueError, match="32 images, fewer than the batch size 64"):
        iv.quantize(model, big, 4, 4, calib, **{**KW, "batch_size": None})  # the stage's own batch size

    @dataclass(frozen=True, kw_only=True)
    class Noop(Stage):
        name: str = "noop"

    with pytest.raises(ValueError, match=r"stages\[1\] \(Noop 'noop'\): no engine handler registered"):
        iv.quantize(model, Method(name="noop", stages=(Calibrate(), Noop())), 4, 4, calib, **KW)


# --------------------------------------------------------------------------- running methods
@pytest.fixture(scope="module")
def isvit_run(data):
    """isvit with a spy on every capture (which model, which tensors) and a snapshot after each event."""
    model, calib, _ = data
    log: list[tuple] = []
    real = engine.capture_unit_io

    def spy(m, unit, images, budget, device, want_input=True, want_output=True, **kw):
        log.append(("quantized" if _is_quantized_model(m) else "teacher", want_input, want_output))
        return real(m, unit, images, budget, device, want_input=want_input, want_output=want_output, **kw)

    snaps = {}

    def cb(event, qm):
        log.append(("event", event))
        snaps[event] = copy.deepcopy(qm)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "capture_unit_io", spy)
        res = iv.quantize(model, "isvit", 4, 4, calib, callbacks=cb, **KW)
    return res, log, snaps


def _between(log, start, end):
    i, j = log.index(("event", start)), log.index(("event", end))
    return log[i + 1 : j]


def test_stage1_reads_teacher_inputs_and_stage3_quantized_inputs(isvit_run):
    res, log, _ = isvit_run
    n_units = len({u["unit"] for u in res.unit_losses if u["stage"] == "stage3"})
    assert n_units == 8  # patch embedding, 6 blocks, head
    # stage 1: one teacher pass per unit gives inputs and targets (patch embedding skipped: nothing quantized)
    assert _between(log, "calibrated", "stage1") == [("teacher", True, True)] * (n_units - 1)
    assert _between(log, "stage1", "stage2") == []  # reparameterization reads no data
    # stage 3: inputs from the quantized model, targets from the teacher, unit after unit
    assert _between(log, "stage2", "stage3") == [("quantized", True, False), ("teacher", False, True)] * n_units


def test_user_method_runs_end_to_end_and_matches_isvit_stage1(data, isvit_run):
    model, calib, test = data
    mine = Method(
        name="fp-recon", stages=(Calibrate(), Reconstruct(name="fit", inputs="fp", weights="fp"), Requantize(name="wq"))
    )
    snaps = {}
    res = iv.quantize(model, mine, 4, 4, calib, callbacks=lambda e, qm: snaps.setdefault(e, copy.deepcopy(qm)), **KW)
    assert list(snaps) == ["calibrated", "fit", "wq"]
    assert res.config["method"] == "fp-recon" and res.config["schedule"] == "custom"
    assert [s["stage"] for s in res.config["stages"]] == ["Calibrate", "Reconstruct", "Requantize"]
    assert res.config["stages"][1]["iters"] == 2 and res.config["stages"][1]["batch_size"] == 16  # run settings filled in
    assert {u["stage"] for u in res.unit_losses} == {"fit"} and set(res.timings) == {"calibrate", "fit", "wq", "total"}
    assert not snaps["fit"].blocks[0].attn.qkv.weight_quant and res.model.blocks[0].attn.qkv.weight_quant
    with torch.no_grad():
        # same placement, same first two stages, same seed as isvit: bit-identical to isvit after stage 1
        assert torch.equal(snaps["fit"](test), isvit_run[2]["stage1"](test))
        out = res.model(test)
        assert torch.isfinite(out).all() and not torch.equal(out, model(test))


def test_mix_inputs_and_rounding_reach_the_reconstruction(data, monkeypatch):
    model, calib, _ = data
    seen = []
    real = engine.reconstruct_unit

    def spy(unit, inputs, targets, cfg, *a, fp_inputs=None, **kw):
        seen.append((cfg, fp_inputs is not None and fp_inputs.n == inputs.n))
        return real(unit, inputs, targets, cfg, *a, fp_inputs=fp_inputs, **kw)

    monkeypatch.setattr(engine, "reconstruct_unit", spy)
    qdrop_like = Method(
        name="mix-adaround", softmax="uniform", post_ln="layer",
        stages=(Calibrate(weights="calibrate"),
                Reconstruct(inputs=Mix(0.5), rounding="adaround", iters=3, act_drop_prob=0.5, act_scale_lr=4e-5)),
    )  # fmt: skip
    res = iv.quantize(model, qdrop_like, 4, 4, calib, **KW)  # quantize(iters=2) overrides the stage's own 3
    assert len(seen) == 8 and all(has_fp for _, has_fp in seen)
    cfg = seen[0][0]
    assert (cfg.input_mix, cfg.rounding, cfg.iters, cfg.batch_size, cfg.act_drop_prob, cfg.act_scale_lr) == (
        0.5, "adaround", 2, 16, 0.5, 4e-5)  # fmt: skip
    assert res.config["stages"][1]["inputs"] == {"mix": 0.5} and res.config["iters"] == 2
    assert all("flip_frac" in u for u in res.unit_losses)
    learned = [u["unit"] for u in res.unit_losses if u["act_scale_n"] > 0]  # the FP image has no activation quantizer
    assert learned == [u["unit"] for u in res.unit_losses if u["unit"] != "patch_embed.proj"] and len(learned) == 7


def test_registered_handler_runs_a_new_stage_type(data, monkeypatch):
    model, calib, _ = data

    @dataclass(frozen=True, kw_only=True)
    class Count(Stage):
        name: str = "count"

    calls = []
    monkeypatch.setitem(engine.STAGE_HANDLERS, Count, lambda stage, ctx: calls.append(_is_quantized_model(ctx.qmodel)))
    events = []
    m = replace(METHODS["minmax"], name="minmax+count", stages=(*METHODS["minmax"].stages, Count()), provenance={})
    res = iv.quantize(model, m, 4, 4, calib, callbacks=lambda e, _: events.append(e), **KW)
    assert calls == [True] and events == ["calibrated", "count"] and "count" in res.timings


def test_run_settings_override_the_stages_and_fill_what_they_leave_unset():
    from isvit_viz.calib.engine import RunSettings

    own = Reconstruct(iters=20000, batch_size=32, loss="lp", loss_p=2.4)
    unset = Reconstruct()
    run = RunSettings(iters=None, batch_size=None, lr=None, default_iters=200)
    assert (run.resolve(own).iters, run.resolve(own).batch_size, run.resolve(own).lr) == (20000, 32, 4e-5)
    assert (run.resolve(unset).iters, run.resolve(unset).batch_size) == (200, 64)  # the I&S-ViT defaults
    matched = RunSettings(iters=1000, batch_size=64, lr=1e-4)
    assert (matched.resolve(own).iters, matched.resolve(own).batch_size, matched.resolve(own).lr) == (1000, 64, 1e-4)
    cfg = run.recon_config(own)
    assert (cfg.loss_p, cfg.act_scale_grad_scale) == (2.4, True)


def test_readme_provenance_section_is_generated():
    from pathlib import Path

    from isvit_viz.calib.provenance import provenance_readme

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- provenance:begin -->\n")[1].split("\n<!-- provenance:end -->")[0]
    assert block == provenance_readme()  # regenerate the block after changing a method or its sources
