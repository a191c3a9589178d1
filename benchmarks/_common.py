"""Shared helpers: argument parsing, JSON + Markdown output under runs/bench/."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from isvit_viz.experiments import markdown_table
from isvit_viz.utils import atomic_write_bytes, atomic_write_json

OUT = Path(os.environ.get("ISVIT_BENCH_OUT", "runs/bench"))


def parser(desc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=desc)
    p.add_argument("--smoke", action="store_true", help="tiny settings (seconds), used by the test suite")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    return p


def env() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}  # fmt: skip


def write(name: str, out: Path, payload: dict[str, Any], rows: list[dict[str, Any]], cols: list[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    # default=str: paths among the settings (e.g. --checkpoint-root) are recorded as strings
    payload = json.loads(json.dumps({"env": env(), **payload, "rows": rows}, default=str))
    atomic_write_json(out / f"{name}.json", payload)
    md = f"# {name}\n\n" + markdown_table(rows, cols) + "\n"
    atomic_write_bytes(out / f"{name}.md", md.encode())
    print(md)
    return out / f"{name}.json"
