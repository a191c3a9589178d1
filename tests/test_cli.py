"""CLI: one-line errors with exit status 2, results.json keys, evaluate/quantize subcommands."""

import json

import pytest

from isvit_viz.cli import main

KEYS = {"model", "method", "w_bits", "a_bits", "calib_images", "iters", "fp_top1", "q_top1", "agree_top1", "kl_to_fp",
        "wall_s", "stage_s", "peak_rss_mb", "device", "seed", "version"}  # fmt: skip


def test_quantize_writes_results_json(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["quantize", "--model", "embedded-vit", "--method", "isvit", "--w-bits", "4", "--a-bits", "4", "--calib", "64",
               "--iters", "2", "--test-images", "200", "--threads", "1", "--out", str(out), "--save-model", "--quiet"])  # fmt: skip
    assert rc == 0
    rec = json.loads((out / "results.json").read_text())
    assert KEYS <= set(rec)
    assert rec["calib_images"] == 64 and rec["iters"] == 2 and 0 <= rec["agree_top1"] <= 1 and rec["kl_to_fp"] >= 0
    assert (out / "model.pt").stat().st_size > 0
    assert "q_top1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["quantize", "--model", "embedded-vit", "--w-bits", "1", "--calib", "64", "--iters", "1"], "bits"),
        (["quantize", "--model", "embedded-vit", "--device", "cuda", "--calib", "64"], "CUDA"),
        (["quantize", "--model", "embedded-vit", "--data", "/nonexistent"], "packaged data"),
        (["quantize", "--model", "deit_tiny_patch16_224"], "--data"),
        (["quantize", "--model", "deit_tiny_patch16_224", "--data", "/nonexistent"], "missing folder"),
        (["quantize", "--model", "embedded-vit", "--calib", "16", "--iters", "1"], "fewer than the batch size"),
    ],
)
def test_bad_input_one_line_exit_2(argv, needle, capsys):
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("isvit-viz: error:") and needle in err[0]
    assert "Traceback" not in "\n".join(err)


def test_out_folder_exists(tmp_path, capsys):
    (tmp_path / "x").write_text("1")
    assert main(["quantize", "--model", "embedded-vit", "--out", str(tmp_path), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err


def test_debug_shows_traceback():
    with pytest.raises(ValueError):
        main(["--debug", "quantize", "--model", "embedded-vit", "--w-bits", "1", "--calib", "64", "--quiet"])


def test_evaluate_subcommand(capsys):
    assert main(["evaluate", "vit", "--n", "100", "--quiet"]) == 0
    assert "embedded-vit" in capsys.readouterr().out


def test_reproduce_writes_artefacts(tmp_path):
    import nbformat

    from isvit_viz.reproduce import reproduce

    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("FAST = None")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [
        p,
        nbformat.v4.new_code_cell("%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()"),
        nbformat.v4.new_code_cell(
            "from IPython.display import Markdown, display\ndisplay(Markdown(f'| fast |\\n|---|\\n| {FAST} |'))"
        ),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nbdir / "x.ipynb")
    out = tmp_path / "run"
    results = reproduce(out, fast=True, notebook_dir=nbdir)
    text = results.read_text()
    assert "x: ok" in text and "| True |" in text  # the injected FAST=True reached the kernel
    assert (out / "x.ipynb").exists() and (out / "x.html").stat().st_size > 1000
    assert len(list((out / "figures").glob("x_*.png"))) == 1
    with pytest.raises(ValueError, match="unknown notebooks"):
        reproduce(out, notebooks=["nope"], notebook_dir=nbdir)
