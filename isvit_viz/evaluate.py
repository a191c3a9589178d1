"""Top-1/top-5 evaluation of a classifier over a DataLoader."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .utils import resolve_device


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: Iterable, device: str | torch.device | None = None, progress: bool = True, desc: str = "eval"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, classes] and labels [N] (on CPU) of ``model`` over ``loader`` of (images, labels)."""
    dev = resolve_device(device, model)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for xb, yb in tqdm(loader, desc=desc, disable=not progress, leave=False):
            logits.append(model(xb.to(dev)).float().cpu())
            labels.append(yb.cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("evaluate: the loader yielded no batches (empty dataset)")
    return torch.cat(logits), torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(1).double().mean())


def evaluate(
    model: nn.Module, loader: Iterable, device: str | torch.device | None = None, progress: bool = True
) -> dict[str, float | int]:
    """Evaluate ``model`` on ``loader``; returns ``{"top1": float in [0,1], "top5": float, "n": int}``."""
    logits, labels = predict_logits(model, loader, device, progress)
    return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5), "n": int(labels.numel())}


def compare_to_fp(
    fp_model: nn.Module,
    q_model: nn.Module,
    loader: Iterable,
    device: str | torch.device | None = None,
    progress: bool = True,
    fp_outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float | int]:
    """FP vs quantized on the same data: ``fp_top1``, ``q_top1``, ``agree_top1`` (share of images whose
    quantized top-1 equals the FP top-1), ``kl_to_fp`` (mean KL(FP || quantized) of the softmax
    outputs, in nats) and ``n``.

    ``fp_outputs``: the FP model's ``predict_logits`` over the same ``loader``, when already computed
    (comparing many quantized models to one FP model).
    """
    batches = list(loader)
    if fp_outputs is None:
        fp_outputs = predict_logits(fp_model, batches, device, progress, desc="eval fp")
    fp_logits, labels = fp_outputs
    q_logits, _ = predict_logits(q_model, batches, device, progress, desc="eval quant")
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
