"""Reconstruction engine: fit one unit (block or layer) to FP-teacher outputs (method.md 2.2).

Two ways to train the weights (``ReconConfig.rounding``):

* ``"ste"`` (I&S-ViT's official code): the latent FP weights and biases (and Swin relative-position
  bias tables) are trained through the fixed-scale fake quantizer with the straight-through rule of
  :mod:`isvit_viz.quant.ste`; Adam(lr), cosine to 0.
* ``"adaround"`` (BRECQ / QDrop): every FP tensor stays frozen; only the AdaRound variables ``alpha`` of
  the weight-quantized layers learn (Adam(alpha_lr), no schedule, as the authors' code), with loss
  ``rec + round_weight * sum(1 - |2h - 1|^beta)``; the hard decisions are baked into the weights at
  the end (:mod:`isvit_viz.quant.adaround`).
* ``"fixed"`` (BRECQ's activation pass): no weight is trained; only the activation step sizes learn
  (needs ``act_scale_lr``).

The loss is by default the official ``lp_loss``: ``|error| ** loss_p`` summed over the token axis and
averaged over the rest (``loss_p`` 2: I&S-ViT; 2.4: BRECQ and QDrop's ImageNet scripts). Any
:class:`isvit_viz.calib.losses.ReconLoss` can replace it (``loss``, with the per-sample gradient rows
and the refresh function the engine prepares for it).

QDrop options, usable with either: ``act_drop_prob`` keeps each element of every quantized activation
inside the unit FP with that probability (fresh mask each step), and ``input_mix`` does the same to the
unit's input, mixing the quantized-model input with the FP-teacher input (``fp_inputs``).

``act_scale_lr`` (off by default; I&S-ViT and RepQ-ViT keep activation scales fixed) also learns the
step size of every uniform activation quantizer that is on inside the unit, LSQ-style, with its own
Adam(act_scale_lr) and cosine schedule to 0 over ``iters``, jointly with the weights or AdaRound's
alpha (QDrop ``qdrop/solver/recon.py``: ``scale_lr`` 4e-5; APHQ-ViT and FIMA-Q the same). Zero-points,
weight scales and the non-uniform quantizers (log2, SULQ, twin-uniform, PTQ4ViT) stay fixed: the
authors' code has only uniform quantizers and learns only their step size. After each step the step
size is kept positive as QDrop's ``LSQFakeQuantize`` does (``|s|``, at least float32 eps). Gradient:
:class:`isvit_viz.quant.uniform.UniformQuantizer.learn_scale`. BRECQ instead learns the step sizes in a
separate pass after weight reconstruction, without LSQ's gradient scale (``act_scale_grad_scale=False``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quant.adaround import adaround_layers, attach_adaround, beta_at, detach_adaround, harden_adaround, round_regularizer
from ..quant.modules import QuantConv2d, QuantLinear, QuantMatMul, QuantModule, maybe_drop
from ..quant.uniform import UniformQuantizer
from .cache import TensorCache
from .fast import compiled
from .losses import LossState, LpLoss, ReconLoss

ROUNDINGS = ("ste", "adaround", "fixed")
#: Smallest learned activation step size (QDrop's ``LSQFakeQuantize`` clamps to float32 eps).
SCALE_EPS = float(torch.finfo(torch.float32).eps)


def _check_prob(name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")


@dataclass(frozen=True)
class ReconConfig:
    """Optimiser settings. Defaults are the official I&S-ViT code: Adam(lr 4e-5), cosine to 0 over
    ``iters``, batch 64, STE weights, no QDrop.

    Attributes:
        iters / batch_size / lr: Adam steps, mini-batch size, learning rate of the STE weights.
        act_drop_prob: QDrop: probability that an element of a quantized activation inside the unit
            stays FP (every activation quantizer: Linear inputs, both operands of both attention
            matmuls). QDrop uses 0.5.
        input_mix: QDrop: probability that an element of the unit's input is the FP-teacher input
            instead of the quantized-model input (needs ``fp_inputs``). QDrop uses 0.5.
        matmul_dtype: ``"bfloat16"``: matmuls in bf16 during reconstruction only (speed option).
        compile: run the unit's forward and backward through ``torch.compile`` (speed option, off by
            default; :func:`isvit_viz.calib.fast.compiled`): one compilation per unit, worth it for
            hundreds of steps. Falls back to eager, with a warning, where compilation fails (no C++
            compiler). Not bit-identical to eager (fused kernels reorder float operations).
        rounding: ``"ste"``, ``"adaround"`` or ``"fixed"`` (module docstring).
        loss_p: exponent of the reconstruction error (2: squared error).
        alpha_lr: Adam learning rate of AdaRound's alpha (1e-3, BRECQ/QDrop: Adam's default).
        round_weight: weight of the rounding regulariser (0.01, BRECQ/QDrop).
        round_warmup: fraction of ``iters`` without regulariser (0.2, BRECQ/QDrop).
        round_beta: (start, end) of the regulariser exponent, annealed linearly after the warm-up.
        act_scale_lr: ``None`` (default): activation scales stay fixed. A number: Adam learning rate of
            the uniform activation quantizers' step sizes, cosine to 0 over ``iters`` (QDrop: 4e-5).
        act_scale_grad_scale: with ``act_scale_lr``, multiply the step-size gradient by LSQ's
            ``1 / sqrt(N * Qp)`` (QDrop, True) or not (BRECQ / APHQ-ViT, False).
    """

    iters: int = 1000
    batch_size: int = 64
    lr: float = 4e-5
    act_drop_prob: float = 0.0
    matmul_dtype: str = "float32"
    compile: bool = False
    rounding: str = "ste"
    input_mix: float = 0.0
    alpha_lr: float = 1e-3
    round_weight: float = 0.01
    round_warmup: float = 0.2
    round_beta: tuple[float, float] = (20.0, 2.0)
    act_scale_lr: float | None = None
    act_scale_grad_scale: bool = True
    loss_p: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"iters must be an int >= 0, got {self.iters!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        for name in ("lr", "alpha_lr", "loss_p"):
            v = getattr(self, name)
            if not (v > 0 and v < float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        if self.matmul_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"matmul_dtype must be 'float32' or 'bfloat16', got {self.matmul_dtype!r}")
        _check_prob("act_drop_prob", self.act_drop_prob)
        _check_prob("input_mix", self.input_mix)
        _check_prob("round_warmup", self.round_warmup)
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if not (self.round_weight >= 0 and self.round_weight < float("inf")):
            raise ValueError(f"round_weight must be a finite number >= 0, got {self.round_weight!r}")
        if len(self.round_beta) != 2 or not all(b > 0 for b in self.round_beta):
            raise ValueError(f"round_beta must be two positive numbers (start, end), got {self.round_beta!r}")
        lr_a = self.act_scale_lr
        if lr_a is not None and (isinstance(lr_a, bool) or not isinstance(lr_a, (int, float)) or not 0 < lr_a < float("inf")):
            raise ValueError(f"act_scale_lr must be None or a positive finite number, got {lr_a!r}")
        if self.rounding == "fixed" and lr_a is None:
            raise ValueError("rounding='fixed' trains no weights: set act_scale_lr so the activation step sizes learn")


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


def act_scale_quantizers(unit: nn.Module) -> list[UniformQuantizer]:
    """The activation quantizers whose step size ``act_scale_lr`` learns, in module order.

    Uniform quantizers of the unit's quant modules with activation quantization on: Linear/Conv inputs
    and both matmul operands. Quantizers of switched-off modules take no part in the loss.
    """
    found: list[UniformQuantizer] = []
    for mod in unit.modules():
        if not (isinstance(mod, QuantModule) and mod.act_quant):
            continue
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            found.append(mod.input_quantizer)
        elif isinstance(mod, QuantMatMul):
            found += [mod.quantizer_a, mod.quantizer_b]
    seen: set[int] = set()
    return [q for q in found if isinstance(q, UniformQuantizer) and not (id(q) in seen or seen.add(id(q)))]


def _keep_positive(scales: list[nn.Parameter]) -> None:
    """QDrop's ``scale.abs_().clamp_(min=eps)`` on each learned step size."""
    with torch.no_grad():
        for s in scales:
            s.abs_().clamp_(min=SCALE_EPS)


