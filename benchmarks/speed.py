"""Speed of one block-reconstruction step against its matrix-product floor, and of the fake-quant
forward against the FP forward, for this code and a baseline revision side by side.

    python -m benchmarks.speed --baseline 7a536e6 --threads 1            # step + forward figures
    python -m benchmarks.speed --parts full --baseline 7a536e6 --threads 2 --matmul-dtype bfloat16 --compile

``step``: the first block of the embedded ViT after I&S-ViT W3/A3 calibration (stage-3 state: quantized
weights and activations), one Adam step of batch 64 (forward, MSE loss, backward, update). Its floor is
the same step's matrix products alone: every ``mm`` / ``addmm`` / ``bmm`` the profiler records in one
step, replayed with the same shapes and dtypes. ``forward``: the embedded ViT after I&S-ViT W4/A4
calibration against the FP model on 256 test images. Each figure is measured in a fresh process per
revision, the revisions alternating for ``--rounds`` rounds; medians are reported, so both revisions see
the same machine load. ``full``: the whole I&S-ViT W4/A4 paper-setting run (1024 images, 1000 steps
per unit and stage) with its accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


# ----------------------------------------------------------------------------- measured in a worker
def _block(bits: int, batch: int, matmul_dtype: str):  # noqa: ANN202 - torch objects, imported lazily
    import torch

    import isvit_viz as iv
    from isvit_viz.calib.pipeline import reconstruction_units
    from isvit_viz.calib.recon import trainable_parameters
    from isvit_viz.quant.modules import QuantModule

    model, splits = iv.load_embedded("vit")
    res = iv.quantize(model, "isvit", bits, bits, splits.calib_tensors(64)[0], iters=0, batch_size=64, progress=False)
    blk = next(u[1] for u in reconstruction_units(res.model) if u[2] == "block")
    for m in blk.modules():
        if isinstance(m, QuantModule):
            m.matmul_dtype = None if matmul_dtype == "float32" else getattr(torch, matmul_dtype)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, model.embed_dim, generator=g)
    y = torch.randn(batch, tokens, model.embed_dim, generator=g)
    for p in blk.parameters():
        p.requires_grad_(False)
    params = trainable_parameters(blk)
    for p in params:
        p.requires_grad_(True)
    return blk, x, y, torch.optim.Adam(params, lr=4e-5)


def _seconds(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _floor(step) -> tuple[Callable[[], None], int]:  # noqa: ANN001
    """A function running the step's matrix products alone (shapes and dtypes from the profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    calls = []
    for e in prof.events():
        if e.name in MATMULS:
            n = 3 if e.name == "aten::addmm" else 2
            dtypes = [torch.bfloat16 if "BFloat16" in d else torch.float32 for d in e.input_dtypes[:n]]
            shapes = e.input_shapes[: len(dtypes)]
            args = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)]
            calls.append((getattr(torch, e.name.split("::")[1]), args))

    def run() -> None:
        for fn, args in calls:
            fn(*args)

    return run, len(calls)


