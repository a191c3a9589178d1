"""Merge accuracy JSON files (from ``benchmarks.accuracy``, possibly run on several machines) into one
Markdown table: one row per model x method, one column group per bit-width, mean ± sample std over
seeds, and where each cell ran (device and reconstruction matmul dtype).

    python -m benchmarks.report runs/bench/*/accuracy.json > table.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from isvit_viz.paper import paper_top1

_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}


def device_label(env: dict, settings: dict | None = None) -> str:
    """``"NVIDIA H100 80GB HBM3 fp32"``, ``"CPU x2 bf16"``: the device and the reconstruction matmul dtype."""
    dtype = (settings or {}).get("matmul_dtype", "float32")
    return f"{env.get('cuda') or 'CPU x' + str(env.get('threads', 1))} {_DTYPE.get(dtype, dtype)}"


def merge(paths: list[Path]) -> dict[tuple[str, str, int], list[dict]]:
    """Group run records by (model, method, bits); each record gains its ``device`` label."""
    cells: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for path in paths:
        payload = json.loads(Path(path).read_text())
        dev = device_label(payload.get("env", {}), payload.get("settings"))
        for r in payload["runs"]:
            cells[(r["model"], r["method"], r["w_bits"])].append({**r, "device": dev})
    return cells


def render(cells: dict[tuple[str, str, int], list[dict]], bits: tuple[int, ...] = (3, 4, 6)) -> str:
    """Markdown: top-1 % / agreement % / KL per bit-width (mean ± sample std when a cell has several
    seeds), the device(s) and the paper's DeiT-S top-1."""

    def cell(rs: list[dict]) -> str:
        if not rs:
            return "–"

        def fmt(k: str, scale: float, digits: int) -> str:
            v = [scale * r[k] for r in rs]
            s = f"{statistics.mean(v):.{digits}f}"
            return s + (f" ± {statistics.stdev(v):.{digits}f}" if len(v) > 1 else "")

        s = f"{fmt('q_top1', 100, 2)} / {fmt('agree_top1', 100, 1)} / {fmt('kl_to_fp', 1, 4)}"
        return s + (f" (n={len(rs)})" if len(rs) > 1 else "")

    head = (
        ["model", "method"]
        + [f"W{b}/A{b} top-1 / agree / KL" for b in bits]
        + ["run on", "paper DeiT-S " + ", ".join(f"{b}/{b}" for b in bits)]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = ["isvit", "isvit-official", "qdrop", "repq-vit", "ptq4vit", "minmax"]  # the paper's table order

    def key(k: tuple[str, str]) -> tuple:
        return (k[0] != "vit", k[0], order.index(k[1]) if k[1] in order else len(order), k[1])

    for model, method in sorted({(k[0], k[1]) for k in cells}, key=key):
        rows = [cells.get((model, method, b), []) for b in bits]
        devs = sorted({r["device"] for rs in rows for r in rs})
        paper = ", ".join("–" if (v := paper_top1(method, b, b)) is None else f"{v:.2f}" for b in bits)
        lines.append("| " + " | ".join([f"embedded-{model}", method, *map(cell, rows), "; ".join(devs), paper]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("paths", nargs="+", type=Path)
    args = p.parse_args(argv)
    print(render(merge(args.paths)))


if __name__ == "__main__":
    main()