def channels_last_output(unit: nn.Module) -> bool:
    """Whether a 4-D output of ``unit`` is channels-last [B, H, W, C], i.e. ``tokens_last`` applies.

    Every unit but a convolution ends in a Linear (or a block of them) acting on the last axis, so a
    4-D output is NHWC: timm Swin blocks and PatchMerging reductions. A conv unit (patch embedding)
    outputs NCHW, where the official loss sums over channels.
    """
    return not isinstance(unit, (QuantConv2d, nn.Conv2d))


def recon_loss(pred: torch.Tensor, target: torch.Tensor, tokens_last: bool = False, p: float = 2.0) -> torch.Tensor:
    """Official ``lp_loss``: ``|pred - target| ** p`` summed over dim 1, averaged over the rest.

    ``tokens_last``: NHWC outputs (timm Swin blocks and PatchMerging) are flattened to [B, HW, C]
    first so dim 1 is the token axis, as for ViT blocks and for the official code's [B, L, C] Swin.
    """
    if tokens_last and pred.dim() == 4:
        pred, target = pred.flatten(1, 2), target.flatten(1, 2)
    err = (pred - target).pow(2) if p == 2 else (pred - target).abs().pow(p)
    return err.sum(1).mean()


def _rounding_loss(alphas: list[nn.Module], cfg: ReconConfig, count: int) -> torch.Tensor | None:
    """AdaRound regulariser at 1-based step ``count`` (``None`` during the warm-up)."""
    beta = beta_at(count, cfg.iters, cfg.round_warmup, cfg.round_beta)
    if beta is None or not alphas:
        return None
    return cfg.round_weight * sum(round_regularizer(a.h(), beta) for a in alphas)


