"""Calibration cost of the I&S-ViT pipeline: per-stage wall time and peak RSS vs calibration-set size,
iterations and model size, plus the fake-quant forward overhead measured side by side.

    python -m benchmarks.cost
"""

from __future__ import annotations

import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

import isvit_viz as iv
from isvit_viz.calib.pipeline import reconstruction_units
from isvit_viz.calib.recon import recon_loss, trainable_parameters
from isvit_viz.models import create
from isvit_viz.quant.config import QuantConfig
from isvit_viz.quant.modules import QuantModule
from isvit_viz.quant.wrap import calibrate_activations, calibrate_weights, quantize_model, set_quant_state
from isvit_viz.utils import peak_rss_mb, reset_peak_rss

from ._common import parser, write


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares y = a + b x; returns (a, b, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1.0
    return a, b, 1 - ss_res / ss_tot


def forward_overhead(model: torch.nn.Module, x: torch.Tensor, reps: int) -> dict[str, float]:
    q = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=4, a_bits=4))
    calibrate_weights(q)
    set_quant_state(q, True, True)
    calibrate_activations(q, x)
    times = {"fp": [], "fake_quant": []}
    with torch.no_grad():
        for _ in range(reps):  # interleaved so both see the same machine load
            for key, m in (("fp", model), ("fake_quant", q)):
                t0 = time.perf_counter()
                m(x)
                times[key].append(time.perf_counter() - t0)
    fp, fq = min(times["fp"]), min(times["fake_quant"])
    return {"fp_s": fp, "fake_quant_s": fq, "ratio": fq / fp}


