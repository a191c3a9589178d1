"""Every benchmark script runs end to end in --smoke mode and writes its JSON + Markdown."""

import json

import pytest


@pytest.mark.parametrize("name", ["quantizer_init", "accuracy", "cost", "landscape", "gpu"])
def test_benchmark_smoke(name, tmp_path):
    import importlib

    mod = importlib.import_module(f"benchmarks.{name}")
    mod.main(["--smoke", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert payload["rows"] and (tmp_path / f"{name}.md").read_text().startswith(f"# {name}")
    if name == "quantizer_init":
        assert payload["rows"][0]["equal"] is True
