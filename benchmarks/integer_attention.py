"""Integer SULQ attention on the embedded ViT: per-layer SQNR, end-to-end accuracy, op counts, CPU time.

For each bit-width: I&S-ViT (paper-mode SULQ) with calibration + SOS reparameterization only
(``iters=0``, no reconstruction), 1024 calibration images, seed 0. Then, side by side in one run:

* per attention layer, SQNR of the attention core (fake-quant, integer, integer with the float
  softmax, int8 GEMM) against FP and against fake-quant, exponent mismatch of the integer softmax,
  the matched-rounding bit-exactness of ``P V``, and an exhaustive check of the SULQ exponent table;
* end to end: top-1 and agreement with FP of the fake-quant model and of the same model with integer
  attention (shift path, int8-GEMM path) in every block;
* op counts per image; CPU time (one thread) of the attention core of block 0.

The Markdown next to the JSON holds all four tables (:func:`isvit_viz.integer.results.render_markdown`).

    nice -n 5 python -m benchmarks.integer_attention          # writes benchmarks/results/integer_attention.{json,md}
    python -m benchmarks.integer_attention --render-only      # rewrites only the .md from the existing JSON
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import isvit_viz as iv
from isvit_viz import integer
from isvit_viz.integer.export import attention_blocks
from isvit_viz.integer.ops import multiplies_replaced, pv_shifts
from isvit_viz.integer.results import LAYER_MD_COLS, render_markdown
from isvit_viz.integer.sulq_codes import count_mismatches
from isvit_viz.utils import atomic_write_bytes

from ._common import parser, write

COMMAND = "nice -n 5 python -m benchmarks.integer_attention"
NAME = "integer_attention"


def run_bits(model, splits, bits: int, args, test_loader, layer_x: torch.Tensor) -> tuple[dict, list[dict]]:
    calib, _ = splits.calib_tensors(args.calib, seed=0)
    t0 = time.perf_counter()
    res = iv.quantize(model, "isvit", bits, bits, calib, iters=0, seed=0, progress=False)
    q_wall = time.perf_counter() - t0
    params = integer.export_model(res.model)
    rows = integer.layer_report(res.model, layer_x, params)
    for name, attn in attention_blocks(res.model):
        row = next(r for r in rows if r["layer"] == name)
        row["table_mismatches"] = count_mismatches(attn.matmul2.quantizer_a, params[name].table)
    for r in rows:
        r["bits"] = f"W{bits}/A{bits}"
    t0 = time.perf_counter()
    e2e = integer.end_to_end(model, res.model, test_loader, variants=("shift", "gemm"))
    info = {"quantize_wall_s": q_wall, "end_to_end": e2e, "end_to_end_wall_s": time.perf_counter() - t0}
    return {"info": info, "params": params, "qmodel": res.model}, rows


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.set_defaults(out=Path("benchmarks/results"))
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--test", type=int, default=10000, help="test images for the end-to-end numbers")
    p.add_argument("--layer-images", type=int, default=256, help="test images for the per-layer SQNR")
    p.add_argument("--time-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--bits", type=str, default="4,3")
    p.add_argument("--render-only", action="store_true", help="rewrite OUT/integer_attention.md from OUT/integer_attention.json")
    args = p.parse_args(argv)
    if args.render_only:
        render(args.out)
        return
    if args.smoke:
        args.calib, args.test, args.layer_images, args.time_batch, args.repeats, args.bits = 64, 64, 16, 8, 1, "4"
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, splits = iv.load_embedded("vit")
    test_loader = splits.test(args.test)
    layer_x, _ = splits.test_tensors(args.layer_images)

    models, rows, timing, ops = {}, [], {}, {}
    for bits in (int(b) for b in args.bits.split(",")):
        out, layer_rows = run_bits(model, splits, bits, args, test_loader, layer_x)
        models[f"w{bits}a{bits}"] = out["info"]
        rows += layer_rows
        if not timing:  # time block 0 of the first bit-width, all variants side by side
            name, attn = attention_blocks(out["qmodel"])[0]
            x0 = integer.compare.capture_block_inputs(out["qmodel"], layer_x[: args.time_batch])[name]
            timing = {"layer": name, "batch": args.time_batch, "bits": bits, "threads": args.threads, "repeats": args.repeats,
                      "seconds": integer.time_attention(attn, out["params"][name], x0, repeats=args.repeats)}  # fmt: skip
            n_tokens = x0.shape[1]
            counts = integer.model_op_counts(out["params"], n_tokens)
            one = next(iter(out["params"].values()))
            ops = {"n_tokens": n_tokens, "per_image_model": counts, "multiplies_replaced_per_image": multiplies_replaced(counts),
                   "pv_shifts_per_image": pv_shifts(out["params"], n_tokens),
                   "per_head": integer.attention_op_counts(n_tokens, one.head_dim, int(one.thresholds.numel()))}  # fmt: skip
    settings = {"model": "embedded vit", "method": "isvit (paper-mode SULQ)", "iters": 0, "seed": 0, "calib_images": args.calib,
                "test_images": args.test, "layer_images": args.layer_images, "bits": args.bits, "smoke": args.smoke,
                "model_source": "quantized in this run: calibration + SOS reparameterization, no reconstruction"}  # fmt: skip
    payload = {"settings": settings, "command": COMMAND + (" --smoke" if args.smoke else ""), "models": models,
               "op_counts": ops, "timing": timing, "wall_s": time.perf_counter() - t_start}  # fmt: skip
    write(NAME, args.out, payload, rows, list(LAYER_MD_COLS))
    render(args.out)  # write() puts only the layer table in the .md; add end to end, op counts, timing


def render(out: Path) -> Path:
    """Rewrite ``out/integer_attention.md`` with all four tables from ``out/integer_attention.json``."""
    md = render_markdown(integer.load_results(out / f"{NAME}.json"), NAME)
    atomic_write_bytes(out / f"{NAME}.md", md.encode())
    return out / f"{NAME}.md"


if __name__ == "__main__":
    main()
