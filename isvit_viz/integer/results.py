"""Load the committed integer-attention benchmark (``benchmarks/results/integer_attention.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
                "bits": key.upper(),
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
                e2e.append({"bits": key.upper(), "path": label, "top1": e["q_top1"], "agree_fp": e["agree_top1"],
                            "agree_fake": e.get("agree_with_fake", 1.0), "kl_to_fp": e["kl_to_fp"], "n": r["n"]})  # fmt: skip
    ops = [{"variant": v, **c} for v, c in data["op_counts"]["per_image_model"].items()]
    secs = data["timing"]["seconds"]
    timing = []
    for k, v in secs.items():
        base = secs.get(f"{k.split('_')[0]}_fp32")
        timing.append({"what": k, "ms_min": 1e3 * v["min_s"], "ms_median": 1e3 * v["median_s"],
                       "x_fp32_min": v["min_s"] / base["min_s"] if base else None})  # fmt: skip
    return {"layers": layers, "end_to_end": e2e, "op_counts": ops, "timing": timing}
