"""Top-1/top-5 evaluation of classifiers over a DataLoader, streaming: only logits are kept.

Every function iterates its loader once and holds one batch at a time, so host memory grows with the
logits (N x classes float32: 200 MB for the 50,000 ImageNet val images) and not with the images.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .utils import resolve_device

#: Names accepted for autocast evaluation (``dtype=``); ``"float32"`` / ``None`` mean no autocast.
EVAL_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _autocast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype == torch.float32 else dtype
    if dtype not in EVAL_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EVAL_DTYPES)}, got {dtype!r}")
    return EVAL_DTYPES[dtype]


def _model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    dev = resolve_device(device, model)
    p = next(iter(model.parameters()), None)
    if p is not None and (p.device.type != dev.type or (dev.index is not None and p.device.index != dev.index)):
        raise ValueError(f"the model is on {p.device} but device={str(dev)!r} was requested; move it first (model.to(...))")
    return dev


class _Rows:
    """Row buffer for logits: preallocated when the number of rows is known, else chunks joined once."""

    def __init__(self, expected: int | None) -> None:
        self.expected, self.buf, self.chunks, self.n = expected, None, [], 0

    def add(self, t: torch.Tensor) -> None:
        if self.buf is None and self.expected is not None and not self.chunks:
            self.buf = t.new_empty((self.expected, *t.shape[1:]))
        if self.buf is not None and self.n + len(t) <= len(self.buf):
            self.buf[self.n : self.n + len(t)] = t
        else:  # no size hint, or more rows than announced: keep chunks
            if self.buf is not None:
                self.chunks, self.buf = [self.buf[: self.n]], None
            self.chunks.append(t)
        self.n += len(t)

    def result(self) -> torch.Tensor:
        return self.buf[: self.n] if self.buf is not None else torch.cat(self.chunks)


def _expected_rows(loader: Iterable) -> int | None:
    ds = getattr(loader, "dataset", None)
    try:
        return len(ds) if ds is not None else None
    except TypeError:
        return None


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"the loader must yield (images, labels) pairs, got {type(batch).__name__}")
    return batch[0], batch[1]


@torch.no_grad()
def predict_many(
    models: Sequence[nn.Module],
    loader: Iterable,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "eval",
    dtypes: Sequence[str | torch.dtype | None] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One pass over ``loader``: every model sees each batch before the next batch is drawn.

    Returns ``([logits [N, classes] per model], labels [N])`` on the CPU in float32. ``device``: where the
    models run (default each model's own device; a model on another device is an error). ``dtypes``: per
    model autocast dtype (``"bfloat16"``, ``"float16"``; ``None``/``"float32"`` = plain float32).
    """
    devs = [_model_device(m, device) for m in models]
    casts = [_autocast_dtype(d) for d in (dtypes or [None] * len(models))]
    if len(casts) != len(models):
        raise ValueError(f"dtypes has {len(casts)} entries for {len(models)} models")
    modes = [m.training for m in models]
    expected = _expected_rows(loader)
    rows = [_Rows(expected) for _ in models]
    labels = _Rows(expected)
    try:
        for m in models:
            m.eval()
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            xb, yb = _split_batch(batch)
            for m, dev, cast, out in zip(models, devs, casts, rows):
                ctx = torch.autocast(dev.type, dtype=cast) if cast is not None else nullcontext()
                with ctx:
                    out.add(m(xb.to(dev, non_blocking=True)).float().cpu())
            labels.add(yb.cpu())
            del batch, xb, yb  # hold one batch, not two, while the loader prepares the next
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if labels.n == 0:
        raise ValueError("evaluate: the loader yielded no batches (empty dataset)")
    return [r.result() for r in rows], labels.result()


def predict_logits(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "eval",
    dtype: str | torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, classes] and labels [N] (on CPU) of ``model`` over ``loader`` of (images, labels),
    one pass. ``dtype``: optional autocast dtype (``"bfloat16"`` / ``"float16"``)."""
    (logits,), labels = predict_many([model], loader, device, progress, desc, [dtype])
    return logits, labels


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(1).double().mean())


def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device | None = None,
    progress: bool = True,
    dtype: str | torch.dtype | None = None,
) -> dict[str, float | int]:
    """Evaluate ``model`` on ``loader`` (one pass); returns ``{"top1": float in [0,1], "top5": float, "n": int}``."""
    logits, labels = predict_logits(model, loader, device, progress, dtype=dtype)
    return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5), "n": int(labels.numel())}


def compare_to_fp(
    fp_model: nn.Module,
    q_model: nn.Module,
    loader: Iterable,
    device: str | torch.device | None = None,
    progress: bool = True,
    fp_outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    fp_dtype: str | torch.dtype | None = None,
) -> dict[str, float | int]:
    """FP vs quantized on the same data: ``fp_top1``, ``q_top1``, ``agree_top1`` (share of images whose
    quantized top-1 equals the FP top-1), ``kl_to_fp`` (mean KL(FP || quantized) of the softmax
    outputs, in nats) and ``n``.

    Streams: ``loader`` (a DataLoader or a list of (images, labels) batches) is iterated once, both
    models run on each batch. ``fp_outputs``: the FP model's :func:`predict_logits` over the same
    ``loader`` when already computed (comparing many quantized models to one FP model); only the
    quantized model then runs, and the loader must yield the same labels in the same order.
    ``fp_dtype``: autocast dtype for the FP reference (``"bfloat16"`` / ``"float16"``, e.g. on CUDA);
    the quantized model always runs in float32.
    """
    if fp_outputs is None:
        (fp_logits, q_logits), labels = predict_many(
            [fp_model, q_model], loader, device, progress, "eval fp + quant", [fp_dtype, None]
        )
    else:
        fp_logits, labels = fp_outputs
        q_logits, q_labels = predict_logits(q_model, loader, device, progress, desc="eval quant")
        if q_labels.shape != labels.shape or not torch.equal(q_labels, labels):
            raise ValueError(f"the loader yielded other labels ({q_labels.numel()} images) than fp_outputs "
                             f"({labels.numel()} images); it must be deterministic (shuffle=False)")  # fmt: skip
    p_log = torch.log_softmax(fp_logits.double(), 1)
    q_log = torch.log_softmax(q_logits.double(), 1)
    kl = (p_log.exp() * (p_log - q_log)).sum(1).mean()
    return {
        "fp_top1": topk_accuracy(fp_logits, labels, 1),
        "q_top1": topk_accuracy(q_logits, labels, 1),
        "agree_top1": float((fp_logits.argmax(1) == q_logits.argmax(1)).double().mean()),
        "kl_to_fp": float(kl),
        "n": int(labels.numel()),
    }
