"""Experiment drivers shared by notebooks, benchmarks and the CLI (notebooks only orchestrate)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calib.engine import softmax_choices
from .calib.methods import Method
from .calib.pipeline import quantize
from .evaluate import compare_to_fp, predict_logits
from .paper import paper_top1
from .utils import peak_rss_mb, reset_peak_rss, resolve_device


def run_grid(
    model: nn.Module,
    calib: torch.Tensor | Callable[[int], torch.Tensor],
    test_loader: Iterable,
    methods: Sequence[str | Method],
    bit_settings: Sequence[tuple[int, int]] = ((3, 3), (4, 4), (6, 6)),
    iters: int | None = None,
    seeds: Sequence[int] = (0,),
    progress: bool = False,
    device: str | torch.device | None = None,
    fp_dtype: str | None = None,
    checkpoint_root: str | Path | None = None,
    **quantize_kw: Any,
) -> list[dict[str, Any]]:
    """Quantize ``model`` with every method x bit setting x seed; one record per run with FP and
    quantized top-1, top-1 agreement with FP, KL(FP || quantized), wall time, peak RSS and the
    paper's DeiT-S number for orientation.

    ``calib`` is either one calibration batch ``(N, C, H, W)`` shared by all runs (the seed then
    varies only the mini-batch sampling and QDrop's masks) or a function ``seed -> batch`` that
    draws each seed's own calibration set, as PTQ papers do when they report several seeds.

    ``test_loader`` is streamed (a DataLoader, or a list of batches): the FP logits are computed once
    per grid, then the loader is iterated once per quantized model; only logits are kept. ``device``:
    where the FP model (moved there) and every quantization run execute (default: the model's device).
    ``fp_dtype``: autocast dtype for the FP reference (``"bfloat16"`` / ``"float16"``).
    ``checkpoint_root``: each run checkpoints into ``<root>/<method>_w<w>a<a>_s<seed>`` and resumes from
    it (runs of hours, e.g. QDrop's 20,000 steps per block on a CPU, survive a stopped session)."""
    dev = resolve_device(device, model)
    model = model.to(dev)
    fp_outputs = predict_logits(model, test_loader, dev, progress=False, dtype=fp_dtype)  # once, not once per run
    records = []
    for method in methods:
        name = method if isinstance(method, str) else method.name  # a registered name or a composed Method
        for wb, ab in bit_settings:
            for seed in seeds:
                cuda = dev.type == "cuda"
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                reset_peak_rss()  # each record's peak is its own run's (Linux)
                t0 = time.perf_counter()
                images = calib(seed) if callable(calib) else calib
                ckpt = None if checkpoint_root is None else Path(checkpoint_root) / f"{name}_w{wb}a{ab}_s{seed}"
                res = quantize(model, method, wb, ab, images, iters=iters, seed=seed, progress=progress, device=dev,
                               checkpoint_dir=ckpt, **quantize_kw)  # fmt: skip
                wall = time.perf_counter() - t0
                cmp = compare_to_fp(model, res.model, test_loader, dev, progress=False, fp_outputs=fp_outputs)
                records.append({
                    "method": name, "w_bits": wb, "a_bits": ab, "seed": seed, "iters": res.config["iters"],
                    "batch_size": res.config["batch_size"],
                    "calib_images": res.config["calib_images"], **cmp, "wall_s": wall, "stage_s": dict(res.timings),
                    "peak_rss_mb": peak_rss_mb(),
                    "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None,
                    "paper_deit_s_top1": paper_top1(name, wb, ab),
                    **({"softmax_choice": chosen} if (chosen := softmax_choices(res.unit_losses)) else {}),
                })  # fmt: skip
                del res
    return records


def sos_snapshots(
    model: nn.Module,
    calib: torch.Tensor,
    w_bits: int = 4,
    a_bits: int = 4,
    iters: int | None = None,
    method: str = "isvit",
    **kw: Any,
) -> tuple[dict[str, nn.Module], Any]:
    """Run I&S-ViT and keep a copy of the quantized model after each stage (``calibrated``,
    ``stage1``, ``stage2``, ``stage3``). Returns ``(snapshots, QuantResult)``."""
    snaps: dict[str, nn.Module] = {}
    res = quantize(
        model,
        method,
        w_bits,
        a_bits,
        calib,
        iters=iters,
        callbacks=lambda stage, m: snaps.__setitem__(stage, copy.deepcopy(m).eval()),
        **kw,
    )
    return snaps, res


def markdown_table(records: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    """Render records as a Markdown table (floats to 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in records]
    return "\n".join(lines)
