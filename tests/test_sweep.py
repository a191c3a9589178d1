"""Sweeps (isvit_viz.sweep): grid specs, the serial fallback, Ray tasks on a local 2-CPU cluster,
resume, failed cells, the report, and bad input at the command line.

Tiny cells (embedded ViT, 16 calibration images, 1 iteration, 64 test images) are deterministic on
the CPU, so a Ray run must reproduce the serial run's numbers exactly. `make test` installs Ray
(the ``sweep`` extra); the Ray tests skip only where it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import warnings

import pytest

from isvit_viz.cli import main
from isvit_viz.results import merge, render
from isvit_viz.sweep import Cell, SweepFolder, SweepSpec, load_spec, run_cell, run_sweep, sweep_report
from isvit_viz.sweep.runner import INSTALL_HINT

TINY = {"models": ["vit"], "methods": ["minmax", "repq-vit"], "bits": [3, 4], "seeds": [0], "calib": 16, "iters": 1, "test": 64}
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (`make test` installs it: the [sweep] extra)")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


# ----------------------------------------------------------------------------- spec
def test_spec_expands_the_grid_in_order_with_canonical_names():
    spec = SweepSpec(models=["embedded-vit", "swin"], methods=["minmax", "isvit"], bits=[3, 4, 3], seeds=[0, 1]).normalized()
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 2 * 2  # the duplicate bit-width is dropped
    assert cells[0] == Cell("vit", "minmax", 3, 3, 0) and cells[0].key == "vit_minmax_w3a3_s0"
    assert cells[1].key == "vit_minmax_w3a3_s1" and cells[-1].key == "swin_isvit_w4a4_s1"
    assert len({c.key for c in cells}) == len(cells)


def test_spec_file_yaml_and_json_agree(tmp_path):
    (tmp_path / "g.yaml").write_text(
        "models: vit\nmethods: [minmax, repq-vit]\nbits: [3, 4]\nseeds: 0\ncalib: 16\niters: 1\ntest: 64\n"
    )
    (tmp_path / "g.json").write_text(json.dumps(TINY))
    assert load_spec(tmp_path / "g.yaml") == load_spec(tmp_path / "g.json") == SweepSpec(**TINY)


def test_folder_refuses_cells_run_with_other_settings(tmp_path):
    SweepFolder(tmp_path / "s").prepare(SweepSpec(**TINY).normalized())
    with pytest.raises(ValueError, match=r"iters=1, this sweep has iters=2"):
        run_sweep(SweepSpec(**(TINY | {"iters": 2})), tmp_path / "s", backend="serial", progress=False)
    assert not list((tmp_path / "s" / "cells").iterdir())


# ----------------------------------------------------------------------------- bad input at the CLI
BAD = {
    "empty grid": (["--models"], "empty grid: no models"),
    "unknown method": (["--methods", "isvitt"], "unknown method 'isvitt'"),
    "unknown model": (["--models", "deit_small"], "unknown model 'deit_small'"),
    "bad yaml": (["--spec", "{tmp}/bad.yaml"], "bad.yaml: not a valid spec file"),
    "bad json": (["--spec", "{tmp}/bad.json"], "bad.json: not a valid spec file"),
    "unknown key": (["--spec", "{tmp}/key.yaml"], "unknown spec key(s) ['modles']"),
    "unreachable address": (["--address", "127.0.0.1:{port}"], "is unreachable"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2_before_any_cell(case, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("models: [vit\nbits: 3\n")
    (tmp_path / "bad.json").write_text('{"models": ["vit"],}')
    (tmp_path / "key.yaml").write_text("modles: [vit]\n")
    argv, needle = BAD[case]
    argv = [a.format(tmp=tmp_path, port=_closed_port()) for a in argv]
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), "--methods", "minmax", "--bits", "4", "--seeds", "0", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("isvit-viz: error: ") and needle in err[0], err
    assert not out.exists()  # nothing started


# ----------------------------------------------------------------------------- the serial fallback (no Ray)
@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The tiny grid run with ``import ray`` failing: the serial fallback, the reference numbers."""
    out = tmp_path_factory.mktemp("serial")
    messages: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
        summary = run_sweep(SweepSpec(**TINY), out, progress=False, log=messages.append)
    return out, summary, messages, sweep_report(out)


