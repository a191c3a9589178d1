"""APHQ-ViT's MLP reconstruction: retrain every block MLP to compute with a ReLU (the ``ReluMLP`` stage).

APHQ-ViT (GoatWu/APHQ-ViT ``utils/mlp_recon.py``, ``test_quant.py``) replaces each GELU by a ReLU, whose
output is easier to quantize (no negative tail), and before any quantizer is calibrated trains fc1
and fc2 of every MLP, each independently on FP data, so the ReLU MLP reproduces the FP GELU MLP:

    rec   = sum_tokens((mlp(x) - y)^2 * W).mean() / 10
    clamp = the same with fc2's input clamped to [0, ub]
    loss  = rec + clamp_weight * clamp

``x``: the FP model's fc1 input (post-norm2); ``y``: the FP GELU MLP's output; ``ub``: the ``clamp_pct``
quantile of the positive FP GELU outputs (fc2 inputs) over every image, token and channel (their
configs: 0.99 at W3/A3, 0.98 at W4/A4); ``W`` [1, *out]: the average-perturbation Hessian weight
(:class:`isvit_viz.calib.losses.APHQLoss`) taken at the MLP output of the FP GELU model, averaged
over samples and RMS-normalised (``W * sqrt(numel / sum W^2)``). Adam(lr), cosine to 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .cache import TensorCache
from .losses import APHQLoss
from .task_grads import unit_output_grads


@dataclass(frozen=True)
class MLPReconConfig:
    """Settings of one MLP reconstruction (APHQ-ViT defaults: 20,000 steps of batch 32, lr 4e-5, 2.0, 0.99)."""

    iters: int = 20000
    batch_size: int = 32
    lr: float = 4e-5
    clamp_weight: float = 2.0
    clamp_pct: float = 0.99
    eps: float = 1e-6
    temperature: float = 20.0


def block_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, mlp)`` for every block MLP (a module with ``fc1``, ``act``, ``fc2``), in forward order."""
    return [(n, m) for n, m in model.named_modules() if all(hasattr(m, a) for a in ("fc1", "act", "fc2"))]


def _mlp_out(mlp: nn.Module, x: torch.Tensor, ub: float | None = None) -> torch.Tensor:
    """timm ``Mlp.forward`` (dropouts are identities in eval), fc2's input clamped to at most ``ub``."""
    h = mlp.drop1(mlp.act(mlp.fc1(x)))
    if ub is not None:
        h = h.clamp(max=ub)  # after a ReLU: clamp to [0, ub]
    return mlp.drop2(mlp.fc2(mlp.norm(h)))


def _weighted(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if pred.dim() == 4:  # NHWC -> tokens on dim 1
        pred, target, w = pred.flatten(1, 2), target.flatten(1, 2), w.flatten(1, 2)
    return ((pred - target).pow(2) * w).sum(1).mean() / 10


@torch.no_grad()
def positive_quantile(t_mlp: nn.Module, inputs: TensorCache, q: float, device: torch.device, chunk: int = 64) -> float:
    """The ``q`` quantile of the positive FP GELU outputs (fc2 inputs) over every cached input row: the
    ``ceil(n q)``-th smallest of the n positive values (APHQ-ViT ``positive_percentile``, which on a
    tensor too large to sort would use only its first part; all values are used here)."""
    pos = []
    for i in range(0, inputs.n, chunk):
        h = t_mlp.act(t_mlp.fc1(inputs.gather(torch.arange(i, min(i + chunk, inputs.n)), device)))
        pos.append(h[h > 0].float().cpu())
    flat = torch.cat(pos)
    if flat.numel() == 0:
        raise ValueError("the MLP has no positive GELU output on the calibration set: no clamp bound")
    k = max(1, math.ceil(flat.numel() * q))  # APHQ-ViT positive_percentile: sorted[ceil(n * pct) - 1]
    return float(flat.kthvalue(min(k, flat.numel())).values)


def aph_weight(
    teacher64: nn.Module, t_mlp64: nn.Module, images: torch.Tensor, logits64: torch.Tensor, device: torch.device,
    eps: float, temperature: float,
) -> torch.Tensor:  # fmt: skip
    """APHQ-ViT's RMS-normalised average-perturbation Hessian weight at the MLP output, [1, *out] float32."""
    aph = APHQLoss(eps=eps, temperature=temperature)
    aph.start(1)
    for c in unit_output_grads(teacher64, t_mlp64, images, logits64, device, temperature, aph.grad_shifts):
        aph.prepare_grads(c.grads)
    w = aph.weight
    return (w * torch.sqrt(w.numel() / w.pow(2).sum())).float()


def reconstruct_mlp(
    mlp: nn.Module,
    inputs: TensorCache,
    targets: TensorCache,
    weight: torch.Tensor,
    ub: float,
    cfg: MLPReconConfig,
    device: torch.device,
    generator: torch.Generator,
    progress: bool = True,
    desc: str = "mlp",
) -> dict[str, float]:
    """Train ``mlp.fc1`` / ``mlp.fc2`` (weights and biases; nothing else) on the cached FP rows.

    Returns ``loss_first`` / ``loss_last`` and their parts ``rec_*`` / ``clamp_*`` (weighted).
    """
    params = [p for lin in (mlp.fc1, mlp.fc2) for p in (lin.weight, lin.bias) if p is not None]
    saved = [(p, p.requires_grad) for p in mlp.parameters()]
    for p in mlp.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.iters, 1), eta_min=0.0)
    w = weight.to(device)
    out: dict[str, float] = {}
    try:
        with torch.enable_grad():
            for it in tqdm(range(cfg.iters), desc=desc, disable=not progress, leave=False):
                idx = torch.randperm(inputs.n, generator=generator)[: cfg.batch_size].sort().values
                x, y = inputs.gather(idx, device), targets.gather(idx, device)
                rec = _weighted(_mlp_out(mlp, x), y, w)
                clamp = _weighted(_mlp_out(mlp, x, ub), y, w)
                loss = rec + cfg.clamp_weight * clamp
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                for tag, at in (("first", 0), ("last", cfg.iters - 1)):
                    if it == at:
                        parts = {"loss": loss, "rec": rec, "clamp": clamp}
                        out.update({f"{k}_{tag}": float(v.detach()) for k, v in parts.items()})
    finally:
        for p, rg in saved:
            p.requires_grad_(rg)
    return out


def mlp_units(qmodel: nn.Module, teacher: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """``(path, quantized-model MLP, teacher MLP)`` pairs; the quantized one must compute with a ReLU."""
    for path, mlp in block_mlps(qmodel):
        if not isinstance(mlp.act, nn.ReLU):
            raise ValueError(f"{path}: ReluMLP needs the placement mlp_act='relu' (found {type(mlp.act).__name__})")
        yield path, mlp, teacher.get_submodule(path)
