"""What each reconstruction method costs at its own settings on this machine, measured on a short run.

Runs every reconstruction method twice with a few Adam steps per unit (``--steps`` and twice that) at
the method's own batch size, times each reconstruction stage, and extrapolates linearly to the method's
own number of steps per unit (QDrop/BRECQ: 20,000; I&S-ViT: 1000, 200 at W6/A6): the per-step cost is
the difference of the two runs over ``--steps``, the fixed part (capturing unit inputs and targets) what
remains of the first. The ratio to I&S-ViT is measured side by side in one process.

python -m benchmarks.method_cost [--models vit swin] [--bits 3] [--steps 50] [--matmul-dtype bfloat16]
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

import isvit_viz as iv
from isvit_viz.calib import METHODS, Method, Reconstruct
from isvit_viz.calib.pipeline import _default_iters

from ._common import parser, write

RECON_METHODS = ("isvit", "isvit-official", "qdrop", "brecq", "qdrop-ste")


def _with_steps(name: str, steps: int) -> Method:
    m = METHODS[name]
    return replace(m, stages=tuple(replace(s, iters=steps) if isinstance(s, Reconstruct) else s for s in m.stages))


def _stage_times(model: Any, name: str, bits: int, calib: torch.Tensor, steps: int, dtype: str) -> dict[str, float]:
    res = iv.quantize(model, _with_steps(name, steps), bits, bits, calib, progress=False, matmul_dtype=dtype)
    return {s.name: res.timings[s.name] for s in METHODS[name].stages if isinstance(s, Reconstruct)}


def measure(model: Any, name: str, bits: int, calib: torch.Tensor, steps: int, dtype: str) -> dict[str, Any]:
    """Short-run timings of ``name`` and the extrapolation to its own steps per unit (see the module doc)."""
    one = _stage_times(model, name, bits, calib, steps, dtype)
    two = _stage_times(model, name, bits, calib, 2 * steps, dtype)
    own_total, stages = 0.0, {}
    for s in (s for s in METHODS[name].stages if isinstance(s, Reconstruct)):
        own = s.iters if s.iters is not None else _default_iters(bits)
        per_step = max(two[s.name] - one[s.name], 0.0) / steps
        fixed = max(one[s.name] - steps * per_step, 0.0)
        est = fixed + own * per_step
        stages[s.name] = {"own_steps": own, "batch_size": s.batch_size or 64, "fixed_s": round(fixed, 2),
                          "per_step_all_units_s": round(per_step, 4), "estimated_s": round(est, 1)}  # fmt: skip
        own_total += est
    return {"method": name, "w_bits": bits, "stages": stages, "estimated_recon_s": round(own_total, 1)}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="*", default=["vit", "swin"])
    p.add_argument("--methods", nargs="*", default=list(RECON_METHODS))
    p.add_argument("--bits", nargs="*", type=int, default=[3])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--matmul-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.models, args.methods, args.bits, args.steps, args.calib = ["vit"], ["isvit", "qdrop"], [4], 1, 64
    runs, rows = [], []
    for model_name in args.models:
        model, splits = iv.load_embedded(model_name)
        calib = splits.calib_tensors(args.calib)[0]
        for bits in args.bits:
            recs = [measure(model, m, bits, calib, args.steps, args.matmul_dtype) for m in args.methods]
            ref = next((r["estimated_recon_s"] for r in recs if r["method"] == "isvit"), None)
            for r in recs:
                r["model"] = model_name
                r["vs_isvit"] = round(r["estimated_recon_s"] / ref, 2) if ref else None
                runs.append(r)
                rows.append({"model": model_name, "method": r["method"], "W/A": f"{bits}/{bits}",
                             "steps per unit (own)": " + ".join(str(s["own_steps"]) for s in r["stages"].values()),
                             "estimated reconstruction (h)": f"{r['estimated_recon_s'] / 3600:.2f}",
                             "vs isvit": r["vs_isvit"]})  # fmt: skip
    write("method_cost", args.out, {"settings": vars(args) | {"out": str(args.out)}, "runs": runs}, rows, list(rows[0]))


if __name__ == "__main__":
    main()