def test_serial_fallback_without_ray(serial, capsys):
    out, summary, messages, report = serial
    assert messages == [INSTALL_HINT] and "pip install 'isvit_viz[sweep]'" in INSTALL_HINT
    assert (summary.backend, summary.done, summary.failed, summary.skipped) == ("serial", 4, 0, 0)
    files = sorted((out / "cells").glob("*.json"))
    assert [f.stem for f in files] == ["vit_minmax_w3a3_s0", "vit_minmax_w4a4_s0", "vit_repq-vit_w3a3_s0", "vit_repq-vit_w4a4_s0"]
    payload = json.loads(files[0].read_text())
    (run,) = payload["runs"]
    assert (run["model"], run["method"], run["w_bits"], run["a_bits"], run["seed"]) == ("vit", "minmax", 3, 3, 0)
    assert (run["calib_images"], run["iters"], run["n"]) == (16, 0, 64)  # minmax: calibration only
    assert payload["settings"]["matmul_dtype"] == "float32" and payload["env"]["threads"] == 1
    # the report is benchmarks.report's table over the folder, and the CLI prints the same
    assert report == render(merge(files)) and (out / "report.md").read_text() == report + "\n"
    assert report.count("| embedded-vit |") == 2 and "CPU x1 fp32" in report
    assert main(["sweep", "report", str(out)]) == 0
    assert capsys.readouterr().out == report + "\n"


def test_cell_numbers_are_run_grid_numbers(serial):
    # one cell in this process gives the numbers the sweep stored (deterministic on the CPU)
    out, *_ = serial
    spec = SweepSpec(**TINY).normalized()
    rec = run_cell(spec, Cell("vit", "repq-vit", 4, 4, 0))["runs"][0]
    stored = json.loads((out / "cells" / "vit_repq-vit_w4a4_s0.json").read_text())["runs"][0]
    assert {k: rec[k] for k in ("q_top1", "agree_top1", "kl_to_fp")} == {
        k: stored[k] for k in ("q_top1", "agree_top1", "kl_to_fp")
    }


# ----------------------------------------------------------------------------- Ray (a local 2-CPU cluster, loopback)
@pytest.fixture(scope="module")
def ray_cluster():
    if not HAVE_RAY:
        pytest.skip("ray is not installed (`make test` installs it: the [sweep] extra)")
    import ray

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about accelerator env vars
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=100 * 2**20,
                 log_to_driver=False)  # fmt: skip
    yield ray
    ray.shutdown()


@needs_ray
def test_ray_grid_completes_with_the_serial_report(ray_cluster, serial, tmp_path):
    summary = run_sweep(SweepSpec(**TINY), tmp_path / "ray", progress=False)
    assert (summary.backend, summary.done, summary.failed, summary.cluster_cpus) == ("ray", 4, 0, 2.0)
    assert sweep_report(tmp_path / "ray") == serial[3]
    pids = {json.loads(p.read_text())["sweep"]["pid"] for p in (tmp_path / "ray" / "cells").glob("*.json")}
    assert os.getpid() not in pids  # the cells ran in Ray workers, not here


@needs_ray
def test_ray_sweep_stopped_after_one_cell_resumes_with_the_rest(ray_cluster, serial, tmp_path):
    out = tmp_path / "resume"
    first = run_sweep(SweepSpec(**TINY), out, max_cells=1, progress=False)  # stop after one cell, cancel the rest
    assert (first.done, first.not_run) == (1, 3)
    (done,) = (out / "cells").glob("*.json")
    before = done.read_bytes()
    second = run_sweep(SweepSpec(**TINY), out, progress=False)
    assert (second.skipped, second.done, second.failed) == (1, 3, 0)
    assert done.stem not in second.cell_s and done.read_bytes() == before  # the finished cell was not rerun
    assert sweep_report(out) == serial[3]


