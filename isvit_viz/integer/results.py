"""Load the committed integer-attention benchmark (``benchmarks/results/integer_attention.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..experiments import markdown_table

RESULTS_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "integer_attention.json"
#: Top-level keys the benchmark writes (a file without them is from another version).
REQUIRED_KEYS = ("settings", "command", "models", "op_counts", "timing", "rows")


def load_results(path: str | Path | None = None) -> dict[str, Any]:
    """The benchmark JSON as a dict (default: the committed file).

    Raises:
        FileNotFoundError: no file (run ``python -m benchmarks.integer_attention``).
        ValueError: the file lacks one of :data:`REQUIRED_KEYS`.
    """
    p = Path(path) if path is not None else RESULTS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; run: nice -n 5 python -m benchmarks.integer_attention")
    data = json.loads(p.read_text())
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{p} lacks keys {missing}; rerun python -m benchmarks.integer_attention")
    return data


_PATHS = (("fake", "fake-quant"), ("int_shift", "integer, shift-accumulate"), ("int_gemm", "integer, int8 GEMM"))
_LAYER_COLS = ("bits", "layer", "sqnr_fake_vs_fp", "sqnr_int_vs_fp", "sqnr_gemm_vs_fp", "sqnr_int_vs_fake", "sqnr_gemm_vs_fake",
               "exp_mismatch", "pv_bit_exact", "table_mismatches")  # fmt: skip


def summary_tables(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Rows for the tables a reader wants from :func:`load_results` output.

    ``layers`` (per-layer SQNR in dB, exponent mismatch, bit-exactness checks), ``end_to_end`` (top-1,
    agreement with FP and with fake-quant, KL; per bit-width and path), ``op_counts`` (per image, whole
    model, per variant) and ``timing`` (ms, minimum and median, and the ratio of minima to the fp32
    counterpart of the same stage).
    """
    layers = [{k: r[k] for k in _LAYER_COLS if k in r} for r in data["rows"]]
    e2e = []
    for key, m in data["models"].items():
        r = m["end_to_end"]
        e2e.append(
            {
                "bits": key.upper().replace("A", "/A"),  # w4a4 -> W4/A4, as the layer rows
                "path": "FP",
                "top1": r["fp_top1"],
                "agree_fp": 1.0,
                "agree_fake": None,
                "kl_to_fp": 0.0,
                "n": r["n"],
            }
        )
        for k, label in _PATHS:
            if k in r:
                e = r[k]
                e2e.append({"bits": key.upper().replace("A", "/A"), "path": label, "top1": e["q_top1"], "agree_fp": e["agree_top1"],
                            "agree_fake": e.get("agree_with_fake", 1.0), "kl_to_fp": e["kl_to_fp"], "n": r["n"]})  # fmt: skip
    ops = [{"variant": v, **c} for v, c in data["op_counts"]["per_image_model"].items()]
    secs = data["timing"]["seconds"]
    timing = []
    for k, v in secs.items():
        base = secs.get(f"{k.split('_')[0]}_fp32")
        timing.append({"what": k, "ms_min": 1e3 * v["min_s"], "ms_median": 1e3 * v["median_s"],
                       "x_fp32_min": v["min_s"] / base["min_s"] if base else None})  # fmt: skip
    return {"layers": layers, "end_to_end": e2e, "op_counts": ops, "timing": timing}


#: Columns of the per-layer table in the benchmark's Markdown (those a row lacks are left empty).
LAYER_MD_COLS = ("bits", "layer", "sqnr_fake_vs_fp", "sqnr_int_vs_fp", "sqnr_gemm_vs_fp", "sqnr_int_vs_fake",
                 "sqnr_int_fsm_vs_fake", "sqnr_gemm_vs_fake", "exp_mismatch", "pv_bit_exact", "table_mismatches", "eta",
                 "frac_bits", "exp_table_len", "int8_frac_bits", "out_frac_bits", "rescale_shift")  # fmt: skip
_OPS_COLS = ("variant", "mul", "shift", "add", "exp", "div", "lookup", "compare")


def render_markdown(data: dict[str, Any], name: str = "integer_attention") -> str:
    """The benchmark's Markdown report from :func:`load_results` output: per-layer SQNR, end to end,
    operation counts and CPU timing (the four tables of :func:`summary_tables`)."""
    t = summary_tables(data)
    st, tm, ops = data["settings"], data["timing"], data["op_counts"]
    n = t["end_to_end"][0]["n"] if t["end_to_end"] else 0
    parts = [
        f"# {name}\n",
        f"`{data['command']}`: {st['model']}, {st['method']}, {st['calib_images']} calibration images, "
        f"iters={st['iters']}, seed {st['seed']}; {st['model_source']}.\n",
        f"## Per attention layer ({st['layer_images']} test images; SQNR in dB, same Q, K, V for every path)\n",
        markdown_table(data["rows"], [c for c in LAYER_MD_COLS if any(c in r for r in data["rows"])]) + "\n",
        f"## End to end: integer attention in every block ({n} test images)\n",
        "`agree_fp` / `agree_fake`: share of images whose top-1 equals FP's / fake-quant's; `kl_to_fp`: mean "
        "KL(FP || path) in nats.\n",
        markdown_table(t["end_to_end"], ["bits", "path", "top1", "agree_fp", "agree_fake", "kl_to_fp", "n"]) + "\n",
        f"## Operations per image (all attention cores, N = {ops['n_tokens']} tokens)\n",
        markdown_table(t["op_counts"], list(_OPS_COLS)) + "\n",
        f"`P V` multiplies that become shifts: {ops['pv_shifts_per_image']:,} per image; net multiplies saved "
        f"against fp32 (after the correction and the rescale): {ops['multiplies_replaced_per_image']:,}.\n",
        f"## CPU time: {tm['layer']}, W{tm['bits']}/A{tm['bits']}, batch {tm['batch']}, {tm['threads']} thread(s), "
        f"{tm['repeats']} interleaved repeats\n",
        "`x_fp32_min`: ratio of minima to the fp32 counterpart of the same stage (`core_`, `qk_`, `softmax_`, `pv_`).\n",
        markdown_table(t["timing"], ["what", "ms_min", "ms_median", "x_fp32_min"]) + "\n",
    ]
    return "\n".join(parts)
