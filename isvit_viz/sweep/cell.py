"""One cell of a sweep, run in the current process (the sweep's driver, or a Ray worker).

:func:`run_cell` returns the same JSON payload ``python -m benchmarks.accuracy`` writes (``env``,
``settings``, ``runs``), so :func:`isvit_viz.results.merge` reads a sweep folder like any other
accuracy results. :func:`execute_cell` wraps it so that a failure comes back as data (error and
traceback) instead of an exception: one failed cell never stops the others.
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .spec import Cell, SweepSpec

CellFn = Callable[[SweepSpec, Cell], dict[str, Any]]


def env(device: str) -> dict[str, Any]:
    """The run environment, with the keys ``benchmarks.accuracy`` writes (``cuda`` only when the
    cell ran on a GPU, so the report's "run on" column says where it ran) and the host."""
    cuda = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "cuda": cuda, "host": socket.gethostname()}  # fmt: skip


@functools.lru_cache(maxsize=2)
def _embedded(name: str) -> tuple[torch.nn.Module, Any]:
    """Model and packaged splits, loaded once per process (a Ray worker runs many cells)."""
    from ..models.embedded import load_embedded

    return load_embedded(name)


@functools.lru_cache(maxsize=2)
def _timm(name: str, weights: str) -> torch.nn.Module:
    from ..models import create

    return create(name, weights=None if weights == "random" else weights)


def load_inputs(spec: SweepSpec, cell: Cell) -> tuple[torch.nn.Module, Callable[[int], torch.Tensor], Any]:
    """``(fp_model on spec.device, seed -> calibration images [N, C, H, W], test loader)`` of a cell.

    Embedded models: each seed draws ``spec.calib`` of the 2,048 packaged images (as
    ``benchmarks.accuracy`` does), the test set is the first ``spec.test`` images. timm models:
    ``spec.calib`` random images of ``data/train`` drawn with the seed (the official rule), and all of
    ``data/val`` or a class-stratified subset of ``spec.test`` images, the same for every cell."""
    if cell.model in ("vit", "swin"):
        model, splits = _embedded(cell.model)

        def calib(seed: int) -> torch.Tensor:
            return splits.calib_tensors(spec.calib, seed=seed)[0]

        test = splits.test(spec.test)
    else:
        from ..data.imagenet import calibration_images, check_classes, dataset_classes, default_workers, imagefolder_loader

        spec.check_paths()
        model = _timm(cell.model, spec.weights[cell.model])
        data = Path(spec.data or "")
        workers = min(default_workers(), spec.threads)  # JPEG decoding within the CPUs the cell asked for

        def calib(seed: int) -> torch.Tensor:
            return calibration_images(data / "train", model, spec.calib, seed=seed, num_workers=workers)

        # the same class-stratified subset (seed 0) for every cell, so cells compare on the same images
        test = imagefolder_loader(data / "val", model, n=spec.test, batch_size=200, num_workers=workers, seed=0)
        check_classes(dataset_classes(test), model, data / "val")
    return model.to(spec.device), calib, test


def run_cell(spec: SweepSpec, cell: Cell) -> dict[str, Any]:
    """Quantize and evaluate one cell here; returns its result payload (``env``/``settings``/``runs``).

    The run record is :func:`isvit_viz.experiments.run_grid`'s (top-1, agreement, KL, wall time of
    the quantization, peak RSS of this process during the run...) with the ``model`` name; ``sweep``
    holds the cell's key, the process id and the cell's wall and CPU seconds (model loading included)."""
    from ..experiments import run_grid

    t0, c0 = time.perf_counter(), time.process_time()
    torch.set_num_threads(spec.threads)
    model, calib, test = load_inputs(spec, cell)
    (record,) = run_grid(
        model, calib, test, [cell.method], [(cell.w_bits, cell.a_bits)], iters=spec.iters, seeds=[cell.seed],
        batch_size=min(64, spec.calib), device=spec.device, matmul_dtype=spec.matmul_dtype,
        softmax_quantizer=spec.softmax_quantizer, sos=spec.sos,
    )  # fmt: skip
    return {
        "env": env(spec.device),
        "settings": spec.cell_settings(cell),
        "runs": [{"model": cell.model, **record}],
        # cpu_s: CPU time of this process over the cell (all its threads), for cost and overhead estimates
        "sweep": {"cell": cell.key, "pid": os.getpid(), "cell_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0},
    }


def execute_cell(spec: dict[str, Any], cell: dict[str, Any], cell_fn: CellFn | None = None) -> dict[str, Any]:
    """Run a cell and report the outcome as data: ``{"status": "done", "payload": ...}`` or
    ``{"status": "failed", "error": "Type: message", "traceback": ...}``. Takes plain dicts so a
    Ray task ships nothing but JSON-able arguments (plus ``cell_fn`` when one replaces :func:`run_cell`)."""
    s, c = SweepSpec(**spec), Cell(**cell)
    t0 = time.perf_counter()
    try:
        payload = (cell_fn or run_cell)(s, c)
        return {"status": "done", "payload": payload, "cell_s": time.perf_counter() - t0}
    except Exception as e:
        return {
            "status": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0], "traceback": traceback.format_exc(),
            "host": socket.gethostname(), "pid": os.getpid(), "cell_s": time.perf_counter() - t0,
        }  # fmt: skip
