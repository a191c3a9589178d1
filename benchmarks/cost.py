"""Calibration cost of the I&S-ViT pipeline: per-stage wall time and peak RSS vs calibration-set size,
iterations and model size, plus the fake-quant forward overhead measured side by side.

    python -m benchmarks.cost
"""

from __future__ import annotations

import copy
import time

import torch

import isvit_viz as iv
from isvit_viz.models import create
from isvit_viz.quant.config import QuantConfig
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


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--spill-budget-mb", type=float, default=16.0, help="cache budget of the spilling series")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, splits = iv.load_embedded("vit")
    sizes = [64, 128] if args.smoke else [128, 256, 512, 1024, 2048]
    iters = 2 if args.smoke else 50
    rows = []

    def timed(what: str, x: int, calib: torch.Tensor, it: int, **kw) -> dict:
        reset_peak_rss()  # each row's peak is its own run's (Linux)
        t0 = time.perf_counter()
        res = iv.quantize(model, "isvit", 4, 4, calib, iters=it, batch_size=min(64, len(calib)), progress=False, **kw)
        row = {"what": what, "x": x, "iters": it, "wall_s": time.perf_counter() - t0,
               **{f"{k}_s": v for k, v in res.timings.items() if k != "total"}, "peak_rss_mb": peak_rss_mb()}  # fmt: skip
        rows.append(row)
        return row

    for n in sizes:  # caches in host memory
        timed("calib_images", n, splits.calib_tensors(n)[0], iters)
    for n in sizes:  # caches past a small budget spill to disk: peak RSS should stay flat
        timed("calib_images (spill)", n, splits.calib_tensors(n)[0], iters, memory_budget=int(args.spill_budget_mb * 2**20))
    calib, _ = splits.calib_tensors(256 if not args.smoke else 64)
    for it in [2, 4] if args.smoke else [25, 50, 100, 200]:
        timed("iters", it, calib, it)
    fits = {}
    for what in ("calib_images", "calib_images (spill)", "iters"):
        rs = [r for r in rows if r["what"] == what]
        a, b, r2 = fit_line([r["x"] for r in rs], [r["wall_s"] for r in rs])
        fits[what] = {"intercept_s": a, "slope_s_per_unit": b, "r2": r2}
        a, b, r2 = fit_line([r["x"] for r in rs], [r["peak_rss_mb"] for r in rs])
        fits[what + " peak_rss"] = {"intercept_mb": a, "slope_mb_per_unit": b, "r2": r2}
    # per-iteration cost on 224 px shapes (random init, synthetic inputs), extrapolated to 1000 iterations
    shapes = ["deit_tiny_patch16_224"] if args.smoke else ["deit_tiny_patch16_224", "deit_small_patch16_224"]
    for name in shapes:
        m = create(name)
        x = torch.randn(8 if args.smoke else 64, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        t = {}
        reset_peak_rss()
        for it in (1, 3):
            t0 = time.perf_counter()
            res = iv.quantize(m, "isvit", 3, 3, x, iters=it, batch_size=8, progress=False)
            t[it] = (time.perf_counter() - t0, res.timings)
        per_iter = (t[3][0] - t[1][0]) / 2
        units = 2 * (len(m.blocks) + 1) + 1  # stage-1 units (no patch embed) + stage-3 units
        rows.append({"what": f"{name} (bs 8)", "x": 1, "iters": 1, "wall_s": t[1][0], "per_unit_iter_s": per_iter / units,
                     "extrapolated_1000_iters_min": (t[1][0] + per_iter * 999) / 60, "peak_rss_mb": peak_rss_mb()})  # fmt: skip
    x = splits.test_tensors(64 if args.smoke else 256)[0]
    ovh = forward_overhead(model, x, 3 if args.smoke else 10)
    rows.append(
        {
            "what": "fake-quant forward / FP forward (embedded ViT, 256 images)",
            "x": 0,
            "iters": 0,
            "wall_s": ovh["fake_quant_s"],
            "ratio": ovh["ratio"],
        }
    )
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
