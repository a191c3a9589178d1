"""Packaging: pyproject <-> environment.yml consistency, console script, public API names."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(py["project"]["optional-dependencies"])
    assert "python=3.11" in env["dependencies"]
    pip_block = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    (spec,) = [s for s in pip_block if s.startswith("-e .")]
    named = set(re.search(r"\[(.*)\]", spec).group(1).split(","))
    assert named <= extras, f"environment.yml names extras missing from pyproject: {named - extras}"


def test_pins_as_environment_md_says():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in ("torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31", "loss-landscapes==3.0.6"):
        assert pin in deps


def test_console_script_and_api():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert py["project"]["scripts"]["isvit-viz"] == "isvit_viz.cli:main"
    import isvit_viz as iv

    for name in ("load_embedded", "evaluate", "quantize", "save_quantized", "load_quantized", "QuantResult"):
        assert hasattr(iv, name)


def test_readme_shows_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()