def _flip_fraction(unit: nn.Module) -> float:
    """Share of AdaRound decisions that differ from round-to-nearest (before hardening)."""
    flips = total = 0
    for layer in adaround_layers(unit):
        ada = layer._modules.get("adaround")
        if ada is None:
            continue
        v = layer.weight.detach() / layer.weight_quantizer.scale
        nearest_up = (torch.round(v) > torch.floor(v)).float()
        flips += int((ada.hard() != nearest_up).sum())
        total += v.numel()
    return flips / max(total, 1)


def _batch(inputs: TensorCache, fp_inputs: TensorCache | None, idx: torch.Tensor, p: float, device: torch.device) -> torch.Tensor:
    x = inputs.gather(idx, device)
    if p > 0:
        x = maybe_drop(x, fp_inputs.gather(idx, device), p)
    return x


def reconstruct_unit(
    unit: nn.Module,
    inputs: TensorCache,
    targets: TensorCache,
    cfg: ReconConfig,
    device: torch.device,
    generator: torch.Generator,
    tokens_last: bool | None = None,
    desc: str = "recon",
    progress: bool = True,
    fp_inputs: TensorCache | None = None,
    loss: ReconLoss | None = None,
    grad_rows: TensorCache | None = None,
    refresh: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Run ``cfg.iters`` Adam steps on ``unit`` so ``unit(inputs)`` matches ``targets``.

    Mini-batches of ``cfg.batch_size`` random cached samples are moved to ``device`` each step.

    Args:
        tokens_last: flatten 4-D outputs to [B, HW, C] in the loss. ``None`` (default) decides from the
            unit (:func:`channels_last_output`): True for every unit but a conv. Pass True for every
            Swin unit with NHWC output (blocks *and* PatchMerging reductions), False for conv units.
        fp_inputs: the FP teacher's inputs of this unit, same rows as ``inputs`` (needed when
            ``cfg.input_mix > 0``; gathered with the same indices).
        loss: the reconstruction loss, already started for ``cfg.iters`` steps and with its gradients
            prepared (:mod:`isvit_viz.calib.losses` protocol); ``None``: ``LpLoss(cfg.loss_p)``.
        grad_rows: the loss's per-sample rows (``loss.per_sample``), gathered like the targets.
        refresh: ``() -> (g_row, d_row)``, called before every step at which ``loss.refresh(step)``
            and passed to ``loss.update`` (FIMA-Q's Fisher refresh).

    Returns:
        ``loss_first`` / ``loss_last`` (total loss of the first and last steps) and their parts
        ``rec_first`` / ``rec_last`` (reconstruction) and ``round_first`` / ``round_last`` (weighted
        AdaRound regulariser, 0 with STE or during the warm-up); with AdaRound also ``flip_frac``, the
        share of weights rounded against round-to-nearest; with ``cfg.act_scale_lr`` also
        ``act_scale_n`` (number of activation quantizers whose step size learned) and
        ``act_scale_change`` (largest ``|s_new / s_old - 1|`` over their entries). ``requires_grad``
        flags are restored; learned step sizes are buffers again afterwards (restored on an error).
    """
    if inputs.n < cfg.batch_size:
        raise ValueError(f"calibration set ({inputs.n} samples) is smaller than the batch size {cfg.batch_size}")
    if cfg.input_mix > 0 and (fp_inputs is None or fp_inputs.n != inputs.n):
        raise ValueError("input_mix > 0 needs fp_inputs: the FP teacher's inputs of the unit, one row per cached input")
    if tokens_last is None:
        tokens_last = channels_last_output(unit)
    loss = _ready_loss(loss, cfg, grad_rows, inputs.n)
    adaround = cfg.rounding == "adaround"
    if cfg.rounding == "fixed" and not act_scale_quantizers(unit):
        raise ValueError("rounding='fixed' needs activation-quantized uniform quantizers in the unit to learn")
    if adaround and not adaround_layers(unit):
        raise ValueError("rounding='adaround' needs weight-quantized layers in the unit (set_quant_state(weight=True))")
    saved = [(p, p.requires_grad) for p in unit.parameters()]
    q_modules = [m for m in unit.modules() if isinstance(m, QuantModule)]
    mm_dtype = None if cfg.matmul_dtype == "float32" else getattr(torch, cfg.matmul_dtype)
    for p in unit.parameters():
        p.requires_grad_(False)
    for m in q_modules:
        m.act_drop_prob = cfg.act_drop_prob
        m.matmul_dtype = mm_dtype
    act_qs = act_scale_quantizers(unit) if cfg.act_scale_lr is not None else []
    scale0 = [q.scale.detach().clone() for q in act_qs]
    out: dict[str, float] = {}
    ok = False
    try:
        alphas, opt, sched = _weight_optimiser(unit, cfg)
        steps = [] if opt is None else [(opt, sched)]
        scales = _scale_optimiser(act_qs, cfg, steps)
        out = _optimise(unit, _Data(inputs, targets, fp_inputs, grad_rows), cfg, device, generator, tokens_last,
                        steps, scales, alphas, _LossRun(loss, refresh), desc, progress)  # fmt: skip
        if adaround:
            out["flip_frac"] = _flip_fraction(unit)
            harden_adaround(unit)
        if cfg.act_scale_lr is not None:
            out.update(act_scale_n=float(len(act_qs)), act_scale_change=_scale_change(act_qs, scale0))
        ok = True
    finally:
        detach_adaround(unit)  # after an error: back to the untouched weights
        for q, s0 in zip(act_qs, scale0):
            q.learn_scale(False)
            if not ok:  # after an error: back to the untouched step sizes
                q.scale.copy_(s0)
        for p, rg in saved:
            p.requires_grad_(rg)
        for m in q_modules:
            m.act_drop_prob = 0.0
            m.matmul_dtype = None
    return out


def _ready_loss(loss: ReconLoss | None, cfg: ReconConfig, grad_rows: TensorCache | None, n: int) -> ReconLoss:
    """The given (started) loss, or the default ``LpLoss(cfg.loss_p)`` started here; checks its gradient rows."""
    if loss is None:
        loss = LpLoss(cfg.loss_p)
        loss.start(max(cfg.iters, 1))
    if loss.per_sample and (grad_rows is None or grad_rows.n != n):
        raise ValueError(f"loss {loss.name!r} needs grad_rows: one row of prepared gradients per cached input")
    return loss


@torch.no_grad()
def _scale_change(quantizers: list[UniformQuantizer], before: list[torch.Tensor]) -> float:
    """Largest relative change ``|s / s0 - 1|`` over every entry of the quantizers' step sizes."""
    return max((float((q.scale / s0 - 1).abs().max()) for q, s0 in zip(quantizers, before)), default=0.0)


def _weight_optimiser(
    unit: nn.Module, cfg: ReconConfig
) -> tuple[list[nn.Module], torch.optim.Optimizer | None, torch.optim.lr_scheduler.LRScheduler | None]:
    """AdaRound alphas (attached here), and the optimiser and schedule of the weights or alphas
    (``None`` with ``rounding="fixed"``)."""
    if cfg.rounding == "fixed":
        return [], None, None
    if cfg.rounding == "adaround":
        alphas = attach_adaround(unit)
        return alphas, torch.optim.Adam([a.alpha for a in alphas], lr=cfg.alpha_lr), None
    params = trainable_parameters(unit)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    return [], opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.iters, 1), eta_min=0.0)