def step_figures(matmul_dtype: str, compile_step: bool, reps: int) -> dict:
    """Seconds per block step, per floor (its matmuls alone), and the ratio."""
    from isvit_viz.calib.recon import recon_loss

    blk, x, y, opt = _block(3, 64, matmul_dtype)
    if compile_step:
        from isvit_viz.calib.fast import compiled

        fwd = compiled(blk)
    else:
        fwd = blk

    def step(fwd=fwd) -> None:  # noqa: ANN001
        loss = recon_loss(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()  # warm-up (compiles when asked)
    first = time.perf_counter() - t0
    step()
    floor, n_mm = _floor(lambda: step(blk))  # the eager step's matrix products
    floor()
    step_s, floor_s = [], []
    for _ in range(reps):  # interleaved: both see the same load
        step_s.append(_seconds(step))
        floor_s.append(_seconds(floor))
    s, f = statistics.median(step_s), statistics.median(floor_s)
    return {"step_s": s, "floor_s": f, "ratio": s / f, "matmuls": n_mm, "first_step_s": first}


def forward_figures(batch: int, reps: int) -> dict:
    """Seconds of the FP and the fake-quant (I&S-ViT W4/A4) forward of the embedded ViT, and the ratio."""
    import torch

    import isvit_viz as iv

    model, splits = iv.load_embedded("vit")
    q = iv.quantize(model, "isvit", 4, 4, splits.calib_tensors(256)[0], iters=0, progress=False).model
    x = splits.test_tensors(batch)[0]
    fp_s, fq_s = [], []
    with torch.no_grad():
        model(x), q(x)
        for _ in range(reps):
            fp_s.append(_seconds(lambda: model(x)))
            fq_s.append(_seconds(lambda: q(x)))
    fp, fq = statistics.median(fp_s), statistics.median(fq_s)
    return {"fp_s": fp, "fake_quant_s": fq, "ratio": fq / fp}


def full_run(matmul_dtype: str, compile_step: bool) -> dict:
    """I&S-ViT W4/A4 at the paper's settings on the embedded ViT, with its accuracy against FP."""
    import isvit_viz as iv
    from isvit_viz.evaluate import compare_to_fp

    model, splits = iv.load_embedded("vit")
    t0 = time.perf_counter()
    fast = {"compile": True} if compile_step else {}  # a baseline revision may predate the option
    res = iv.quantize(model, "isvit", 4, 4, splits.calib_tensors(1024)[0], seed=0, progress=False,
                      matmul_dtype=matmul_dtype, **fast)  # fmt: skip
    wall = time.perf_counter() - t0
    cmp = compare_to_fp(model, res.model, splits.test(batch_size=256), "cpu", progress=False)
    stages = {f"{k}_s": v for k, v in res.timings.items() if k != "total"}
    return {"wall_s": wall, **stages, **{k: cmp[k] for k in ("fp_top1", "q_top1", "agree_top1", "kl_to_fp")}}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.part == "step":
        out = step_figures(args.matmul_dtype, args.compile, args.reps)
    elif args.part == "forward":
        out = forward_figures(args.batch, args.reps)
    else:
        out = full_run(args.matmul_dtype, args.compile)
    import isvit_viz

    out["isvit_viz"] = str(Path(isvit_viz.__file__).parent)
    print("RESULT " + json.dumps(out))


# ----------------------------------------------------------------------------- driver
def _extract(rev: str, into: Path) -> Path:
    """``isvit_viz/`` of git revision ``rev`` under ``into`` (the benchmark code stays this one)."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "isvit_viz"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into


def _run(tree: Path, part: str, threads: int, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "benchmarks.speed", "--worker", part, "--threads", str(threads), *extra]
    # cwd = the tree: "python -m" puts the working directory first on sys.path
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{' '.join(cmd)} failed (tree {tree}):\n{proc.stderr[-3000:]}")
    res = json.loads(line[7:])
    if Path(res["isvit_viz"]).resolve() != (tree / "isvit_viz").resolve():
        raise RuntimeError(f"worker imported isvit_viz from {res['isvit_viz']}, expected {tree}")
    return res


def _medians(results: list[dict]) -> dict:
    keys = [k for k, v in results[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in results) for k in keys}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["step", "forward"], choices=["step", "forward", "full"])
    p.add_argument("--baseline", default=None, help="git revision to compare with (its isvit_viz/, this benchmark)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (one process per revision and round)")
    p.add_argument("--reps", type=int, default=15, help="timed repetitions per process")
    p.add_argument("--batch", type=int, default=256, help="forward part: test images per forward")
    p.add_argument("--matmul-dtype", default="float32", choices=["float32", "bfloat16"], help="full part")
    p.add_argument("--compile", action="store_true", help="full part: also this code with compiled reconstruction steps")
    p.add_argument("--smoke", action="store_true", help="one round, two repetitions (the test suite)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("ISVIT_BENCH_OUT", "runs/bench")))
    p.add_argument("--worker", default=None, choices=["step", "forward", "full"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.part = args.worker
        return worker(args)
    if args.smoke:
        args.rounds, args.reps, args.batch = 1, 2, 16
    from ._common import write

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this": ROOT}
        if args.baseline:
            trees = {f"baseline {args.baseline}": _extract(args.baseline, Path(tmp)), **trees}
        variants = []  # (label, tree, part, extra args)
        for part in args.parts:
            if part == "step":
                for dt in ("float32", "bfloat16"):
                    base = ["--reps", str(args.reps), "--matmul-dtype", dt]
                    variants += [(f"{name}, {dt}", tree, part, base) for name, tree in trees.items()]
                    if not args.smoke:  # compiling takes longer than the whole smoke run
                        variants.append((f"this + compile, {dt}", ROOT, part, [*base, "--compile"]))
            elif part == "forward":
                variants += [
                    (name, tree, part, ["--reps", str(args.reps), "--batch", str(args.batch)]) for name, tree in trees.items()
                ]
            else:  # the baseline (if any) and this code eagerly, then this code compiled with --compile
                extra = ["--matmul-dtype", args.matmul_dtype]
                variants += [(f"{name}, {args.matmul_dtype}", tree, part, extra) for name, tree in trees.items()]
                if args.compile:
                    variants.append((f"this + compile, {args.matmul_dtype}", ROOT, part, [*extra, "--compile"]))
        results: dict[int, list[dict]] = {i: [] for i in range(len(variants))}
        rounds = 1 if args.parts == ["full"] else args.rounds
        for _ in range(rounds):
            for i, (_, tree, part, extra) in enumerate(variants):
                results[i].append(_run(tree, part, args.threads, extra))
        for i, (label, _, part, _) in enumerate(variants):
            rows.append({"part": part, "code": label, "threads": args.threads, **_medians(results[i])})
    cols = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("part", "code"), k))
    write(f"speed_{'_'.join(args.parts)}_{args.threads}t", args.out, {"rounds": args.rounds, "reps": args.reps,
          "baseline": args.baseline, "command": "python -m benchmarks.speed " + " ".join(argv or sys.argv[1:])}, rows, cols)  # fmt: skip


if __name__ == "__main__":
    main()
