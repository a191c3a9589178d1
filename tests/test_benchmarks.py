"""Every benchmark script runs end to end in --smoke mode and writes its JSON + Markdown."""

import json

import pytest


@pytest.mark.parametrize("name", ["quantizer_init", "accuracy", "cost", "landscape", "gpu", "method_cost", "softmax_choice"])
def test_benchmark_smoke(name, tmp_path):
    import importlib

    mod = importlib.import_module(f"benchmarks.{name}")
    mod.main(["--smoke", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert payload["rows"] and (tmp_path / f"{name}.md").read_text().startswith(f"# {name}")
    if name == "quantizer_init":
        assert payload["rows"][0]["equal"] is True
    if name == "method_cost":  # QDrop's own 20,000 steps per block against I&S-ViT's 1000 per stage
        qdrop = next(r for r in payload["runs"] if r["method"] == "qdrop")
        assert qdrop["stages"]["reconstruct"]["own_steps"] == 20000 and qdrop["stages"]["reconstruct"]["batch_size"] == 32
        aphq, fima = (next(r for r in payload["runs"] if r["method"] == m) for m in ("aphq-vit", "fima-q"))
        assert list(aphq["stages"]) == ["mlp_recon", "reconstruct"] and aphq["stages"]["mlp_recon"]["own_steps"] == 20000
        # the Hessian (APHQ) and Fisher refreshes (FIMA-Q) are one-off passes per unit, counted beside the steps
        assert aphq["stages"]["reconstruct"]["unit_extra_s"] > 0 and fima["stages"]["reconstruct"]["unit_extra_s"] > 0


def test_speed_benchmark_smoke_compares_a_baseline_revision(tmp_path):
    import subprocess

    from benchmarks import speed

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=speed.ROOT)
    if head.returncode:
        pytest.skip("not a git checkout: no revision to compare with")
    speed.main(["--smoke", "--parts", "forward", "--baseline", "HEAD", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "speed_forward_1t.json").read_text())["rows"]
    assert [r["code"] for r in rows] == ["baseline HEAD", "this"]  # each imported its own tree (checked by the driver)
    assert all(r["ratio"] > 0 and r["fake_quant_s"] > 0 for r in rows)


def test_report_merges_runs_from_several_files(tmp_path):
    from benchmarks import report

    def run(method, bits, seed, agree, cuda=None):
        return {"env": {"threads": 2, "cuda": cuda}, "runs": [{"model": "vit", "method": method, "w_bits": bits, "a_bits": bits,
                "seed": seed, "q_top1": 0.5, "agree_top1": agree, "kl_to_fp": 0.25}]}  # fmt: skip

    files = []
    for i, payload in enumerate([run("minmax", 4, 0, 0.7), run("isvit", 3, 0, 0.9, "H100"), run("isvit", 3, 1, 0.8, "H100")]):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(payload))
    cells = report.merge(files)
    assert len(cells[("vit", "isvit", 3)]) == 2 and cells[("vit", "minmax", 4)][0]["device"] == "CPU x2 fp32"
    lines = report.render(cells).splitlines()
    # mean ± sample std over the two seeds: agreement 0.9 and 0.8 -> 85.0 ± 7.1
    assert (
        lines[2]
        == "| embedded-vit | isvit | 50.00 ± 0.00 / 85.0 ± 7.1 / 0.2500 ± 0.0000 (n=2) | – | – | H100 fp32 | 55.78, 75.81, 79.15 |"
    )
    assert lines[3].startswith("| embedded-vit | minmax | – | 50.00 / 70.0 / 0.2500 | – | CPU x2 fp32 |")
    bf16 = {"env": {"threads": 1, "cuda": None}, "settings": {"matmul_dtype": "bfloat16"}}
    assert report.device_label(bf16["env"], bf16["settings"]) == "CPU x1 bf16"


def _readme_table_files(marker: str, folder: str) -> list:
    """The raw JSON behind a generated README table, after checking the table is exactly their rendering."""
    from pathlib import Path

    from benchmarks import report

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    table = readme.split(f"<!-- {marker}:begin -->\n")[1].split(f"\n<!-- {marker}:end -->")[0]
    files = sorted((root / "benchmarks" / "results" / folder).glob("*.json"))
    assert files and table == report.render(report.merge(files))
    return files


def test_readme_accuracy_table_is_the_committed_measurements():
    # The README's table must be exactly what benchmarks.report renders from the raw JSON in
    # benchmarks/results/accuracy (so nobody edits a number by hand).
    _readme_table_files("accuracy-table", "accuracy")


def test_readme_matched_budget_table_is_the_committed_measurements():
    # The matched-budget runs (every stage overridden to the same steps and batch) live in their own folder
    # and table, so the main table keeps each method at its own settings.
    files = _readme_table_files("matched-table", "matched_budget")
    assert all(r["iters"] == 1000 and json.loads(f.read_text())["settings"]["batch_size"] == 64
               for f in files for r in json.loads(f.read_text())["runs"])  # fmt: skip


def test_accuracy_with_checkpoint_root_writes_its_json(tmp_path):
    """--checkpoint-root (a Path among the recorded settings) used to crash the final JSON write, losing the run."""
    from benchmarks import accuracy

    accuracy.main(["--smoke", "--out", str(tmp_path / "out"), "--checkpoint-root", str(tmp_path / "ck")])
    payload = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert payload["settings"]["checkpoint_root"] == str(tmp_path / "ck") and payload["runs"]
    assert any((tmp_path / "ck").rglob("COMPLETE"))
