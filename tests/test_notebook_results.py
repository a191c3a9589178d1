"""Notebooks open on the committed paper-setting results: the artifacts load in the code's current
format, the notebooks' ``results`` cells come before any recomputation, run without heavy work, and
print exactly the numbers in the committed JSON (recomputed here from the raw files, not through
``isvit_viz.results``)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import nbformat
import numpy as np
import pytest

from isvit_viz import results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NOTEBOOKS = ROOT / "notebooks"


def _raw_runs(sub: str = "accuracy") -> list[dict]:
    runs = []
    for path in sorted((RESULTS / sub).glob("*.json")):
        runs += json.loads(path.read_text())["runs"]
    return runs


@pytest.mark.parametrize("name", sorted(results.ARTIFACT_FORMATS))
def test_artifact_loads_in_current_format(name):
    payload = results.load_artifact(name)
    assert payload["artifact"] == name and payload["format"] == results.ARTIFACT_FORMATS[name]
    assert payload["command"].startswith("python -m ") and payload["wall_s"] > 0 and payload["settings"]


def test_stale_artifact_format_is_refused(tmp_path):
    results.write_artifact("landscapes", {"block": {}, "model": {}}, {"bits": 4}, "python -m x", 1.0, root=tmp_path)
    path = results.artifact_path("landscapes", tmp_path)
    payload = json.loads(path.read_text())
    payload["format"] += 1
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="format"):
        results.load_artifact("landscapes", tmp_path)
    with pytest.raises(results.ResultsNotFoundError, match="python -m benchmarks.levels"):
        results.load_artifact("levels", tmp_path)


def test_landscape_artifact_is_complete_and_round_trips():
    from benchmarks.artifacts import LANDSCAPE_SETTINGS

    block, whole, payload = results.landscapes()
    s = LANDSCAPE_SETTINGS
    stages = {(s["block"], st, cfg) for st, cfg in [("stage1", "isvit"), ("stage2", "isvit"), ("stage3", "isvit")]}
    stages |= {(s["block"], "calibrated", c) for c in ("w_channel_a_layer", "fp_w_a_layer", "fp_w_a_channel")}
    assert set(block) == stages and set(whole) == {"FP", "I&S-ViT"}
    assert all(L.Z.shape == (s["steps"], s["steps"]) and np.isfinite(L.Z).all() for L in block.values())
    assert payload["settings"]["iters"] == 1000 and payload["settings"]["calib"] == 1024


def test_every_ablation_cell_is_committed():
    from benchmarks.artifacts import ABLATION_CELLS

    # Tables 3 and 4 are complete; Fig. 5 shows the committed points and names the missing ones
    abl = results.ablation_tables()
    assert [r["calib_images"] for r in abl["fig5"]] + abl["fig5_missing"] != [] and 1024 not in abl["fig5_missing"]
    for name in ABLATION_CELLS:
        path = RESULTS / "ablations" / "w3a3" / f"{name}.json"
        if name.startswith("fig5_") and int(name.removeprefix("fig5_calib")) in abl["fig5_missing"]:
            assert not path.exists()
            continue
        (run,) = json.loads(path.read_text())["runs"]
        assert run["iters"] == 1000 and run["w_bits"] == 3 and run["seed"] == 1 and run["n"] == 10000


# ----------------------------------------------------------------------------- the notebooks' results cells
def _results_cells_first(nb) -> list:
    """Setup + results cells; asserts the results cells precede every other code cell after setup."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    tags = [c.metadata.get("tags", []) for c in code]
    assert "parameters" in tags[0], "first code cell must be the parameters cell"
    n_res = sum("results" in t for t in tags)
    assert n_res >= 1, "no cell tagged 'results'"
    assert all("results" in t for t in tags[2 : 2 + n_res]), "results cells must come right after the setup cell"
    return code[: 2 + n_res]


