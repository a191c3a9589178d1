"""Run a sweep: every unfinished cell as a Ray task (local instance or an existing cluster), or one
after another in this process when Ray is not installed.

Each cell asks Ray for ``threads`` CPUs (plus one GPU when ``device`` is CUDA); a local instance
uses all of this machine's cores, so ``cores / threads`` cells run at once. Ray re-runs a task
whose worker or node died (up to 3 times); an exception inside a cell is recorded in
``DIR/failed/`` with its traceback and the other cells go on. Finished cells are written by the
driver as they arrive, so a killed sweep loses only the cells in flight and a rerun skips the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .cell import CellFn, execute_cell
from .spec import Cell, SweepSpec
from .store import SweepFolder

INSTALL_HINT = (
    "Ray is not installed: running the cells one after another in this process "
    "(for parallel or cluster runs: pip install 'isvit_viz[sweep]', i.e. ray[default])"
)
BACKENDS = ("auto", "ray", "serial")


@dataclass
class SweepSummary:
    """What one :func:`run_sweep` call did (times in seconds)."""

    backend: str
    total: int
    skipped: int = 0
    done: int = 0
    failed: int = 0
    not_run: int = 0
    wall_s: float = 0.0
    startup_s: float = 0.0
    cluster_cpus: float | None = None
    cell_s: dict[str, float] = field(default_factory=dict)


def _import_ray() -> Any:
    """The ``ray`` module, or ``None`` when it is not installed."""
    try:
        import ray
    except ImportError:
        return None
    return ray


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast (``ValueError``, one line) when a Ray address ``host:port`` / ``ray://host:port``
    does not accept TCP connections; ``auto`` / ``local`` are left to ``ray.init``."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        host, port = hostport, "10001" if address.startswith("ray://") else "6379"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"Ray cluster at {address} is unreachable ({e.strerror or e})") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0] if s else ''}".rstrip(": ")


def _cell_line(cell: Cell, outcome: dict[str, Any], folder: SweepFolder) -> str:
    if outcome["status"] == "done":
        r = outcome["payload"]["runs"][0]
        return (f"{cell.label}: top-1 {100 * r['q_top1']:.2f} %, agreement {100 * r['agree_top1']:.1f} %, "
                f"KL {r['kl_to_fp']:.4f} ({outcome['cell_s']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MiB)")  # fmt: skip
    return f"{cell.label}: FAILED {outcome['error']} (traceback in {folder.failed_path(cell)})"


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Any]:
    """Send file descriptor 2 (C++ logging included) to a temporary file, and replay what it caught
    afterwards unless ``.discard`` was set."""
    sys.stderr.flush()
    saved, tmp = os.dup(2), tempfile.TemporaryFile()
    state = SimpleNamespace(discard=False)
    os.dup2(tmp.fileno(), 2)
    try:
        yield state
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if not state.discard:
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace"))
        tmp.close()


def _connect(ray: Any, address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` or start a local instance (loopback only, no dashboard, ``num_cpus``
    CPUs: default all cores); ``True`` if this call started the connection (and must shut it down)."""
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about accelerator env vars
        if address:
            with _captured_stderr() as captured:  # Ray's C++ client logs a line per retry while it waits
                try:
                    ray.init(address=address, **quiet)
                except Exception as e:  # ConnectionError, TimeoutError, RuntimeError... all mean "no cluster there"
                    captured.discard = True
                    raise ValueError(
                        f"cannot connect to the Ray cluster at {address}: {_first_line(e)} (no Ray head answered)"
                    ) from None
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
    return True


