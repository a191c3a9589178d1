"""Reconstruction engine: fit one unit (block or layer) to FP-teacher outputs (method.md 2.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quant.modules import QuantConv2d, QuantLinear, QuantModule
from .cache import TensorCache


@dataclass(frozen=True)
class ReconConfig:
    """Optimiser settings of the official code: Adam(lr 4e-5), cosine to 0 over ``iters``, batch 64."""

    iters: int = 1000
    batch_size: int = 64
    lr: float = 4e-5
    act_drop_prob: float = 0.0  # QDrop: probability of keeping an activation FP during reconstruction
    matmul_dtype: str = "float32"  # "bfloat16": matmuls in bf16 during reconstruction only (speed option)

    def __post_init__(self) -> None:
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"iters must be an int >= 0, got {self.iters!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.matmul_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"matmul_dtype must be 'float32' or 'bfloat16', got {self.matmul_dtype!r}")
        if not 0.0 <= self.act_drop_prob < 1.0:
            raise ValueError(f"act_drop_prob must be in [0, 1), got {self.act_drop_prob!r}")


def trainable_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of the unit's Linear/Conv layers, plus Swin relative-position bias tables.

    LayerNorm affine parameters and all quantizer state stay frozen (as the official code).
    """
    params: list[nn.Parameter] = []
    for mod in unit.modules():
        if isinstance(mod, (QuantLinear, QuantConv2d, nn.Linear, nn.Conv2d)):
            params += [p for p in (mod.weight, mod.bias) if p is not None]
        table = getattr(mod, "relative_position_bias_table", None)
        if isinstance(table, nn.Parameter):
            params.append(table)
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]


def recon_loss(pred: torch.Tensor, target: torch.Tensor, tokens_last: bool = False) -> torch.Tensor:
    """Official ``lp_loss``: squared error summed over dim 1, averaged over the rest.

    ``tokens_last``: NHWC block outputs (timm Swin) are flattened to [B, HW, C] first so dim 1 is the
    token axis, as for ViT blocks.
    """
    if tokens_last and pred.dim() == 4:
        pred, target = pred.flatten(1, 2), target.flatten(1, 2)
    return (pred - target).pow(2).sum(1).mean()


def reconstruct_unit(
    unit: nn.Module,
    inputs: TensorCache,
    targets: TensorCache,
    cfg: ReconConfig,
    device: torch.device,
    generator: torch.Generator,
    tokens_last: bool = False,
    desc: str = "recon",
    progress: bool = True,
) -> dict[str, float]:
    """Run ``cfg.iters`` Adam steps on ``unit`` so ``unit(inputs)`` matches ``targets``.

    Mini-batches of ``cfg.batch_size`` random cached samples are moved to ``device`` each step.
    Returns the loss of the first and last steps. ``requires_grad`` flags are restored afterwards.
    """
    if inputs.n < cfg.batch_size:
        raise ValueError(f"calibration set ({inputs.n} samples) is smaller than the batch size {cfg.batch_size}")
    params = trainable_parameters(unit)
    saved = [(p, p.requires_grad) for p in unit.parameters()]
    quant_layers = [m for m in unit.modules() if isinstance(m, QuantLinear)]
    mm_layers = [m for m in unit.modules() if isinstance(m, QuantModule)]
    mm_dtype = None if cfg.matmul_dtype == "float32" else getattr(torch, cfg.matmul_dtype)
    for p in unit.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    for m in quant_layers:
        m.act_drop_prob = cfg.act_drop_prob
    for m in mm_layers:
        m.matmul_dtype = mm_dtype
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.iters, 1), eta_min=0.0)
    first = last = float("nan")
    try:
        with torch.enable_grad():
            for it in tqdm(range(cfg.iters), desc=desc, disable=not progress, leave=False):
                idx = torch.randperm(inputs.n, generator=generator)[: cfg.batch_size].sort().values
                x, y = inputs.gather(idx, device), targets.gather(idx, device)
                loss = recon_loss(unit(x), y, tokens_last)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if it == 0:
                    first = float(loss.detach())
                last = float(loss.detach()) if it == cfg.iters - 1 else last
    finally:
        for p, rg in saved:
            p.requires_grad_(rg)
        for m in quant_layers:
            m.act_drop_prob = 0.0
        for m in mm_layers:
            m.matmul_dtype = None
    return {"loss_first": first, "loss_last": last}
