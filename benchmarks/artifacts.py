"""The paper-setting results the notebooks open on, in one command (resumable: finished parts are kept).

python -m benchmarks.artifacts [--parts landscapes ablations levels sensitivity] [--matmul-dtype bfloat16]

Parts and where they go (``benchmarks/results/``):

* ``landscapes`` (notebook 02): ``artifacts/landscapes.json``: block-local landscapes (21x21) of the
  three Fig. 3 configurations and after each SOS stage (I&S-ViT W4/A4, 1024 images, 1000 iterations),
  whole-model landscapes of the FP and the I&S-ViT model;
* ``ablations`` (notebook 04): ``ablations/w3a3/<cell>.json``: Table 3 (SULQ x SOS), Table 4
  (post-softmax quantizer) and Fig. 5 (calibration images) on the embedded ViT at W3/A3, one
  ``benchmarks.accuracy`` run per cell (seed 1, the settings of the accuracy grid's CPU cells, whose
  I&S-ViT W3/A3 seed-1 run is the reference cell shared by all three; Fig. 5's 32-image point is the
  I&S-ViT run of ``hard_regime/``, seed 0);
* ``levels`` (notebook 01): ``artifacts/attention.json`` and ``artifacts/levels.json`` (``benchmarks.levels``);
* ``sensitivity`` (notebook 05): ``artifacts/sensitivity.json`` (``benchmarks.sensitivity``).

Notebooks 00 and 03 read the accuracy grid (``accuracy/*.json``, ``python -m benchmarks.accuracy``).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import isvit_viz as iv
from isvit_viz import analysis, results

#: Notebook 02's full settings (the notebook's FAST=False values).
LANDSCAPE_SETTINGS = {"bits": 4, "block": 4, "extent": 0.5, "steps": 21, "images": 256, "calib": 1024, "iters": 1000,
                      "eval_images": 64, "model_steps": 21, "model_extent": 0.5, "seed": 0}  # fmt: skip

#: Ablation cells: name -> extra ``benchmarks.accuracy`` arguments (W3/A3 ViT, seed 1, bf16, 1 thread).
ABLATION_CELLS: dict[str, list[str]] = {
    "t3_log2_sos": ["--softmax-quantizer", "log2"],
    "t3_sulq_nosos": ["--no-sos"],
    "t3_log2_nosos": ["--softmax-quantizer", "log2", "--no-sos"],
    "t4_uniform_sos": ["--softmax-quantizer", "uniform"],
    "fig5_calib512": ["--calib", "512"],
    "fig5_calib2048": ["--calib", "2048"],
}
ABLATION_COMMON = ["--models", "vit", "--methods", "isvit", "--bits", "3", "--seeds", "1", "--threads", "1",
                   "--matmul-dtype", "bfloat16"]  # fmt: skip


def make_landscapes(root: Path, matmul_dtype: str) -> Path:
    s = LANDSCAPE_SETTINGS
    model, splits = iv.load_embedded("vit")
    calib, _ = splits.calib_tensors(s["calib"], seed=s["seed"])
    t0 = time.perf_counter()
    lands, whole, res = analysis.sos_study(
        model, calib, calib[: s["images"]], bits=s["bits"], block=s["block"], extent=s["extent"], steps=s["steps"],
        iters=s["iters"], eval_data=splits.test_tensors(s["eval_images"]), model_steps=s["model_steps"],
        model_extent=s["model_extent"], progress=True, matmul_dtype=matmul_dtype, seed=s["seed"],
    )  # fmt: skip
    data = {
        "block": {"|".join(map(str, k)): v.to_dict() for k, v in lands.items()},
        "model": {k: v.to_dict() for k, v in whole.items()},
        "stage_s": {k: round(v, 1) for k, v in res.timings.items()},
    }
    cmd = f"python -m benchmarks.artifacts --parts landscapes --matmul-dtype {matmul_dtype}"
    return results.write_artifact("landscapes", data, {**s, "matmul_dtype": matmul_dtype, "threads": torch.get_num_threads()},
                                  cmd, time.perf_counter() - t0, root)  # fmt: skip


def make_ablations(root: Path) -> list[Path]:
    from . import accuracy

    out_dir = root / "ablations" / "w3a3"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, extra in ABLATION_CELLS.items():
        dest = out_dir / f"{name}.json"
        if dest.exists():  # resume: a finished cell is kept
            continue
        with tempfile.TemporaryDirectory() as tmp:
            accuracy.main([*ABLATION_COMMON, *extra, "--out", tmp])
            shutil.copyfile(Path(tmp) / "accuracy.json", dest)
        written.append(dest)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="*", default=["landscapes", "ablations", "levels", "sensitivity"],
                   choices=["landscapes", "ablations", "levels", "sensitivity"])  # fmt: skip
    p.add_argument("--root", type=Path, default=None, help="results folder (default: the committed benchmarks/results)")
    p.add_argument("--matmul-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.root or results.results_dir()
    for part in args.parts:
        t0 = time.perf_counter()
        if part == "landscapes":
            make_landscapes(root, args.matmul_dtype)
        elif part == "ablations":
            make_ablations(root)
        else:  # levels / sensitivity have their own benchmark modules
            where = ["--root" if part == "levels" else "--results-root", str(root)]
            importlib.import_module(f"benchmarks.{part}").main([*where, "--threads", str(args.threads)])
        print(f"{part}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