def _check_resources(ray: Any, spec: SweepSpec) -> float:
    """``ValueError`` when no node can ever run a cell (a task would wait forever); the cluster's CPUs."""
    res = ray.cluster_resources()
    cpus = float(res.get("CPU", 0))
    if spec.device.startswith("cuda") and res.get("GPU", 0) < 1:
        raise ValueError(f"device {spec.device}: the Ray cluster has no GPU (CPU {cpus:g}); use device cpu or add GPU nodes")
    if cpus < spec.threads:
        raise ValueError(f"threads {spec.threads} per cell: the Ray cluster has only {cpus:g} CPUs")
    return cpus


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    address: str | None = None,
    backend: str = "auto",
    max_cells: int | None = None,
    progress: bool = True,
    cell_fn: CellFn | None = None,
    log: Callable[[str], None] | None = None,
) -> SweepSummary:
    """Run the unfinished cells of ``spec`` into the sweep folder ``out`` and return a summary.

    Args:
        spec: the grid (validated here: ``ValueError`` before any cell runs).
        out: the sweep folder (see :mod:`isvit_viz.sweep.store`); finished cells in it are skipped.
        address: an existing Ray cluster (``host:port``, ``ray://host:10001``, ``auto``); default
            ``$RAY_ADDRESS``, else a local Ray instance on all cores. An unreachable address is a
            ``ValueError``.
        backend: ``auto`` (Ray if installed, else serial with a hint), ``ray`` or ``serial``.
        max_cells: stop after this many cells finished (or failed) in this call, cancelling the
            cells in flight (their work is lost); a rerun continues (for time-limited allocations).
        progress: a progress bar over cells and one summary line per finished cell (stderr).
        cell_fn: replaces :func:`isvit_viz.sweep.cell.run_cell` (``(spec, cell) -> payload``);
            shipped to the Ray workers by value when it is a local function.
        log: where messages go (default: stderr).
    """
    from tqdm.auto import tqdm

    say = log or (lambda s: print(s, file=sys.stderr))
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if max_cells is not None and max_cells < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells!r}")
    spec = spec.normalized()
    if address and backend == "serial":
        raise ValueError("an address needs the Ray backend (drop --backend serial)")
    address = address or (os.environ.get("RAY_ADDRESS") if backend != "serial" else None) or None
    if not address:
        spec.check_paths()  # a local run must see the data; on a cluster the workers check their own mounts
    folder = SweepFolder(Path(out))
    folder.check(spec)
    ray = _backend_module(spec, backend, address, say)
    cells = spec.cells()
    summary = SweepSummary(backend="ray" if ray else "serial", total=len(cells))
    t0 = time.perf_counter()
    started = False
    try:
        if ray is not None:
            started = _connect(ray, address)
            summary.startup_s = time.perf_counter() - t0
            summary.cluster_cpus = _check_resources(ray, spec)
        folder.prepare(spec)
        todo = [c for c in cells if not folder.is_done(c)]
        summary.skipped = len(cells) - len(todo)
        if summary.skipped:
            say(f"{folder.root}: {summary.skipped} of {len(cells)} cells already finished, running the other {len(todo)}")
        with tqdm(total=len(cells), initial=summary.skipped, unit="cell", desc="sweep", disable=not progress, file=sys.stderr) as bar:  # fmt: skip
            finished = _recorder(folder, summary, bar, progress, max_cells)
            if ray is not None and todo:
                _run_ray(ray, spec, spec.to_dict(), todo, cell_fn, finished)
            elif todo:
                _run_serial(spec.to_dict(), todo, cell_fn, finished)
    finally:
        if started:
            ray.shutdown()
    summary.not_run = len(cells) - summary.skipped - summary.done - summary.failed
    summary.wall_s = time.perf_counter() - t0
    folder.write_report()
    folder.log({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "address": address, **asdict(summary)})
    return summary


def _backend_module(spec: SweepSpec, backend: str, address: str | None, say: Callable[[str], None]) -> Any:
    """The ``ray`` module the sweep runs on, or None for the serial backend (with the install hint
    under ``auto``); ``ValueError`` when the choice cannot work here."""
    ray = None
    if backend != "serial":
        if address:
            check_address(address)
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # read at import: no retry spam while connecting
        ray = _import_ray()
        if ray is None:
            if backend == "ray" or address:
                raise ValueError("Ray is not installed: pip install 'isvit_viz[sweep]' (ray[default])")
            say(INSTALL_HINT)
    if ray is None and spec.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device cuda: this machine has no CUDA device (and no Ray cluster was given)")
    return ray