def step_time(
    model: torch.nn.Module, calib: torch.Tensor, batch: int, steps: int, matmul_dtype: torch.dtype | None = None
) -> tuple[float, int, float]:
    """Seconds per reconstruction Adam step of the first block (W3/A3, stage-3 state: quantized
    weights and activations, batch ``batch`` of synthetic block inputs), the number of units, and the
    share of the step's CPU time spent in matrix products (torch.profiler; NaN on CUDA).

    Calibration only (``iters=0``) sets the quantizers up; the step is then timed directly, so the
    extrapolation is not swamped by calibration time as a difference of two short runs would be.
    """
    res = iv.quantize(model, "isvit", 3, 3, calib, iters=0, batch_size=min(64, len(calib)), progress=False)
    units = reconstruction_units(res.model)
    _, blk, _ = next(u for u in units if u[2] == "block")
    for mod in blk.modules():
        if isinstance(mod, QuantModule):
            mod.matmul_dtype = matmul_dtype
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    x = torch.randn(batch, tokens, model.embed_dim, generator=torch.Generator().manual_seed(1))
    y = torch.randn_like(x)
    params = trainable_parameters(blk)
    for p in blk.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=4e-5)

    def step() -> None:
        loss = recon_loss(blk(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    mm_share = sum(self_us.get(k, 0.0) for k in ("aten::mm", "aten::addmm", "aten::bmm")) / max(sum(self_us.values()), 1e-9)
    # stage 1 skips the patch embedding (FP weights, nothing quantized); stage 3 fits every unit;
    # layer units (head, patch embedding) are counted at a block's cost: a slight overestimate
    return per_step, 2 * len(units) - 1, mm_share


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--spill-budget-mb", type=float, default=16.0, help="cache budget of the spilling series")
    p.add_argument("--parts", nargs="*", default=["images", "iters", "shapes", "dtypes", "overhead"],
                   choices=["images", "iters", "shapes", "dtypes", "overhead"])  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, splits = iv.load_embedded("vit")
    sizes = [64, 128] if args.smoke else [128, 256, 512, 1024, 2048]
    iters = 2 if args.smoke else 50
    rows: list[dict] = []

    def timed(what: str, x: int, calib: torch.Tensor, it: int, **kw) -> dict:
        reset_peak_rss()  # each row's peak is its own run's (Linux)
        t0 = time.perf_counter()
        res = iv.quantize(model, "isvit", 4, 4, calib, iters=it, batch_size=min(64, len(calib)), progress=False, **kw)
        row = {"what": what, "x": x, "iters": it, "wall_s": time.perf_counter() - t0,
               **{f"{k}_s": v for k, v in res.timings.items() if k != "total"}, "peak_rss_mb": peak_rss_mb()}  # fmt: skip
        rows.append(row)
        return row

    series = []
    if "images" in args.parts:
        series += ["calib_images", "calib_images (spill)"]
        for n in sizes:  # caches in host memory
            timed("calib_images", n, splits.calib_tensors(n)[0], iters)
        for n in sizes:  # caches past a small budget spill to disk: peak RSS should stay flat
            timed("calib_images (spill)", n, splits.calib_tensors(n)[0], iters, memory_budget=int(args.spill_budget_mb * 2**20))
    if "iters" in args.parts:
        series.append("iters")
        calib, _ = splits.calib_tensors(256 if not args.smoke else 64)
        for it in [2, 4] if args.smoke else [25, 50, 100, 200]:
            timed("iters", it, calib, it)
    fits = {}
    for what in series:
        rs = [r for r in rows if r["what"] == what]
        a, b, r2 = fit_line([r["x"] for r in rs], [r["wall_s"] for r in rs])
        fits[what] = {"intercept_s": a, "slope_s_per_unit": b, "r2": r2}
        a, b, r2 = fit_line([r["x"] for r in rs], [r["peak_rss_mb"] for r in rs])
        fits[what + " peak_rss"] = {"intercept_mb": a, "slope_mb_per_unit": b, "r2": r2}
    if "shapes" in args.parts:
        # per-step cost of one block at batch 64 (fp32), extrapolated to 1000 steps per unit and stage
        shapes = [("embedded-vit", None)]
        shapes += (
            [("deit_tiny_patch16_224", 224)] if args.smoke else [("deit_tiny_patch16_224", 224), ("deit_small_patch16_224", 224)]
        )
        for name, px in shapes:
            m = model if px is None else create(name)
            x = (
                splits.calib_tensors(64)[0]
                if px is None
                else torch.randn(16, 3, px, px, generator=torch.Generator().manual_seed(0))
            )
            per_step, n_units, _ = step_time(m, x, 8 if args.smoke else 64, 1 if args.smoke else 5)
            rows.append({"what": f"{name} block step (bs 64)", "x": n_units, "iters": 1000, "per_unit_iter_s": per_step,
                         "extrapolated_1000_iters_min": per_step * 1000 * n_units / 60})  # fmt: skip
    if "dtypes" in args.parts:
        # fp32 vs bf16 reconstruction matmuls on the embedded ViT, side by side in this process
        calib = splits.calib_tensors(64)[0]
        for label, dt in (("float32", None), ("bfloat16", torch.bfloat16)):
            per_step, n_units, mm = step_time(model, calib, 8 if args.smoke else 64, 1 if args.smoke else 20, dt)
            rows.append({"what": f"embedded-vit block step (bs 64), {label} matmuls", "x": n_units, "iters": 1000,
                         "per_unit_iter_s": per_step, "matmul_share": mm,
                         "extrapolated_1000_iters_min": per_step * 1000 * n_units / 60})  # fmt: skip
    ovh = None
    if "overhead" in args.parts:
        x = splits.test_tensors(64 if args.smoke else 256)[0]
        ovh = forward_overhead(model, x, 3 if args.smoke else 10)
        rows.append({"what": "fake-quant forward / FP forward (embedded ViT, 256 images)", "x": 0, "iters": 0,
                     "wall_s": ovh["fake_quant_s"], "ratio": ovh["ratio"]})  # fmt: skip
    cols = sorted({k for r in rows for k in r}, key=lambda k: (k != "what", k != "x", k))
    write(
        "cost",
        args.out,
        {"fits": fits, "overhead": ovh, "target": "linear in images and iterations; fake-quant forward <= 2.5x FP"},
        rows,
        cols,
    )
    print("fits:", fits)


if __name__ == "__main__":
    main()
