"""A sweep folder: what is finished, what failed, and the report, readable at any time.

Layout (every file written atomically: a killed sweep never leaves a half-written result)::

    DIR/sweep.json          the spec of the latest run (its result settings guard resumes)
    DIR/cells/<key>.json    one finished cell, in benchmarks.accuracy's format (env/settings/runs)
    DIR/failed/<key>.json   one failed cell: error, traceback, host (removed when a rerun succeeds)
    DIR/report.md           the Markdown table, rewritten after every finished cell
    DIR/log.jsonl           one line per sweep invocation (backend, cells run, wall time)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils import atomic_write_bytes, atomic_write_json
from .spec import Cell, SweepSpec

#: bit-widths the report always shows (the columns of ``benchmarks.report``)
REPORT_BITS = (3, 4, 6)


@dataclass
class SweepFolder:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # ------------------------------------------------------------------ paths
    @property
    def cells_dir(self) -> Path:
        return self.root / "cells"

    @property
    def failed_dir(self) -> Path:
        return self.root / "failed"

    def cell_path(self, cell: Cell) -> Path:
        return self.cells_dir / f"{cell.key}.json"

    def failed_path(self, cell: Cell) -> Path:
        return self.failed_dir / f"{cell.key}.json"

    def result_files(self) -> list[Path]:
        return sorted(self.cells_dir.glob("*.json"))

    def failed_files(self) -> list[Path]:
        return sorted(self.failed_dir.glob("*.json"))

    # ------------------------------------------------------------------ state
    def is_done(self, cell: Cell) -> bool:
        """A cell is finished when its result file exists and parses (writes are atomic)."""
        path = self.cell_path(cell)
        if not path.is_file():
            return False
        try:
            return bool(json.loads(path.read_text()).get("runs"))
        except (OSError, ValueError):
            return False

    def check(self, spec: SweepSpec) -> None:
        """Check, writing nothing, that this folder can take ``spec``: new or empty, or a sweep
        folder whose finished cells were computed with the same result settings (calibration
        images, iterations, test images, data, weights, matmul dtype, ablations); ``ValueError`` naming
        the first difference otherwise. Device and threads may change between runs (each cell records
        where it ran)."""
        meta = self.root / "sweep.json"
        if meta.is_file():
            try:
                old = json.loads(meta.read_text())["spec"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{meta} is not a sweep record ({e}); use another folder") from None
            defaults = SweepSpec().to_dict()
            for k, v in spec.result_settings().items():
                if old.get(k, defaults[k]) != v:
                    raise ValueError(
                        f"{self.root} holds cells run with {k}={old.get(k, defaults[k])!r}, this sweep has {k}={v!r}; "
                        "use another folder (or the same settings to resume)"
                    )
        elif self.root.is_file() or (self.root.is_dir() and any(self.root.iterdir())):
            raise ValueError(f"{self.root} exists and is not a sweep folder; choose another folder")

    def prepare(self, spec: SweepSpec) -> None:
        """:meth:`check`, then create the folder and record ``spec`` as its latest."""
        self.check(spec)
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / "sweep.json", {"spec": spec.to_dict(), "written": time.strftime("%Y-%m-%d %H:%M:%S")})

    def record(self, cell: Cell, outcome: dict[str, Any]) -> None:
        """Store what :func:`isvit_viz.sweep.cell.execute_cell` returned, then refresh the report."""
        if outcome["status"] == "done":
            atomic_write_json(self.cell_path(cell), outcome["payload"])
            self.failed_path(cell).unlink(missing_ok=True)
        else:
            atomic_write_json(self.failed_path(cell), {"cell": cell.key, **{k: v for k, v in outcome.items() if k != "status"}})
        self.write_report()

    def log(self, entry: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    # ------------------------------------------------------------------ report
    def report(self) -> str:
        """The Markdown table of ``benchmarks.report`` over the finished cells (the W3/W4/W6 columns,
        plus any other bit-width the folder holds)."""
        from ..results import merge, render

        files = self.result_files()
        cells = merge(files)
        bits = tuple(sorted(set(REPORT_BITS) | {b for _, _, b in cells}))
        return render(cells, bits=bits)

    def write_report(self) -> None:
        atomic_write_bytes(self.root / "report.md", (self.report() + "\n").encode())

    def status(self) -> dict[str, Any]:
        """Counts of finished and failed cells and, for the failed, ``key: error`` lines; the
        number of cells the folder's latest spec still lacks (``pending``)."""
        done = {p.stem for p in self.result_files()}
        failed = {}
        for p in self.failed_files():
            try:
                failed[p.stem] = json.loads(p.read_text()).get("error", "?")
            except (OSError, ValueError):
                failed[p.stem] = "unreadable failure record"
        pending = None
        meta = self.root / "sweep.json"
        if meta.is_file():
            spec = SweepSpec.from_dict(json.loads(meta.read_text())["spec"])
            pending = sum(1 for c in spec.cells() if c.key not in done and c.key not in failed)
        return {"done": len(done), "failed": failed, "pending": pending}


def sweep_report(root: str | Path) -> str:
    """The report of a sweep folder (``isvit-viz sweep report DIR``); ``FileNotFoundError`` if
    ``root`` is not a sweep folder."""
    folder = SweepFolder(Path(root))
    if not folder.cells_dir.is_dir():
        raise FileNotFoundError(f"{root} is not a sweep folder (no cells/ in it)")
    return folder.report()
