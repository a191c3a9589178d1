"""ImageNet scale on a synthetic 1000-class ImageFolder (5,000 JPEGs at 224 px, generated once under runs/):

- ``throughput``: images/s of the JPEG loader alone and of ``evaluate`` (DeiT-T FP) with 0 vs N workers;
- ``rss``: peak RSS of ``compare_to_fp`` (DeiT-T FP vs min/max W4/A4) at 500, 2,000, 5,000 images, each in a
  fresh subprocess (goal: growth below 100 MB from 500 to 5,000: only logits are kept);
- ``quantize``: peak RSS and wall time of ``isvit-viz quantize --model deit_tiny_patch16_224 --weights <local>
  --data <synthetic> --iters 5`` (1024 calibration images, all 5,000 val images);
- ``init``: peak memory of quantizer initialisation (the calibration forward of 256 images at 224 px) at
  DeiT-S and DeiT-B shapes, random init: ``quantize(..., iters=0)``, each in a fresh subprocess.

    nice -n 5 python -m benchmarks.imagenet_scale --workers 2 --threads 2 --out benchmarks/results
    python -m benchmarks.imagenet_scale --part init --out benchmarks/results   # one part only
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import parser, write

DATA = Path("runs/imagenet_synth")
MODEL = "deit_tiny_patch16_224"
PARTS = ("throughput", "rss", "quantize", "init")


def make_folder(root: Path, per_class: int, size: int, classes: int = 1000) -> Path:
    """``root/val/<class>/<i>.JPEG`` (smooth random images, like photos rather than noise) and ``root/train``
    as a link to val. Generated once; a ``COMPLETE`` file records the spec."""
    spec = f"{classes} classes x {per_class} JPEGs at {size} px\n"
    if (root / "COMPLETE").exists() and (root / "COMPLETE").read_text() == spec:
        return root
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / "val" / f"n{c:05d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
            arr = np.asarray(low, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f"{i}.JPEG", quality=90)
    if not (root / "train").exists():
        (root / "train").symlink_to("val", target_is_directory=True)
    (root / "COMPLETE").write_text(spec)
    return root


def local_weights(root: Path) -> Path:
    """A random-init DeiT-T as .safetensors (stands in for the downloaded checkpoint)."""
    path = root / "deit_tiny_random.safetensors"
    if not path.exists():
        import timm
        from safetensors.torch import save_file

        torch.manual_seed(0)
        save_file(timm.create_model(MODEL, pretrained=False).state_dict(), str(path))
    return path


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def _subprocess(args: list[str], threads: int) -> dict[str, Any]:
    """Run ``python -m benchmarks.imagenet_scale <args>`` in a fresh process; its last stdout line is JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "benchmarks.imagenet_scale", *args, "--threads", str(threads)],
                         capture_output=True, text=True, env=env)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"subprocess {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- parts run in their own process ----------------------------------------------------------------------


def one_rss(root: Path, n: int, workers: int) -> dict[str, Any]:
    """Peak RSS of compare_to_fp over ``n`` stratified val images (DeiT-T FP vs min/max W4/A4)."""
    import isvit_viz as iv
    from isvit_viz.data import imagefolder_loader
    from isvit_viz.evaluate import compare_to_fp
    from isvit_viz.models import create
    from isvit_viz.utils import reset_peak_rss

    model = create(MODEL, weights=local_weights(root))
    q = iv.quantize(model, "minmax", 4, 4, torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0)),
                    progress=False).model  # fmt: skip
    loader = imagefolder_loader(root / "val", model, n=n, batch_size=200, num_workers=workers)
    before = _rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    cmp = compare_to_fp(model, q, loader, progress=False)
    wall = time.perf_counter() - t0
    return {"part": "rss", "images": cmp["n"], "workers": workers, "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(_hwm_mb(), 1), "growth_mb": round(_hwm_mb() - before, 1), "wall_s": round(wall, 1),
            "images_per_s": round(cmp["n"] / wall, 1)}  # fmt: skip