def _scale_optimiser(quantizers: list[UniformQuantizer], cfg: ReconConfig, steps: list) -> list[nn.Parameter]:
    """Turn the quantizers' step sizes into parameters; append their Adam + cosine schedule to ``steps``."""
    for q in quantizers:
        q.learn_scale(True, grad_scale=cfg.act_scale_grad_scale)
    scales = [q.scale for q in quantizers]
    if scales:
        _keep_positive(scales)  # QDrop applies it before every forward, the first included
        opt = torch.optim.Adam(scales, lr=cfg.act_scale_lr)
        steps.append((opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.iters, 1), eta_min=0.0)))
    return scales


@dataclass
class _Data:
    """The cached rows of one unit: inputs, FP targets, FP inputs (input mixing), loss gradient rows."""

    inputs: TensorCache
    targets: TensorCache
    fp_inputs: TensorCache | None
    grad_rows: TensorCache | None


@dataclass
class _LossRun:
    """The loss of one unit and its refresh function (FIMA-Q)."""

    loss: ReconLoss
    refresh: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None

    def before_step(self, it: int) -> None:
        if self.loss.refresh(it):
            if self.refresh is None:
                raise ValueError(f"loss {self.loss.name!r} refreshes at step {it} but no refresh function was given")
            self.loss.update(*self.refresh())


