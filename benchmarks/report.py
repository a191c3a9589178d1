"""Merge accuracy JSON files (from ``benchmarks.accuracy``, possibly run on several machines) into one
Markdown table: one row per model x method, one column group per bit-width, mean ± sample std over
seeds, and where each cell ran (device and reconstruction matmul dtype). The logic lives in
:mod:`isvit_viz.results` (the notebooks render the same table).

    python -m benchmarks.report runs/bench/*/accuracy.json > table.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from isvit_viz.results import device_label, merge, render

__all__ = ["device_label", "main", "merge", "render"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("paths", nargs="+", type=Path)
    args = p.parse_args(argv)
    print(render(merge(args.paths)))


if __name__ == "__main__":
    main()
