"""Sweep overhead: one tiny grid run serially, then as Ray tasks on a local instance (wall, CPU, memory).

Grid (defaults): embedded ViT x minmax, repq-vit, isvit (1 iteration) x W4/A4 x seeds 0 1, 32
calibration and 256 test images per cell, 1 thread per cell. Serial: the cells one after another in
this process (``backend="serial"``). Ray: a local instance of ``--cpus`` CPUs, started as
``isvit-viz sweep`` starts one (loopback, no dashboard), then the same sweep. Each run writes its own
temporary sweep folder; the two reports must be identical (the cells are deterministic on the CPU).

Measured: wall time of each run (Ray with and without its import, start-up and shut-down), CPU time
of this process and of every process it started (Ray's GCS, raylet, workers..., read from /proc,
Linux only) per cell, and memory: the peak RSS of each process that ran cells (the largest
``peak_rss_mb`` of its cells: the run record's peak, reset when each cell's run starts, with the
model and data already loaded) and the peak RSS of Ray's own processes.

    HF_HUB_OFFLINE=1 python -m benchmarks.sweep_overhead   # writes benchmarks/results/sweep_overhead.json + .md
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from isvit_viz.sweep import SweepSpec, run_sweep, sweep_report

from ._common import parser, write

COMMAND = "HF_HUB_OFFLINE=1 python -m benchmarks.sweep_overhead"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- /proc
def _stat(pid: int) -> tuple[int, float] | None:
    """``(parent pid, CPU seconds)`` of a live process, ``None`` when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK  # ppid, utime + stime


def _status_mb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _descendants(root: int) -> dict[int, float]:
    """CPU seconds of every live process below ``root`` (Ray's GCS and raylet are its children, the
    workers the raylet's), by pid."""
    parent, cpu = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            parent[int(d.name)], cpu[int(d.name)] = st
    found, todo = {}, [root]
    while todo:
        p = todo.pop()
        for child, pp in parent.items():
            if pp == p and child not in found:
                found[child] = cpu[child]
                todo.append(child)
    return found


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _process(pid: int) -> dict[str, Any]:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    name = Path(cmd.split(" ", 1)[0]).name if cmd else "?"
    # python processes: their script; Ray workers rename themselves ray::IDLE, ray::execute_cell...
    script = next((Path(a).name for a in cmd.split() if a.endswith(".py")), "") if name.startswith("python") else ""
    return {
        "pid": pid,
        "name": f"{name} {script}".strip(),
        "rss_mb": _status_mb(pid, "VmRSS"),
        "peak_rss_mb": _status_mb(pid, "VmHWM"),
    }


# ----------------------------------------------------------------------------- runs
def _cells(out: Path) -> list[dict[str, Any]]:
    """Per cell: key, process, wall and CPU seconds, the run's peak RSS."""
    rows = []
    for p in sorted((out / "cells").glob("*.json")):
        d = json.loads(p.read_text())
        rows.append({"cell": d["sweep"]["cell"], "pid": d["sweep"]["pid"], "cell_s": d["sweep"]["cell_s"],
                     "cpu_s": d["sweep"]["cpu_s"], "peak_rss_mb": d["runs"][0]["peak_rss_mb"]})  # fmt: skip
    return rows


def run_serial(spec: SweepSpec, out: Path) -> dict[str, Any]:
    c0, t0 = _self_cpu(), time.perf_counter()
    summary = run_sweep(spec, out, backend="serial", progress=False, log=lambda s: None)
    wall, cpu = time.perf_counter() - t0, _self_cpu() - c0
    assert summary.done == len(spec.cells()) and not summary.failed, summary
    return {"wall_s": wall, "cpu_s": cpu, "cells": _cells(out)}


def run_ray(spec: SweepSpec, out: Path, cpus: int) -> dict[str, Any]:
    """Import Ray, start a local instance of ``cpus`` CPUs, run the sweep on it, measure, shut down."""
    me = os.getpid()
    t0, c0 = time.perf_counter(), _self_cpu()
    import ray

    from isvit_viz.sweep.runner import _connect

    t_import = time.perf_counter()
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process: the benchmark needs its own instance")
    _connect(ray, None, num_cpus=cpus)  # the sweep's own local start-up, limited to `cpus`
    t_start, c_start, d_start = time.perf_counter(), _self_cpu(), _descendants(me)
    try:
        summary = run_sweep(spec, out, progress=False, log=lambda s: None)  # uses the instance started above
        t_run, c_run, d_run = time.perf_counter(), _self_cpu(), _descendants(me)
        procs = [_process(pid) for pid in d_run]
    finally:
        ray.shutdown()
    t_end = time.perf_counter()
    assert summary.backend == "ray" and summary.done == len(spec.cells()) and not summary.failed, summary
    run_cpu = c_run - c_start + sum(c - d_start.get(pid, 0.0) for pid, c in d_run.items())
    return {
        "import_s": t_import - t0, "startup_s": t_start - t_import, "wall_s": t_run - t_start, "shutdown_s": t_end - t_run,
        "wall_incl_startup_s": t_end - t0, "startup_cpu_s": c_start - c0 + sum(d_start.values()), "cpu_s": run_cpu,
        "cluster_cpus": summary.cluster_cpus, "cells": _cells(out), "processes": procs,
    }  # fmt: skip