def one_init(model_name: str, images: int, size: int) -> dict[str, Any]:
    """Peak RSS of quantize(..., iters=0) for I&S-ViT W4/A4: the activation-quantizer initialisation forward
    over ``images`` (random init model, random inputs), plus stage-2 reparameterisation."""
    import isvit_viz as iv
    from isvit_viz.models import create
    from isvit_viz.utils import reset_peak_rss

    model = create(model_name)
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
    before = _rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    res = iv.quantize(model, "isvit", 4, 4, x, iters=0, batch_size=min(64, images), progress=False)
    return {"part": "init", "model": model_name, "images": images, "size": size, "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(_hwm_mb(), 1), "growth_mb": round(_hwm_mb() - before, 1),
            "input_mb": round(x.numel() * 4 / 2**20, 1), "calibrate_s": round(res.timings["calibrate"], 1),
            "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip


# --- parts run from the driver ---------------------------------------------------------------------------


def throughput(root: Path, n: int, workers: int) -> list[dict[str, Any]]:
    from isvit_viz.data import imagefolder_loader
    from isvit_viz.evaluate import evaluate
    from isvit_viz.models import create

    model = create(MODEL, weights=local_weights(root))
    rows = []
    for w in sorted({0, workers}):
        loader = imagefolder_loader(root / "val", model, n=n, batch_size=100, num_workers=w)
        t0 = time.perf_counter()
        seen = sum(len(y) for _, y in loader)
        t_load = time.perf_counter() - t0
        loader = imagefolder_loader(root / "val", model, n=n, batch_size=100, num_workers=w)
        t0 = time.perf_counter()
        ev = evaluate(model, loader, progress=False)
        t_eval = time.perf_counter() - t0
        rows.append({"part": "throughput", "workers": w, "images": seen, "loader_images_per_s": round(seen / t_load, 1),
                     "eval_images_per_s": round(ev["n"] / t_eval, 1), "wall_s": round(t_load + t_eval, 1)})  # fmt: skip
    return rows


def one_quantize(root: Path, workers: int, threads: int, iters: int, extra: list[str]) -> dict[str, Any]:
    """``isvit-viz quantize`` in this (fresh) process: its peak RSS, and the largest loader worker's."""
    from isvit_viz.cli import main as cli

    out = root / "quantize_run"
    cmd = ["quantize", "--model", MODEL, "--weights", str(local_weights(root)), "--data", str(root), "--iters", str(iters),
           "--workers", str(workers), "--threads", str(threads), "--out", str(out), "--overwrite", "--quiet", *extra]  # fmt: skip
    t0 = time.perf_counter()
    if cli(cmd) != 0:
        raise RuntimeError(f"isvit-viz {' '.join(cmd)} failed")
    wall = time.perf_counter() - t0
    rec = json.loads((out / "results.json").read_text())
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    return {"part": "quantize", "command": "isvit-viz " + " ".join(cmd), "workers": workers, "images": rec["test_images"],
            "calib_images": rec["calib_images"], "peak_rss_mb": round(_hwm_mb(), 1),
            "largest_worker_rss_mb": round(workers_peak, 1), "wall_s": round(wall, 1), "quantize_wall_s": rec["wall_s"],
            "stage_s": rec["stage_s"], "q_top1": rec["q_top1"], "fp_top1": rec["fp_top1"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--part", choices=[*PARTS, "all"], default="all")
    p.add_argument("--workers", type=int, default=2, help="N of the 0-vs-N worker comparison and of the quantize run")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--one", default=None, help=argparse_suppress())
    p.add_argument("--n", type=int, default=None, help=argparse_suppress())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    smoke = args.smoke
    root = make_folder(args.data / ("smoke" if smoke else "full"), per_class=1 if smoke else 5, size=64 if smoke else 224)
    if args.one == "rss":
        print(json.dumps(one_rss(root, args.n, args.workers)))
        return
    if args.one == "quantize":
        extra = ["--calib", "64", "--test-images", "50", "--batch-size", "32"] if smoke else []
        print(json.dumps(one_quantize(root, args.workers, args.threads, 1 if smoke else 5, extra)))
        return
    if args.one is not None and args.one.startswith("init:"):
        _, name, images, size = args.one.split(":")
        print(json.dumps(one_init(name, int(images), int(size))))
        return
    parts = PARTS if args.part == "all" else (args.part,)
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    if "throughput" in parts:
        rows += throughput(root, 100 if smoke else 1000, args.workers)
    if "rss" in parts:
        for n in (50, 200) if smoke else (500, 2000, 5000):
            rows.append(_subprocess(["--one", "rss", "--n", str(n), "--workers", "0", "--data", str(args.data)]
                                    + (["--smoke"] if smoke else []), args.threads))  # fmt: skip
    if "quantize" in parts:
        rows.append(_subprocess(["--one", "quantize", "--workers", str(args.workers), "--data", str(args.data)]
                                + (["--smoke"] if smoke else []), args.threads))  # fmt: skip
    if "init" in parts:
        shapes = [("deit_tiny_patch16_224", 8, 224)] if smoke else [("deit_small_patch16_224", 256, 224),
                                                                    ("deit_base_patch16_224", 256, 224)]  # fmt: skip
        for name, images, size in shapes:
            rows.append(_subprocess(["--one", f"init:{name}:{images}:{size}", "--data", str(args.data)]
                                    + (["--smoke"] if smoke else []), args.threads))  # fmt: skip
    payload: dict[str, Any] = {"data": f"{root}: {(root / 'COMPLETE').read_text().strip()}", "model": MODEL,
                               "wall_s": round(time.perf_counter() - t_all, 1)}  # fmt: skip
    out = args.out
    if args.part != "all" and (out / "imagenet_scale.json").exists():  # merge one part into the earlier file
        old = json.loads((out / "imagenet_scale.json").read_text())
        rows = [r for r in old["rows"] if r["part"] not in parts] + rows
        payload = {**{k: v for k, v in old.items() if k not in ("rows", "env")}, **payload}
    rss = {r["images"]: r["peak_rss_mb"] for r in rows if r["part"] == "rss"}
    if {500, 5000} <= set(rss):
        payload["rss_growth_500_to_5000_mb"] = round(rss[5000] - rss[500], 1)
        payload["goal"] = "peak-RSS growth of compare_to_fp below 100 MB from 500 to 5,000 images"
    cols = ["part", "model", "workers", "images", "loader_images_per_s", "eval_images_per_s", "rss_before_mb", "peak_rss_mb",
            "growth_mb", "wall_s"]  # fmt: skip
    write("imagenet_scale", out, payload, rows, cols)


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
