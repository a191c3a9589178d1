"""Sweeps: method x bit-width x model x seed grids as Ray tasks, resumable, with the accuracy report.

    from isvit_viz.sweep import SweepSpec, run_sweep, sweep_report
    spec = SweepSpec(models=["vit"], methods=["minmax", "isvit"], bits=[3, 4], seeds=[0, 1], iters=100)
    run_sweep(spec, "runs/sweep")          # Ray: local instance, or address= / $RAY_ADDRESS
    print(sweep_report("runs/sweep"))      # the benchmarks.report table, at any time

Command line: ``isvit-viz sweep --spec grid.yaml --out DIR`` and ``isvit-viz sweep report DIR``.
Ray is optional (``pip install "isvit_viz[sweep]"``); without it the cells run one after another.
"""

from .cell import execute_cell, run_cell
from .runner import SweepSummary, check_address, run_sweep
from .spec import Cell, SweepSpec, load_spec
from .store import SweepFolder, sweep_report

__all__ = [
    "Cell",
    "SweepFolder",
    "SweepSpec",
    "SweepSummary",
    "check_address",
    "execute_cell",
    "load_spec",
    "run_cell",
    "run_sweep",
    "sweep_report",
]