def _recorder(
    folder: SweepFolder, summary: SweepSummary, bar: Any, progress: bool, max_cells: int | None
) -> Callable[[Cell, dict[str, Any], int], bool]:
    """What happens to each finished cell (stored, counted, shown); it returns True once ``max_cells``
    cells finished or failed in this call, which stops the sweep."""

    def finished(cell: Cell, outcome: dict[str, Any], in_flight: int) -> bool:
        folder.record(cell, outcome)
        summary.cell_s[cell.key] = outcome.get("cell_s", float("nan"))
        if outcome["status"] == "done":
            summary.done += 1
        else:
            summary.failed += 1
        bar.update(1)
        bar.set_postfix_str(f"done {summary.skipped + summary.done}, failed {summary.failed}, left {in_flight}")
        if progress:
            count = summary.skipped + summary.done + summary.failed
            bar.write(f"[{count}/{summary.total}] {_cell_line(cell, outcome, folder)}", file=sys.stderr)
        return max_cells is not None and summary.done + summary.failed >= max_cells

    return finished


def _run_serial(spec_d: dict[str, Any], todo: list[Cell], cell_fn: CellFn | None, finished: Callable[..., bool]) -> None:
    import torch

    threads = torch.get_num_threads()
    try:
        for i, cell in enumerate(todo):
            if finished(cell, execute_cell(spec_d, asdict(cell), cell_fn), in_flight=len(todo) - i - 1):
                return
    finally:
        torch.set_num_threads(threads)  # run_cell sets the spec's count in this process


def _run_ray(
    ray: Any, spec: SweepSpec, spec_d: dict[str, Any], todo: list[Cell], cell_fn: CellFn | None, finished: Callable[..., bool]
) -> None:
    task = ray.remote(execute_cell).options(
        num_cpus=spec.threads, num_gpus=1 if spec.device.startswith("cuda") else 0, max_retries=3, name="isvit-sweep-cell"
    )
    refs = {task.remote(spec_d, asdict(cell), cell_fn): cell for cell in todo}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            cell = refs[ready[0]]
            try:
                outcome = ray.get(ready[0])
            except Exception as e:  # the worker or its node died after Ray's retries, or OOM kill
                outcome = {"status": "failed", "error": _first_line(e), "traceback": str(e)}
            if finished(cell, outcome, in_flight=len(pending)):
                break
    finally:  # done, max_cells reached, or interrupted: nothing of this sweep keeps running
        left = _cancel(ray, pending)
        if left:
            warnings.warn(f"{len(left)} cancelled sweep cell(s) still running on the Ray cluster after "
                          f"{CANCEL_TIMEOUT_S:.0f} s", RuntimeWarning, stacklevel=2)  # fmt: skip


#: how long :func:`_cancel` keeps asking before it gives up (seconds)
CANCEL_TIMEOUT_S = 60.0


def _cancel(ray: Any, refs: list[Any], poll_s: float = 1.0, timeout_s: float = CANCEL_TIMEOUT_S) -> list[Any]:
    """Force-cancel Ray tasks and wait until each has ended; returns those still unresolved at the timeout.

    Queued tasks are dropped; running ones lose their worker. ``force=True`` because a KeyboardInterrupt
    (``force=False``) can land mid-import (torch, sympy) and leave the reused worker's modules
    half-initialised, so the next cell there fails ("module 'sympy' has no attribute 'logic'"). The
    cancel is repeated until the task has ended: one that reaches a worker after it received the task
    but before it started running it is answered "not running" and dropped by Ray (2.52 retries only
    running tasks), and the cell then runs to its end.
    """
    deadline = time.monotonic() + timeout_s
    while refs:
        for ref in refs:
            ray.cancel(ref, force=True)
        _, refs = ray.wait(refs, num_returns=len(refs), timeout=poll_s)
        if time.monotonic() >= deadline:
            break
    return refs
