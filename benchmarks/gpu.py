"""Full I&S-ViT W3/A3 on a deit_small-shaped model (random init, synthetic 224 px inputs) on CUDA:
wall time per stage and peak GPU memory. On a CPU-only machine run it with --smoke (tiny settings).

    python -m benchmarks.gpu --device cuda            # 1024 images, 1000 iterations per unit and stage
    python -m benchmarks.gpu --device cuda --matmul-dtype bfloat16
"""

from __future__ import annotations

import time

import torch

import isvit_viz as iv
from isvit_viz.models import create

from ._common import parser, write


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--method", default="isvit", help="a registered method (aphq-vit, fima-q, qdrop, ...)")
    p.add_argument("--iters", type=int, default=1000, help="steps per unit and stage for every stage; 0: the method's own")
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--matmul-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="torch.compile every reconstruction step (Inductor: Triton on CUDA)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.model, args.iters, args.calib = "deit_tiny_patch16_224", 5 if args.method == "fima-q" else 1, 8
    torch.manual_seed(0)
    model = create(args.model).to(args.device)
    x = torch.randn(args.calib, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()

    def report(stage: str, _model: torch.nn.Module) -> None:  # progress that survives a timeout
        print(f"[gpu] {stage} done at {time.perf_counter() - t0:.1f} s", flush=True)

    own = args.iters == 0  # the method's own steps and batch (e.g. 20,000 x 32 for the 2025 methods)
    res = iv.quantize(
        model, args.method, args.bits, args.bits, x, iters=None if own else args.iters,
        batch_size=None if own else min(64, args.calib), device=args.device, progress=False, callbacks=report,
        matmul_dtype=args.matmul_dtype, compile=args.compile,
    )  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    rows = [{"model": args.model, "method": args.method, "device": args.device, "W/A": f"{args.bits}/{args.bits}", "calib": args.calib,
             "iters": "own" if own else args.iters, "matmul_dtype": args.matmul_dtype,
             "compile": args.compile, "wall_min": wall / 60,
             **{f"{k}_s": v for k, v in res.timings.items()}, "peak_gpu_gib": peak}]  # fmt: skip
    write("gpu", args.out, {"target": "deit_small W3/A3 full pipeline <= 5 min on one H100 (isvit)"}, rows, list(rows[0]))


if __name__ == "__main__":
    main()