@needs_ray
def test_a_failing_cell_is_recorded_and_the_others_finish(ray_cluster, serial, tmp_path, capsys):
    out = tmp_path / "fail"

    def flaky(spec, cell):  # a local function: shipped to the Ray workers by value
        if cell.key == "vit_repq-vit_w3a3_s0":
            raise RuntimeError("boom in the cell")
        return run_cell(spec, cell)

    summary = run_sweep(SweepSpec(**TINY), out, progress=False, cell_fn=flaky)
    assert (summary.done, summary.failed) == (3, 1)
    rec = json.loads((out / "failed" / "vit_repq-vit_w3a3_s0.json").read_text())
    assert rec["error"] == "RuntimeError: boom in the cell" and 'raise RuntimeError("boom in the cell")' in rec["traceback"]
    assert main(["sweep", "report", str(out)]) == 0
    err = capsys.readouterr().err
    assert "3 cells finished, 1 failed" in err and "failed vit_repq-vit_w3a3_s0: RuntimeError: boom in the cell" in err
    again = run_sweep(SweepSpec(**TINY), out, progress=False)  # a rerun retries only the failed cell
    assert (again.skipped, again.done, again.failed) == (3, 1, 0)
    assert not list((out / "failed").glob("*.json")) and sweep_report(out) == serial[3]


def test_benchmarks_accuracy_sweep_mode_runs_the_same_cell(serial, tmp_path, capsys):
    from benchmarks import accuracy

    out = tmp_path / "acc"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "ray", None)  # serial: the flags' mapping onto the spec is what is tested here
        accuracy.main(["--models", "vit", "--methods", "minmax", "--bits", "4", "--seeds", "0", "--calib", "16",
                       "--iters", "1", "--test", "64", "--sweep", str(out)])  # fmt: skip
    assert capsys.readouterr().out == sweep_report(out) + "\n"
    (cell,) = (out / "cells").glob("*.json")
    reference = serial[0] / "cells" / cell.name
    assert json.loads(cell.read_text())["runs"][0]["q_top1"] == json.loads(reference.read_text())["runs"][0]["q_top1"]
    assert json.loads(cell.read_text())["settings"] == json.loads(reference.read_text())["settings"]


def test_imagenet_cell_on_a_synthetic_image_folder(tmp_path):
    # the timm path: calibration drawn from data/train, a stratified subset of data/val, 1000 class folders
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(1000):
            (tmp_path / "in" / split / f"n{c:05d}").mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "in" / split / f"n{c:05d}" / "0.JPEG"
            )
    spec = SweepSpec(models=["deit_tiny_patch16_224"], methods=["minmax"], bits=[4], seeds=[0], calib=4, test=8,
                     data=str(tmp_path / "in"), weights={"deit_tiny_patch16_224": "random"})  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "ray", None)
        summary = run_sweep(spec, tmp_path / "s", progress=False, log=lambda s: None)
    assert (summary.done, summary.failed) == (1, 0), [p.read_text() for p in (tmp_path / "s" / "failed").glob("*.json")]
    run = json.loads((tmp_path / "s" / "cells" / "deit_tiny_patch16_224_minmax_w4a4_s0.json").read_text())["runs"][0]
    assert (run["model"], run["calib_images"], run["n"]) == ("deit_tiny_patch16_224", 4, 8)
    with pytest.raises(ValueError, match="needs weights"):
        run_sweep(SweepSpec(models=["deit_tiny_patch16_224"], data=str(tmp_path / "in")), tmp_path / "t", backend="serial")
    with pytest.raises(FileNotFoundError, match="missing folder"):
        run_sweep(SweepSpec(**(spec.to_dict() | {"data": str(tmp_path)})), tmp_path / "t", backend="serial")
