"""What each reconstruction method costs at its own settings on this machine, from timed steps.

For every reconstruction stage of every method, the method's quantizers are calibrated (``iters=0``),
the inputs and targets of one transformer block (block 1) are captured as that stage captures them, and
``--steps`` Adam steps of the stage's own configuration (batch size, rounding, input mixing, dropping,
step-size learning, loss) are timed on a fresh copy of the block. Methods are timed in interleaved
rounds (``--rounds``) and the median per-step time is kept, so load on a shared machine hits all of
them alike; the ratio to I&S-ViT is the robust figure. The estimate of a full run is
``per-step time x own steps x number of blocks`` per stage (the patch embedding, Swin PatchMerging and
head units are cheap next to the blocks and left out; so are capture and calibration). Losses that
need task-loss gradients (APHQ-ViT's Hessian, FIMA-Q's Fisher rows) add their per-unit preparation and
refresh passes, timed once on block 1: ``(prepare + refreshes x refresh time) x number of blocks``;
APHQ-ViT's MLP reconstruction adds ``per-step time x its steps x number of MLPs`` (+ its preparation).

python -m benchmarks.method_cost [--models vit swin] [--bits 3] [--steps 20] [--matmul-dtype bfloat16]
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

import isvit_viz as iv
from isvit_viz.calib import METHODS, Reconstruct, ReluMLP
from isvit_viz.calib.cache import MemoryBudget
from isvit_viz.calib.capture import capture_unit_io
from isvit_viz.calib.engine import EngineContext, RunSettings, _prepare_loss, _unit_data, _unit_loss, reconstruction_units
from isvit_viz.calib.mlp_recon import MLPReconConfig, aph_weight, block_mlps, positive_quantile, reconstruct_mlp
from isvit_viz.calib.pipeline import _default_iters
from isvit_viz.calib.recon import reconstruct_unit
from isvit_viz.quant.config import QuantConfig
from isvit_viz.quant.wrap import set_quant_state

from ._common import parser, write

RECON_METHODS = ("isvit", "qdrop", "brecq", "aphq-vit", "fima-q")


def _prepared(model: Any, name: str, bits: int, calib: torch.Tensor, dtype: str) -> list[dict[str, Any]]:
    """Per reconstruction stage of ``name``: a block, its captured data and its resolved configuration."""
    res = iv.quantize(model, name, bits, bits, calib, iters=0, progress=False)
    run = RunSettings(iters=None, batch_size=None, lr=None, matmul_dtype=dtype, default_iters=_default_iters(bits))
    ctx = EngineContext(qmodel=res.model, teacher=copy.deepcopy(model).eval(), images=calib, device=torch.device("cpu"),
                        budget=MemoryBudget(None), generator=torch.Generator().manual_seed(0), run=run,
                        model_kind="", progress=False, quant_config=QuantConfig.from_dict(res.config["quant_config"]))  # fmt: skip
    blocks = [(n, u) for n, u, kind in reconstruction_units(res.model) if kind == "block"]
    block_name, block = blocks[1]
    out = [_mlp_item(ctx, s, bits) for s in METHODS[name].stages if isinstance(s, ReluMLP)]
    for stage in (s for s in METHODS[name].stages if isinstance(s, Reconstruct)):
        set_quant_state(res.model, weight=stage.weights == "quantized", act=stage.activations == "quantized")
        caches = _unit_data(stage, ctx, block, ctx.teacher.get_submodule(block_name))
        cfg = run.recon_config(stage)
        loss = _unit_loss(stage, ctx, block_name)
        t0 = time.perf_counter()
        rows, refresh = _prepare_loss(loss, ctx, block_name, block, cfg.iters)
        prep_s = time.perf_counter() - t0
        n_refresh, refresh_s = 0, 0.0
        if refresh is not None:
            n_refresh = sum(loss.refresh(i) for i in range(cfg.iters))
            t0 = time.perf_counter()
            loss.update(*refresh())
            refresh_s = time.perf_counter() - t0
            loss.refresh = lambda _it: False  # the timed steps: no refresh (its cost is counted above)
        out.append({"stage": stage.name, "block": block, "caches": caches, "cfg": cfg, "own_steps": cfg.iters,
                    "n_blocks": len(blocks), "state": (stage.weights == "quantized", stage.activations == "quantized"),
                    "loss": loss, "rows": rows, "unit_extra_s": prep_s + n_refresh * refresh_s})  # fmt: skip
    return out


def _mlp_item(ctx: EngineContext, stage: ReluMLP, bits: int) -> dict[str, Any]:
    """APHQ-ViT's MLP reconstruction of block 1's MLP: data, Hessian weight and clamp bound (timed once)."""
    mlps = block_mlps(ctx.qmodel)
    path, mlp = mlps[1]
    t_mlp = ctx.teacher.get_submodule(path)
    cfg = MLPReconConfig(iters=stage.iters, batch_size=stage.batch_size, lr=stage.lr, clamp_pct=0.99 if bits <= 3 else 0.98)
    t0 = time.perf_counter()
    x, y = capture_unit_io(ctx.teacher, t_mlp, ctx.images, ctx.budget, ctx.device)
    t64, l64 = ctx.teacher_as(torch.float64)
    w = aph_weight(t64, t64.get_submodule(path), ctx.images, l64, ctx.device, cfg.eps, cfg.temperature)
    ub = positive_quantile(t_mlp, x, cfg.clamp_pct, ctx.device)
    return {"stage": stage.name, "mlp": mlp, "caches": (x, y), "weight": w, "ub": ub, "cfg": cfg, "own_steps": cfg.iters,
            "n_blocks": len(mlps), "unit_extra_s": time.perf_counter() - t0}  # fmt: skip


def _time_steps(item: dict[str, Any], steps: int) -> float:
    """Seconds per Adam step of ``item``'s configuration on a fresh copy of its block."""
    from dataclasses import replace

    if "mlp" in item:
        mlp, (x, y) = copy.deepcopy(item["mlp"]), item["caches"]
        cfg = replace(item["cfg"], iters=steps)
        t0 = time.perf_counter()
        reconstruct_mlp(mlp, x, y, item["weight"], item["ub"], cfg, torch.device("cpu"), torch.Generator().manual_seed(0), False)
        return (time.perf_counter() - t0) / steps
    block = copy.deepcopy(item["block"])
    for m in block.modules():
        if hasattr(m, "weight_quant"):
            m.weight_quant, m.act_quant = item["state"]
    x, y, fp_x = item["caches"]
    cfg = replace(item["cfg"], iters=steps)
    t0 = time.perf_counter()
    reconstruct_unit(block, x, y, cfg, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False, fp_inputs=fp_x,
                     loss=item["loss"], grad_rows=item["rows"])  # fmt: skip
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
            total = (per * it["own_steps"] + it["unit_extra_s"]) * it["n_blocks"]
            stages[it["stage"]] = {"own_steps": it["own_steps"], "batch_size": it["cfg"].batch_size, "per_step_s": round(per, 5),
                                   "unit_extra_s": round(it["unit_extra_s"], 2), "estimated_s": round(total, 1)}  # fmt: skip
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
        args.models, args.methods, args.bits, args.steps, args.rounds, args.calib = (
            ["vit"],
            ["isvit", "qdrop", "aphq-vit", "fima-q"],
            [4],
            1,
            1,
            64,
        )
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
