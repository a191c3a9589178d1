"""Per-quantizer sensitivity of the embedded ViT at W3/A3 (I&S-ViT and RepQ-ViT): the committed
``sensitivity`` artifact that notebook 05 opens on.

For each method: quantize at the paper settings (1,024 calibration images ``splits.calib_tensors(1024,
seed=0)``; I&S-ViT with 1,000 iterations per unit and stage, reconstruction matmuls in bf16), save the
model under ``--run-dir`` (a rerun loads it instead of reconstructing again), then run
``analysis.sensitivity_study`` on the first ``--n-test`` test images (checkpointed in the run folder, so
an interrupted run resumes), and evaluate the base model and each mixed-precision proposal on the
next ``--val`` test images (held out from the search). Quantizers whose bit-width changes (sweeps,
mixed precision) are recalibrated on the first ``--recal`` calibration images (64: the official
code's initialisation set).

N = 256 analysis images: about 2.3 s of CPU per image (one thread: ~290 passes over the data for the
per-quantizer analysis, ~85 for the sweeps, <= 30 configurations per mixed-precision search) plus
~1 min of recalibration passes, so about 10-11 min of one core per method.

python -m benchmarks.sensitivity [--smoke] [--methods isvit reparam-logsqrt2] [--n-test 256] [--val 2000]
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import isvit_viz as iv
from isvit_viz import results
from isvit_viz.analysis.mixed_precision import sensitivity_study
from isvit_viz.analysis.sensitivity import MEASUREMENTS, SensitivityReport, apply_precision
from isvit_viz.evaluate import compare_to_fp
from isvit_viz.utils import atomic_write_json

from ._common import env, parser

BITS = 3
WORST_KEYS = ("rank", "label", "name", "group", "type", "bits", "kl_on_self", "sqnr_local_self_db", "kl_on", "sqnr_local_db",
              "sqnr_cum_db", "agree_on",
              "kl_off_recovery", "agree_off", "tensor_sqnr_local_db")  # fmt: skip


def _quantized(model, method: str, calib: torch.Tensor, args, run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Load the saved quantized model of ``method`` or make it (and save it with its wall time)."""
    path, meta_path = run_dir / f"{method}_w{BITS}a{BITS}.pt", run_dir / f"{method}_w{BITS}a{BITS}.json"
    loaded = path.is_file() and meta_path.is_file()
    if not loaded:
        t0 = time.perf_counter()
        res = iv.quantize(model, method, BITS, BITS, calib, iters=args.iters, batch_size=min(64, len(calib)), matmul_dtype=args.matmul_dtype if method.startswith("isvit") else "float32",
                          checkpoint_dir=run_dir / f"{method}_progress", progress=not args.quiet)  # fmt: skip
        wall = time.perf_counter() - t0
        iv.save_quantized(res, path)
        atomic_write_json(meta_path, {"wall_s": wall, "timings": res.timings, "config": res.config})
    meta = json.loads(meta_path.read_text())
    return iv.load_quantized(path).model, {**meta, "loaded": loaded}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--methods", nargs="*", default=["isvit", "reparam-logsqrt2"])
    p.add_argument("--n-test", type=int, default=256, help="evaluation images of the analysis (first N of the test split)")
    p.add_argument("--val", type=int, default=2000, help="held-out test images (after the first N) to validate the proposals")
    p.add_argument("--iters", type=int, default=None, help="reconstruction iterations (default: the method's, 1000)")
    p.add_argument("--matmul-dtype", default="bfloat16", choices=["float32", "bfloat16"], help="I&S-ViT reconstruction matmuls")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--recal", type=int, default=64, help="calibration images to recalibrate quantizers whose bit-width changes")
    p.add_argument("--max-trials", type=int, default=30, help="measured configurations per mixed-precision search")
    p.add_argument("--run-dir", type=Path, default=Path("runs/sensitivity"))
    p.add_argument("--results-root", type=Path, default=None, help="where the artifact goes (default: the committed results)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    calib_n, measure, sweep_bits, cell_bits, weightings = 1024, MEASUREMENTS, (2, 4, 6, 8), (2, 8), ("count", "elements")
    if args.smoke:
        calib_n, args.iters, args.n_test, args.val, args.quiet, args.recal, args.max_trials = 32, 1, 4, 8, True, 16, 3
        measure, sweep_bits, cell_bits, weightings = ("on", "off"), (2,), (), ("count",)
    t_start = time.perf_counter()
    run_dir = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    model, splits = iv.load_embedded("vit")
    calib, _ = splits.calib_tensors(calib_n, seed=0)
    x_all, y_all = splits.test_tensors(args.n_test + args.val)
    data = DataLoader(TensorDataset(x_all[: args.n_test], y_all[: args.n_test]), batch_size=args.batch_size)
    held_out = DataLoader(TensorDataset(x_all[args.n_test :], y_all[args.n_test :]), batch_size=256)
    fp_held_out = None
    out: dict[str, Any] = {}
    for method in args.methods:
        t0 = time.perf_counter()
        qmodel, qmeta = _quantized(model, method, calib, args, run_dir)
        t_quant = time.perf_counter() - t0
        n_recal = args.recal
        t0 = time.perf_counter()
        study = sensitivity_study(qmodel, data, calib[:n_recal], fp_model=model, measure=measure, sweep_bits=sweep_bits,
                                  cell_bits=cell_bits, weightings=weightings, max_trials=args.max_trials, checkpoint=run_dir / f"{method}_sensitivity.json",
                                  progress=not args.quiet)  # fmt: skip
        t_study = time.perf_counter() - t0
        t0 = time.perf_counter()
        if fp_held_out is None:
            from isvit_viz.evaluate import predict_logits

            fp_held_out = predict_logits(model, list(held_out), progress=False)
        validation = {"base": compare_to_fp(model, qmodel, held_out, progress=False, fp_outputs=fp_held_out)}
        for key, res in study["mixed_precision"].items():
            proposal = apply_precision(copy.deepcopy(qmodel), res["bits"], calib[:n_recal])
            validation["mixed_precision" if key == "count+0.5" else f"mixed_precision {key}"] = compare_to_fp(
                model, proposal, held_out, progress=False, fp_outputs=fp_held_out
            )
        t_val = time.perf_counter() - t0
        report = SensitivityReport.from_dict(study["report"])
        worst = [{k: r.get(k) for k in WORST_KEYS} for r in report.worst(10)]
        out[method] = {**study, "worst10": worst, "validation": validation, "recalibration_images": n_recal,
                       "quantize": {"wall_s": qmeta["wall_s"], "timings": qmeta["timings"], "config": qmeta["config"],
                                    "loaded_from_run_dir": qmeta["loaded"], "this_run_s": t_quant},
                       "wall_s": {**study["wall_s"], "study_total": t_study, "validation": t_val}}  # fmt: skip
        mpc = study["mixed_precision"].get("count+0.5")
        if mpc:
            print(f"{method}: agreement {mpc['base_metrics']['agree']:.4f} -> {mpc['metrics']['agree']:.4f} at "
                  f"{mpc['avg_bits']:.2f} avg bits ({len(mpc['upgraded'])} upgraded); held-out {validation['base']['agree_top1']:.4f} -> "
                  f"{validation['mixed_precision']['agree_top1']:.4f}; study {t_study:.0f} s", flush=True)  # fmt: skip
    settings = {
        "model": "embedded vit (Fashion-MNIST)", "w_bits": BITS, "a_bits": BITS, "methods": args.methods, "calib_images": calib_n,
        "calib_seed": 0, "iters": args.iters or 1000, "isvit_matmul_dtype": args.matmul_dtype,
        "eval_images": f"first {args.n_test} test images", "n_test": args.n_test, "batch_size": args.batch_size,
        "validation_images": f"test images {args.n_test}..{args.n_test + args.val - 1}", "measure": list(measure),
        "sweep_bits": list(sweep_bits), "cell_bits": list(cell_bits), "high_bits": 8, "extra_bits": 0.5,
        "recalibration_images": f"first {args.recal} calibration images", "max_trials": args.max_trials,
        "weightings": list(weightings), "threads": args.threads, "smoke": args.smoke, "env": env(),
    }  # fmt: skip
    command = "python -m benchmarks.sensitivity" + (
        "" if argv is None and len(sys.argv) < 2 else " " + " ".join(argv or sys.argv[1:])
    )
    path = results.write_artifact(
        "sensitivity", {"methods": out}, settings, command, time.perf_counter() - t_start, root=args.results_root
    )
    print(f"wrote {path} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