def _optimise(
    unit: nn.Module,
    data: _Data,
    cfg: ReconConfig,
    device: torch.device,
    generator: torch.Generator,
    tokens_last: bool,
    steps: list[tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]],
    scales: list[nn.Parameter],
    alphas: list[nn.Module],
    loss_run: _LossRun,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    """The step loop of :func:`reconstruct_unit`; returns the first/last loss components.

    ``steps``: (optimiser, schedule or None) pairs, stepped in order (weights or alphas first, then the
    activation step sizes ``scales``, kept positive after each step), as QDrop's loop.
    """
    nan = float("nan")
    out = {"loss_first": nan, "loss_last": nan, "rec_first": nan, "rec_last": nan, "round_first": nan, "round_last": nan}
    forward = compiled(unit) if cfg.compile else unit
    with torch.enable_grad():
        for it in tqdm(range(cfg.iters), desc=desc, disable=not progress, leave=False):
            loss_run.before_step(it)
            idx = torch.randperm(data.inputs.n, generator=generator)[: cfg.batch_size].sort().values
            x = _batch(data.inputs, data.fp_inputs, idx, cfg.input_mix, device)
            grad = None if data.grad_rows is None else data.grad_rows.gather(idx, device)
            state = LossState(grad=grad, idx=idx, tokens_last=tokens_last)
            rec = loss_run.loss(forward(x), data.targets.gather(idx, device), state)
            rnd = _rounding_loss(alphas, cfg, it + 1)
            loss = rec if rnd is None else rec + rnd
            for opt, _ in steps:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt, sched in steps:
                opt.step()
                if sched is not None:
                    sched.step()
            _keep_positive(scales)
            if it in (0, cfg.iters - 1):
                tag = "first" if it == 0 else "last"
                out[f"loss_{tag}"], out[f"rec_{tag}"] = float(loss.detach()), float(rec.detach())
                out[f"round_{tag}"] = 0.0 if rnd is None else float(rnd.detach())
    if cfg.iters == 1:
        for k in ("loss", "rec", "round"):
            out[f"{k}_last"] = out[f"{k}_first"]
    return out