def _execute_results(stem: str) -> list[str]:
    """Execute a notebook's parameters, setup and results cells; return each results cell's text output."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
    nb.cells = _results_cells_first(nb)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    texts = []
    for cell in nb.cells[2:]:
        t = []
        for o in cell.outputs:
            assert o.output_type != "error", f"{stem}: {o.get('ename')}: {o.get('evalue')}"
            t.append(o.get("text", "") or o.get("data", {}).get("text/markdown", ""))
        texts.append("".join(t))
    return texts


def _mean(xs):
    return statistics.mean(xs)


@pytest.mark.notebook
def test_quickstart_prints_the_committed_w4a4_cell():
    (text,) = _execute_results("00_quickstart")
    runs = [r for r in _raw_runs() if (r["model"], r["method"], r["w_bits"]) == ("vit", "isvit", 4)]
    assert len(runs) == 3
    assert f"quantized top-1 {100 * _mean([r['q_top1'] for r in runs]):.2f} ± " in text
    assert f"agreement with FP {100 * _mean([r['agree_top1'] for r in runs]):.1f} ± " in text
    assert f"FP top-1 {100 * runs[0]['fp_top1']:.2f} %" in text


@pytest.mark.notebook
def test_ptq_results_table_and_gaps_are_the_committed_grid():
    table, gaps = _execute_results("03_ptq_results")
    runs = _raw_runs()
    for model, method, bits in [("vit", "isvit", 3), ("swin", "qdrop-ste", 4), ("vit", "minmax", 6)]:
        rs = [r for r in runs if (r["model"], r["method"], r["w_bits"]) == (model, method, bits)]
        row = next(line for line in table.splitlines() if line.startswith(f"| embedded-{model} | {method} |"))
        assert (
            f"{100 * _mean([r['q_top1'] for r in rs]):.2f} ± " in row
            and f"{100 * _mean([r['agree_top1'] for r in rs]):.1f} ± " in row
        )
    isvit3 = _mean([r["agree_top1"] for r in runs if (r["model"], r["method"], r["w_bits"]) == ("vit", "isvit", 3)])
    assert f"vit  W3/A3: I&S-ViT agreement {100 * isvit3:.1f} %" in gaps


@pytest.mark.notebook
def test_ablations_tables_are_the_committed_runs():
    tables, _ = _execute_results("04_ablations")
    (ref,) = json.loads((RESULTS / results.ABLATION_REFERENCE).read_text())["runs"]
    (log2_nosos,) = json.loads((RESULTS / "ablations" / "w3a3" / "t3_log2_nosos.json").read_text())["runs"]
    t3 = tables.split("**Table 4")[0]
    rows = [line for line in t3.splitlines() if line.startswith("| ") and line[2:7] in ("False", "True ")]
    assert rows[0].startswith(f"| False | False | {log2_nosos['q_top1']:.4g} | {log2_nosos['agree_top1']:.4g} |")
    assert rows[3].startswith(f"| True | True | {ref['q_top1']:.4g} | {ref['agree_top1']:.4g} |")


@pytest.mark.notebook
def test_landscape_notebook_prints_the_committed_grids():
    texts = _execute_results("02_loss_landscape")
    payload = json.loads((RESULTS / "artifacts" / "landscapes.json").read_text())
    printed = texts[1]
    for key, d in payload["block"].items():
        _, stage, cfg = key.split("|")
        Z = np.asarray(d["Z"])
        line = next(ln for ln in printed.splitlines() if re.match(rf"{stage}\s+{cfg}\s", ln))
        assert f"mean {Z.mean():.4g}" in line and f"max {Z.max():.4g}" in line
    assert "(a) > (b) > (c):" in printed


@pytest.mark.parametrize("name", ["landscapes", "attention", "levels", "sensitivity"])
def test_missing_artifact_names_the_command_that_writes_it(name, tmp_path):
    import importlib

    from isvit_viz.results import ARTIFACT_COMMANDS, ARTIFACT_FORMATS, ResultsNotFoundError, load_artifact

    assert set(ARTIFACT_COMMANDS) == set(ARTIFACT_FORMATS)
    with pytest.raises(ResultsNotFoundError) as err:
        load_artifact(name, root=tmp_path)
    command = ARTIFACT_COMMANDS[name]
    assert f"`{command}`" in str(err.value)
    module = command.split()[2]
    assert hasattr(importlib.import_module(module), "main")  # the named benchmark exists
