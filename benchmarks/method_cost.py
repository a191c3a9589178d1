"""What each reconstruction method costs at its own settings on this machine, from timed steps.

For every reconstruction stage of every method, the method's quantizers are calibrated (``iters=0``),
the inputs and targets of one transformer block (block 1) are captured as that stage captures them, and
``--steps`` Adam steps of the stage's own configuration (batch size, rounding, input mixing, dropping,
step-size learning, loss) are timed on a fresh copy of the block. Methods are timed in interleaved
rounds (``--rounds``) and the median per-step time is kept, so load on a shared machine hits all of
them alike; the ratio to I&S-ViT is the robust figure. The estimate of a full run is
``per-step time x own steps x number of blocks`` per stage (the patch embedding, Swin PatchMerging and
head units are cheap next to the blocks and left out; so are capture and calibration).

python -m benchmarks.method_cost [--models vit swin] [--bits 3] [--steps 20] [--matmul-dtype bfloat16]
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

import isvit_viz as iv
from isvit_viz.calib import METHODS, Reconstruct
from isvit_viz.calib.cache import MemoryBudget
from isvit_viz.calib.engine import EngineContext, RunSettings, _unit_data, reconstruction_units
from isvit_viz.calib.pipeline import _default_iters
from isvit_viz.calib.recon import reconstruct_unit
from isvit_viz.quant.wrap import set_quant_state

from ._common import parser, write

RECON_METHODS = ("isvit", "qdrop", "brecq")


def _prepared(model: Any, name: str, bits: int, calib: torch.Tensor, dtype: str) -> list[dict[str, Any]]:
    """Per reconstruction stage of ``name``: a block, its captured data and its resolved configuration."""
    res = iv.quantize(model, name, bits, bits, calib, iters=0, progress=False)
    run = RunSettings(iters=None, batch_size=None, lr=None, matmul_dtype=dtype, default_iters=_default_iters(bits))
    ctx = EngineContext(qmodel=res.model, teacher=copy.deepcopy(model).eval(), images=calib, device=torch.device("cpu"),
                        budget=MemoryBudget(None), generator=torch.Generator().manual_seed(0), run=run,
                        model_kind="", progress=False)  # fmt: skip
    blocks = [(n, u) for n, u, kind in reconstruction_units(res.model) if kind == "block"]
    block_name, block = blocks[1]
    out = []
    for stage in (s for s in METHODS[name].stages if isinstance(s, Reconstruct)):
        set_quant_state(res.model, weight=stage.weights == "quantized", act=stage.activations == "quantized")
        caches = _unit_data(stage, ctx, block, ctx.teacher.get_submodule(block_name))
        cfg = run.recon_config(stage)
        out.append({"stage": stage.name, "block": block, "caches": caches, "cfg": cfg, "own_steps": cfg.iters,
                    "n_blocks": len(blocks), "state": (stage.weights == "quantized", stage.activations == "quantized")})  # fmt: skip
    return out


def _time_steps(item: dict[str, Any], steps: int) -> float:
    """Seconds per Adam step of ``item``'s configuration on a fresh copy of its block."""
    from dataclasses import replace

    block = copy.deepcopy(item["block"])
    for m in block.modules():
        if hasattr(m, "weight_quant"):
            m.weight_quant, m.act_quant = item["state"]
    x, y, fp_x = item["caches"]
    cfg = replace(item["cfg"], iters=steps)
    t0 = time.perf_counter()
    reconstruct_unit(block, x, y, cfg, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False, fp_inputs=fp_x)
    return (time.perf_counter() - t0) / steps


def measure(
    model: Any, bits: int, calib: torch.Tensor, methods: list[str], steps: int, rounds: int, dtype: str
) -> list[dict[str, Any]]:
    """Median per-step times (interleaved rounds) and full-run estimates for ``methods``."""
    prepared = {m: _prepared(model, m, bits, calib, dtype) for m in methods}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for m, items in prepared.items():
            for it in items:
                times.setdefault((m, it["stage"]), []).append(_time_steps(it, steps))
    recs = []
    for m, items in prepared.items():
        stages = {}
        for it in items:
            per = statistics.median(times[(m, it["stage"])])
            stages[it["stage"]] = {"own_steps": it["own_steps"], "batch_size": it["cfg"].batch_size, "per_step_s": round(per, 5),
                                   "estimated_s": round(per * it["own_steps"] * it["n_blocks"], 1)}  # fmt: skip
        recs.append(
            {
                "method": m,
                "w_bits": bits,
                "stages": stages,
                "estimated_recon_s": round(sum(s["estimated_s"] for s in stages.values()), 1),
            }
        )
    return recs


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="*", default=["vit", "swin"])
    p.add_argument("--methods", nargs="*", default=list(RECON_METHODS))
    p.add_argument("--bits", nargs="*", type=int, default=[3])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--matmul-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.models, args.methods, args.bits, args.steps, args.rounds, args.calib = ["vit"], ["isvit", "qdrop"], [4], 1, 1, 64
    runs, rows = [], []
    for model_name in args.models:
        model, splits = iv.load_embedded(model_name)
        calib = splits.calib_tensors(args.calib)[0]
        for bits in args.bits:
            recs = measure(model, bits, calib, args.methods, args.steps, args.rounds, args.matmul_dtype)
            ref = next((r["estimated_recon_s"] for r in recs if r["method"] == "isvit"), None)
            for r in recs:
                r["model"] = model_name
                r["vs_isvit"] = round(r["estimated_recon_s"] / ref, 2) if ref else None
                runs.append(r)
                rows.append({"model": model_name, "method": r["method"], "W/A": f"{bits}/{bits}",
                             "steps per block (own)": " + ".join(str(s["own_steps"]) for s in r["stages"].values()),
                             "ms per step": " + ".join(f"{1000 * s['per_step_s']:.1f}" for s in r["stages"].values()),
                             "estimated blocks (h)": f"{r['estimated_recon_s'] / 3600:.2f}", "vs isvit": r["vs_isvit"]})  # fmt: skip
    write("method_cost", args.out, {"settings": vars(args) | {"out": str(args.out)}, "runs": runs}, rows, list(rows[0]))


if __name__ == "__main__":
    main()
