"""``isvit-viz sweep``: arguments and command (registered by :mod:`isvit_viz.cli`).

isvit-viz sweep --spec grid.yaml --out runs/sweep            # run (Ray if installed), resumable
isvit-viz sweep --models vit --methods isvit qdrop --bits 3 4 --seeds 0 1 --out runs/sweep
isvit-viz sweep report runs/sweep                            # the table, at any time
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .spec import SweepSpec, load_spec

#: CLI flag destinations that map one to one onto :class:`SweepSpec` fields
_FIELDS = (
    "models",
    "methods",
    "bits",
    "seeds",
    "calib",
    "iters",
    "test",
    "data",
    "device",
    "threads",
    "matmul_dtype",
    "softmax_quantizer",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``sweep`` subcommand's arguments (every grid flag defaults to the spec file's value, else
    to :class:`SweepSpec`'s default: the accuracy grid, vit swin x all methods x 3 4 6 x seeds 0 1 2)."""
    p.add_argument("action", nargs="?", choices=["run", "report"], default="run",
                   help="run the grid (default) or print the report of a sweep folder")  # fmt: skip
    p.add_argument("dir", nargs="?", help="the sweep folder (or --out)")
    p.add_argument("--out", help="sweep folder: one JSON per finished cell; rerunning into it resumes")
    p.add_argument("--spec", help="YAML or JSON grid spec (fields of isvit_viz.sweep.SweepSpec); flags override it")
    g = p.add_argument_group("grid")
    g.add_argument("--models", nargs="*", help="vit swin (embedded) or timm names (need --data and --weights)")
    g.add_argument("--methods", nargs="*")
    g.add_argument("--bits", nargs="*", type=int, help="W = A bit-widths, e.g. 3 4 6")
    g.add_argument("--seeds", nargs="*", type=int)
    g.add_argument("--calib", type=int, help="calibration images per cell (default 1024)")
    g.add_argument("--iters", type=int, help="Adam steps per unit and stage (default: the method's)")
    g.add_argument("--test", type=int, help="test images: the first N (embedded), a stratified ImageNet val subset (default all)")
    g.add_argument("--data", help="ImageNet root with train/ and val/ (timm models; shared storage on a cluster)")
    g.add_argument("--weights", nargs="*", metavar="MODEL=FILE", help="per timm model: a weight file, 'timm' or 'random'")
    g.add_argument("--device", help="cpu (default) or cuda: each cell then asks Ray for one GPU")
    g.add_argument("--threads", type=int, help="CPU threads per cell = CPUs each Ray task requests (default 1)")
    g.add_argument("--matmul-dtype", choices=["float32", "bfloat16"])
    g.add_argument("--softmax-quantizer", help="ablation: replace each method's post-softmax quantizer")
    g.add_argument("--no-sos", action="store_true", default=None, help="ablation: one reconstruction stage instead of SOS")
    e = p.add_argument_group("execution")
    e.add_argument("--address", help="existing Ray cluster (host:6379, ray://host:10001, auto); default $RAY_ADDRESS, "
                   "else a local Ray instance on all cores")  # fmt: skip
    e.add_argument("--backend", choices=["auto", "ray", "serial"], default="auto",
                   help="auto: Ray if installed, else one cell after another in this process")  # fmt: skip
    e.add_argument("--max-cells", type=int, help="stop after N cells (cancelling those in flight); rerun to continue")
    e.add_argument("--report", action="store_true", help="only print the report of the sweep folder")
    e.add_argument("--quiet", action="store_true", help="no progress bar or per-cell lines")


def _weights(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        model, sep, value = item.partition("=")
        if not sep or not model or not value:
            raise ValueError(f"--weights takes MODEL=FILE (or MODEL=timm, MODEL=random), got {item!r}")
        out[model] = value
    return out


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """The spec file's fields (if ``--spec``) overridden by the flags given."""
    d: dict[str, Any] = load_spec(args.spec).to_dict() if args.spec else {}
    for name in _FIELDS:
        if getattr(args, name) is not None:
            d[name] = getattr(args, name)
    if args.weights is not None:
        d["weights"] = _weights(args.weights)
    if args.no_sos:
        d["sos"] = False
    return SweepSpec.from_dict(d)


def _cells(n: int) -> str:
    return f"{n} cell" + ("" if n == 1 else "s")


def _print_status(folder: Any) -> None:
    st = folder.status()
    pending = "" if st["pending"] is None else f", {st['pending']} not run"
    print(f"{folder.root}: {_cells(st['done'])} finished, {len(st['failed'])} failed{pending}", file=sys.stderr)
    for key, err in st["failed"].items():
        print(f"  failed {key}: {err} (traceback in {folder.failed_dir / (key + '.json')})", file=sys.stderr)


def run_command(args: argparse.Namespace) -> int:
    """Run (or report) a sweep; exit status 0, or 1 when a cell failed (input errors raise ValueError)."""
    from .store import SweepFolder, sweep_report

    out = args.dir or args.out
    if args.dir and args.out and args.dir != args.out:
        raise ValueError(f"two sweep folders given: {args.dir} and --out {args.out}")
    if args.action == "report" or args.report:
        if not out:
            raise ValueError("the report needs the sweep folder: isvit-viz sweep report DIR")
        print(sweep_report(out))
        _print_status(SweepFolder(out))
        return 0
    if not out:
        raise ValueError("the sweep folder is required: --out DIR (or isvit-viz sweep run DIR)")
    if args.max_cells is not None and args.max_cells < 1:
        raise ValueError(f"--max-cells must be >= 1, got {args.max_cells}")
    return run_and_report(
        spec_from_args(args),
        out,
        address=args.address,
        backend=args.backend,
        max_cells=args.max_cells,
        progress=not args.quiet and sys.stderr.isatty(),
    )


def run_and_report(
    spec: SweepSpec,
    out: str | Path,
    *,
    address: str | None = None,
    backend: str = "auto",
    max_cells: int | None = None,
    progress: bool = True,
) -> int:
    """Run ``spec`` into the sweep folder ``out``, print the report (stdout), the summary and the failed
    cells (stderr); exit status 0, or 1 when a cell failed. Shared by ``isvit-viz sweep`` and
    ``python -m benchmarks.accuracy --sweep`` so both behave the same; input errors raise ``ValueError``."""
    from .runner import run_sweep
    from .store import SweepFolder, sweep_report

    summary = run_sweep(spec, out, address=address, backend=backend, max_cells=max_cells, progress=progress)
    print(sweep_report(out))
    print(f"{_cells(summary.done)} run ({summary.backend}), {summary.skipped} already finished, {summary.failed} failed, "
          f"{summary.not_run} not run; {summary.wall_s:.0f} s", file=sys.stderr)  # fmt: skip
    _print_status(SweepFolder(out))
    return 1 if summary.failed else 0
