"""Accuracy table: methods x bit-widths x seeds on the embedded models (mean and std over seeds).

A seed draws the calibration images (``--calib`` of the 2,048 packaged ones) and seeds the
reconstruction's mini-batch sampling and QDrop's masks.

python -m benchmarks.accuracy [--models vit swin] [--seeds 0 1 2] [--iters N] [--calib 1024]

With ``--sweep DIR`` every cell runs as its own Ray task (local instance, or ``--address``), one
JSON per cell under DIR, resumable: the way to run a large grid (``isvit-viz sweep`` is the same).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

import isvit_viz as iv
from isvit_viz.calib import METHODS
from isvit_viz.experiments import run_grid

from ._common import parser, write


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="*", default=["vit", "swin"])
    p.add_argument("--methods", nargs="*", default=sorted(METHODS))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="Adam steps per unit and stage for every method (a matched budget); default: each method's own",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="reconstruction mini-batch for every method; default: each method's own (smaller calibration sets cap it)",
    )
    p.add_argument("--checkpoint-root", type=Path, default=None,
                   help="checkpoint every run under DIR/<model>/<method>_w<b>a<b>_s<seed>; a rerun resumes it (long runs)")  # fmt: skip
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--test", type=int, default=None)
    p.add_argument("--bits", nargs="*", type=int, default=[3, 4, 6])
    p.add_argument("--device", default="cpu", help="cpu | cuda (the run is timed on it; evaluation too)")
    p.add_argument("--matmul-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--softmax-quantizer", default=None, help="ablation: replace each method's post-softmax quantizer")
    p.add_argument("--no-sos", action="store_true", help="ablation: one reconstruction stage instead of SOS (Table 3)")
    p.add_argument("--sweep", type=Path, default=None,
                   help="run the grid as a sweep into this folder: one Ray task per cell (or serially without Ray), "
                        "one JSON per cell, resumable; prints the report (isvit_viz.sweep)")  # fmt: skip
    p.add_argument("--address", default=None, help="with --sweep: an existing Ray cluster (default $RAY_ADDRESS, else local)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.models, args.methods, args.seeds, args.iters, args.calib, args.test, args.bits = (
            ["vit"],
            ["minmax", "isvit"],
            [0],
            1,
            64,
            200,
            [4],
        )
    if args.sweep is not None:  # the same grid, one cell per Ray task, into a resumable folder
        import sys

        from isvit_viz.sweep import SweepSpec
        from isvit_viz.sweep.command import run_and_report

        spec = SweepSpec(models=args.models, methods=args.methods, bits=args.bits, seeds=args.seeds, calib=args.calib,
                         iters=args.iters, test=args.test, device=args.device, threads=args.threads,
                         matmul_dtype=args.matmul_dtype, softmax_quantizer=args.softmax_quantizer, sos=not args.no_sos)  # fmt: skip
        try:  # exit statuses as `isvit-viz sweep`: 1 when a cell failed, 2 (one line) for bad input, 130 on Ctrl-C
            status = run_and_report(spec, args.sweep, address=args.address)
        except KeyboardInterrupt:
            print("benchmarks.accuracy: interrupted (rerun the same command to resume)", file=sys.stderr)
            raise SystemExit(130) from None
        except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"benchmarks.accuracy: error: {msg}", file=sys.stderr)
            raise SystemExit(2) from None
        if status:
            raise SystemExit(status)
        return
    rows, raw = [], []
    for name in args.models:
        model, splits = iv.load_embedded(name)
        model = model.to(args.device)  # FP evaluation on the same device as the quantized model

        # each seed draws its own calibration images from the packaged pool (seed 0: the default set)
        def calib(seed: int, splits=splits) -> torch.Tensor:
            return splits.calib_tensors(args.calib, seed=seed)[0]

        recs = run_grid(model, calib, splits.test(args.test), args.methods,
                        [(b, b) for b in args.bits], iters=args.iters, seeds=args.seeds,
                        batch_size=args.batch_size or (None if args.calib >= 64 else args.calib),
                        checkpoint_root=None if args.checkpoint_root is None else args.checkpoint_root / name,
                        device=args.device, matmul_dtype=args.matmul_dtype, softmax_quantizer=args.softmax_quantizer, sos=not args.no_sos)  # fmt: skip
        raw += [{"model": name, **r} for r in recs]
        for m in args.methods:
            for b in args.bits:
                rs = [r for r in recs if r["method"] == m and r["w_bits"] == b]

                def ms(k: str, rs: list = rs) -> str:
                    v = [r[k] for r in rs]
                    return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}" if len(v) > 1 else f"{v[0]:.4f}"

                rows.append({"model": f"embedded-{name}", "method": m, "W/A": f"{b}/{b}", "fp_top1": f"{rs[0]['fp_top1']:.4f}", "q_top1": ms("q_top1"),
                             "agree_top1": ms("agree_top1"), "kl_to_fp": ms("kl_to_fp"), "wall_s": ms("wall_s"),
                             "peak_rss_mb": f"{max(r['peak_rss_mb'] for r in rs):.0f}", "paper_deit_s": rs[0]["paper_deit_s_top1"]})  # fmt: skip
    write("accuracy", args.out, {"settings": vars(args) | {"out": str(args.out)}, "runs": raw}, rows, list(rows[0]))


if __name__ == "__main__":
    main()
