"""Merge accuracy JSON files (from ``benchmarks.accuracy``, possibly run on several machines) into one
Markdown table: one row per model x method, one column group per bit-width, mean over seeds.

    python -m benchmarks.report runs/bench/*/accuracy.json > table.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from isvit_viz.paper import paper_top1


def device_label(env: dict) -> str:
    return env.get("cuda") or f"CPU x{env.get('threads', 1)}"


def merge(paths: list[Path]) -> dict[tuple[str, str, int], list[dict]]:
    """Group run records by (model, method, bits); each record gains its ``device`` label."""
    cells: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for path in paths:
        payload = json.loads(Path(path).read_text())
        dev = device_label(payload.get("env", {}))
        for r in payload["runs"]:
            cells[(r["model"], r["method"], r["w_bits"])].append({**r, "device": dev})
    return cells


def render(cells: dict[tuple[str, str, int], list[dict]], bits: tuple[int, ...] = (3, 4, 6)) -> str:
    """Markdown: top-1 % / agreement % / KL per bit-width, the device(s) and the paper's DeiT-S top-1."""

    def cell(rs: list[dict]) -> str:
        if not rs:
            return "–"
        m = {k: statistics.mean(r[k] for r in rs) for k in ("q_top1", "agree_top1", "kl_to_fp")}
        s = f"{100 * m['q_top1']:.2f} / {100 * m['agree_top1']:.1f} / {m['kl_to_fp']:.4f}"
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