# ----------------------------------------------------------------------------- main
def _workers(cells: list[dict[str, Any]]) -> dict[int, float]:
    """Peak RSS (MiB) of each process that ran cells: the largest of its cells' run peaks."""
    peaks: dict[int, float] = {}
    for c in cells:
        peaks[c["pid"]] = max(peaks.get(c["pid"], 0.0), c["peak_rss_mb"])
    return peaks


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.set_defaults(out=Path("benchmarks/results"))
    p.add_argument("--methods", nargs="*", default=["minmax", "repq-vit", "isvit"])
    p.add_argument("--bits", nargs="*", type=int, default=[4])
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    p.add_argument("--iters", type=int, default=1, help="Adam steps per unit and stage (always explicit here)")
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--test", type=int, default=256)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = p.parse_args(argv)
    if args.smoke:
        args.methods, args.seeds, args.calib, args.test = ["minmax"], [0, 1], 16, 64
    os.environ.pop("RAY_ADDRESS", None)  # a local instance, never a cluster this shell points at
    spec = SweepSpec(models=["vit"], methods=args.methods, bits=args.bits, seeds=args.seeds, calib=args.calib,
                     iters=args.iters, test=args.test, threads=args.threads)  # fmt: skip
    n = len(spec.normalized().cells())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sweep_overhead_") as tmp:
        serial = run_serial(spec, Path(tmp) / "serial")  # first: this process holds no Ray state yet
        ray_run = run_ray(spec, Path(tmp) / "ray", args.cpus)
        identical = sweep_report(Path(tmp) / "serial") == sweep_report(Path(tmp) / "ray")
    load_after = os.getloadavg()

    worker_pids = {c["pid"] for c in ray_run["cells"]}
    ray_own = [pr for pr in ray_run["processes"] if pr["pid"] not in worker_pids and not pr["name"].startswith("ray::")]
    idle = [pr for pr in ray_run["processes"] if pr["pid"] not in worker_pids and pr["name"].startswith("ray::")]
    serial_peak, ray_peaks = _workers(serial["cells"]), _workers(ray_run["cells"])

    def mean(rows: list[dict[str, Any]], k: str) -> float:
        return statistics.mean(r[k] for r in rows)

    def row(part: str, wall: float, cpu: float | None, cells: list | None, peaks: str, note: str) -> dict[str, Any]:
        return {"run": part, "wall_s": round(wall, 1), "vs_serial": round(wall / serial["wall_s"], 2),
                "cpu_s_per_cell": "" if cpu is None else round(cpu / n, 2),
                "cell_wall_s": "" if cells is None else round(mean(cells, "cell_s"), 2),
                "cell_cpu_s": "" if cells is None else round(mean(cells, "cpu_s"), 2), "peak_rss_mb": peaks, "note": note}  # fmt: skip

    rows = [
        row("serial", serial["wall_s"], serial["cpu_s"], serial["cells"], f"{max(serial_peak.values()):.0f}",
            "one process, cells one after another"),
        row("ray, with start-up", ray_run["wall_incl_startup_s"], ray_run["startup_cpu_s"] + ray_run["cpu_s"], None, "",
            f"import {ray_run['import_s']:.1f} s + start {ray_run['startup_s']:.1f} s + shut-down {ray_run['shutdown_s']:.1f} s"),
        row("ray, without start-up", ray_run["wall_s"], ray_run["cpu_s"], ray_run["cells"],
            ", ".join(f"{v:.0f}" for v in sorted(ray_peaks.values())),
            f"{len(ray_peaks)} workers ran cells; cpu: all Ray processes and this driver"),
        row("ray's own processes", 0.0, None, None, f"{sum(pr['peak_rss_mb'] or 0 for pr in ray_own):.0f}",
            f"{len(ray_own)} processes (GCS, raylet, monitors...), sum of their peaks; {len(idle)} idle workers "
            f"{sum(pr['rss_mb'] or 0 for pr in idle):.0f} MiB"),
    ]  # fmt: skip
    rows[-1]["wall_s"] = rows[-1]["vs_serial"] = ""
    summary = {
        "reports_identical": identical,
        "wall_ratio_with_startup": ray_run["wall_incl_startup_s"] / serial["wall_s"],
        "wall_ratio_without_startup": ray_run["wall_s"] / serial["wall_s"],
        "wall_s_per_cell_ray_minus_serial": (ray_run["wall_s"] - serial["wall_s"]) / n,
        "cpu_s_per_cell_ray_minus_serial": (ray_run["cpu_s"] - serial["cpu_s"]) / n,
        "peak_rss_mb_serial": max(serial_peak.values()),
        "peak_rss_mb_per_ray_worker": sorted(ray_peaks.values()),
        "peak_rss_mb_ray_own_processes": sum(pr["peak_rss_mb"] or 0 for pr in ray_own),
        "load_average_before_after": [load_before, load_after],
    }
    settings = {"grid": {k: v for k, v in spec.to_dict().items() if k in ("models", "methods", "bits", "seeds", "calib", "iters",
                "test", "threads")}, "cells": n, "ray_cpus": args.cpus, "cpu_count": os.cpu_count()}  # fmt: skip
    payload = {"settings": settings, "command": COMMAND + (" --smoke" if args.smoke else ""), "summary": summary,
               "serial": serial, "ray": ray_run}  # fmt: skip
    write("sweep_overhead", args.out, payload, rows, list(rows[0]))
    print(json.dumps(summary, indent=1))
    if not identical:
        raise SystemExit("the serial and Ray reports differ")


if __name__ == "__main__":
    main()
