"""Pluggable reconstruction losses for :func:`isvit_viz.calib.recon.reconstruct_unit` (issue #17).

A loss compares the reconstructed unit's output ``pred`` with the FP teacher's ``target`` (both
``[B, *out]``, one row per cached sample) and returns a scalar. Some losses weight the error with
second-order information about the *task loss* ``L``: the KL divergence between the FP model's and
a (partly) quantized model's class distributions, as a function of the unit output ``z``. Every such
gradient is of :func:`kl_task_loss` (per-sample KL, summed over samples, so one sample's gradient does
not depend on how the calibration set is chunked; the authors use ``batchmean`` over batches of 32,
i.e. 1/32 of it: only :class:`FisherDiagLoss` is sensitive to that scale, via ``grad_scale``).

Protocol between a loss and the engine (all on :class:`ReconLoss`):

1. ``loss.start(iters)`` at the start of every unit (clears normalisers and refreshed statistics).
2. If ``loss.needs_grads``: for every calibration sample, in chunks, compute the per-sample gradient
   ``dL/dz`` of :func:`kl_task_loss` (temperature ``loss.temperature``) through the network named by
   ``loss.grad_model``, once per output shift in ``loss.grad_shifts`` (``z + shift`` everywhere), and
   call ``rows = loss.prepare_grads([g_shift0, g_shift1, ...])`` with each chunk ``[n, *out]``, in
   sample order. If ``loss.per_sample``, ``rows`` (``[n, *out]``) go into a cache exactly like the
   outputs and each mini-batch's rows are gathered into :attr:`LossState.grad` with the same indices;
   otherwise ``rows`` is ``None`` and the loss keeps its own aggregate.
3. Each step ``it`` (0-based), before the forward: ``if loss.refresh(it)``: recompute the statistics the
   loss names (FIMA-Q: :meth:`FisherDPLRLoss.update`) with the unit in its current state.
4. ``rec = loss(pred, target, LossState(grad=..., idx=idx, tokens_last=...))``.

Registry: :data:`LOSSES` (authors' names) and :func:`make_loss`.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

#: Networks the engine may backpropagate through for ``needs_grads`` / refreshes (``ReconLoss.grad_model``).
GRAD_MODELS = ("none", "fp", "quantized_through_unit", "current_unit")
#: FIMA-Q refresh schedules (``dis_mode`` in ShiheWang/FIMA-Q ``utils/block_recon.py``).
REFRESH_MODES = ("q", "qf")


def _positive(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


def _non_negative(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _norm(v: Any) -> float | None:
    return None if v is None else _positive("norm", v)


def _flat_tokens(pred: torch.Tensor, target: torch.Tensor, tokens_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """NHWC [B, H, W, C] -> [B, HW, C] so dim 1 is the token axis (as :func:`recon.recon_loss`)."""
    if tokens_last and pred.dim() == 4:
        return pred.flatten(1, 2), target.flatten(1, 2)
    return pred, target


def kl_task_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``sum_n KL(softmax(t_n / T) || softmax(l_n / T))`` over samples n (classes on the last axis).

    The task loss whose gradient w.r.t. a unit output the Hessian/Fisher losses use (BRECQ
    ``quant/data_utils.py`` ``GetLayerGrad``: T = 1; APHQ-ViT / FIMA-Q ``utils/block_recon.py``: T = 20).
    Summed, not ``batchmean``, so per-sample gradients are independent of the chunk size.

    Args:
        logits / teacher_logits: [N, classes]; the teacher side is detached.
    """
    log_q = F.log_softmax(logits / temperature, dim=-1)
    p = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="sum")


def output_grads(
    tail: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """Per-sample ``d kl_task_loss / dz`` at ``z + shift`` (reference implementation for the engine).

    Args:
        tail: the network after the unit, unit output [N, *out] -> logits [N, classes].
        z: unit outputs [N, *out] (the shift is added to every element, APHQ-ViT's ``perturb_u/d``).
        teacher_logits: FP-model logits [N, classes].

    Returns:
        [N, *out], same dtype as ``z``; row n depends only on sample n (the tail is per-sample).
    """
    with torch.enable_grad():
        zz = z.detach().clone().requires_grad_(True)
        loss = kl_task_loss(tail(zz + shift), teacher_logits, temperature)
        (g,) = torch.autograd.grad(loss, zz)
    return g


@dataclass
class LossState:
    """What a loss gets per mini-batch besides ``pred`` / ``target``.

    Attributes:
        grad: [B, *out]: rows of the loss's per-sample cache (``prepare_grads`` output), gathered with
            ``idx`` exactly like the targets; ``None`` for losses without ``per_sample``.
        idx: [B] indices of the mini-batch's samples in the calibration set (informational).
        tokens_last: 4-D outputs are NHWC (flatten to [B, HW, C] so dim 1 is tokens), as
            :func:`isvit_viz.calib.recon.channels_last_output` decides for the unit.
    """

    grad: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    tokens_last: bool = False


class _FirstValue:
    """``scale * raw / raw_first``: APHQ-ViT's / FIMA-Q's normalisation by the loss of the first step.

    A first value of exactly 0 (the unit already reproduces the teacher) is replaced by 1 so the loss
    stays finite (the authors would divide by zero).
    """

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, raw: torch.Tensor, scale: float) -> torch.Tensor:
        if self.value is None:
            first = raw.detach()
            self.value = torch.where(first == 0, torch.ones_like(first), first)
        return scale * raw / self.value


class ReconLoss(abc.ABC):
    """Base class and interface of a reconstruction loss (protocol: module docstring).

    Class / instance attributes the engine reads:
        name: registry key.
        needs_grads: compute per-sample output gradients before the step loop and feed ``prepare_grads``.
        per_sample: ``prepare_grads`` returns per-sample rows to cache and gather into ``LossState.grad``.
        grad_shifts: output shifts at which the gradients are taken (one gradient tensor per shift).
        grad_model: network the gradients flow through: ``"fp"`` (FP model), ``"quantized_through_unit"``
            (every unit up to and including this one quantized, later ones FP), ``"current_unit"``
            (only this unit quantized, in its current training state), ``"none"``.
        temperature: T of :func:`kl_task_loss` for those gradients.
        grad_dtype: ``"float32"`` or ``"float64"``: the precision of the teacher pass that computes them.
    """

    name: ClassVar[str] = ""
    needs_grads: bool = False
    per_sample: bool = False
    grad_shifts: tuple[float, ...] = (0.0,)
    grad_model: str = "none"
    temperature: float = 1.0
    grad_dtype: str = "float32"

    def start(self, iters: int) -> None:
        """Begin a new unit of ``iters`` steps: forget normalisers and statistics of the previous one."""
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be an int >= 1, got {iters!r}")
        self.iters = iters

    def prepare_grads(self, grads: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Consume one chunk of per-sample gradients, one [n, *out] tensor per ``grad_shifts`` entry
        (only losses with ``needs_grads``; the others refuse)."""
        raise RuntimeError(f"{type(self).__name__} needs no gradients (needs_grads is False)")

    def refresh(self, iteration: int) -> bool:
        """Whether the engine must recompute this loss's statistics before step ``iteration`` (0-based)."""
        return False

    @abc.abstractmethod
    def __call__(self, pred: torch.Tensor, target: torch.Tensor, state: LossState | None = None) -> torch.Tensor:
        """Scalar loss of ``pred`` [B, *out] against ``target`` [B, *out]."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"

    def settings(self) -> dict[str, Any]:
        """Constructor arguments as set (for provenance / describe)."""
        return {k: getattr(self, k) for k in inspect.signature(type(self).__init__).parameters if k != "self"}


class LpLoss(ReconLoss):
    """``|pred - target| ** p`` summed over dim 1 (tokens; channels for NCHW), mean over the rest.

    The official I&S-ViT / BRECQ ``lp_loss`` (BRECQ ``quant/quant_layer.py``; I&S-ViT's code), identical
    to :func:`isvit_viz.calib.recon.recon_loss` (same operations, so bit-equal). ``p`` 2 (I&S-ViT,
    APHQ-ViT / FIMA-Q ``mse``) or 2.4 (BRECQ / QDrop ImageNet scripts). NHWC outputs
    (``state.tokens_last``) are flattened to [B, HW, C] first.
    """

    name = "lp"

    def __init__(self, p: float = 2.0) -> None:
        self.p = _positive("p", p)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, state: LossState | None = None) -> torch.Tensor:
        pred, target = _flat_tokens(pred, target, state is not None and state.tokens_last)
        err = (pred - target).pow(2) if self.p == 2 else (pred - target).abs().pow(self.p)
        return err.sum(1).mean()


class MSELoss(LpLoss):
    """:class:`LpLoss` with ``p = 2``: the official I&S-ViT loss (``ReconConfig`` default)."""

    name = "mse"

    def __init__(self) -> None:
        super().__init__(2.0)


class FisherDiagLoss(ReconLoss):
    """BRECQ's Fisher-diagonal loss: ``sum_1((pred - target)^2 * w^2)``, mean over the rest.

    ``w = |g| * grad_scale + damping`` per sample and element, ``g`` the gradient of
    :func:`kl_task_loss` (T = 1) w.r.t. the unit output with the model quantized up to and including
    this unit. Reduction as :class:`LpLoss` (sum over dim 1, mean over the rest; NHWC flattened).

    Source: yhhhli/BRECQ ``quant/block_recon.py`` ``LossFunction`` (``rec_loss == 'fisher_diag'``:
    ``((pred - tgt).pow(2) * grad.pow(2)).sum(1).mean()``); ``quant/data_utils.py`` ``save_grad_data``
    (``cached_grads.abs() + 1.0``: ``damping`` 1; batches of ``batch_size`` 32 with ``batchmean``:
    ``grad_scale`` 1/32) and ``GetLayerGrad`` (KL(FP softmax || quantized softmax), no temperature;
    ``quantize_model_till``: units up to and including this one quantized). No normalisation.
    BRECQ's released scripts pass ``opt_mode='mse'``; this loss is their option.
    """

    name = "fisher_diag"
    needs_grads = True
    per_sample = True
    grad_model = "quantized_through_unit"

    def __init__(self, damping: float = 1.0, grad_scale: float = 1.0 / 32, temperature: float = 1.0) -> None:
        self.damping = _non_negative("damping", damping)
        self.grad_scale = _positive("grad_scale", grad_scale)
        self.temperature = _positive("temperature", temperature)

    def prepare_grads(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """[n, *out] cached weights ``|g| * grad_scale + damping`` (memory: one output's size per sample)."""
        if len(grads) != 1:
            raise ValueError(f"fisher_diag takes one gradient tensor per chunk, got {len(grads)}")
        return grads[0].abs() * self.grad_scale + self.damping

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, state: LossState | None = None) -> torch.Tensor:
        if state is None or state.grad is None:
            raise RuntimeError("fisher_diag needs state.grad: the mini-batch's rows of prepare_grads()")
        w = state.grad
        pred, target = _flat_tokens(pred, target, state.tokens_last)
        if state.tokens_last and w.dim() == 4:
            w = w.flatten(1, 2)
        return ((pred - target).pow(2) * w.pow(2)).sum(1).mean()


class APHQLoss(ReconLoss):
    """APHQ-ViT's average-perturbation Hessian loss: ``norm * mean((pred - target)^2 * W) / first``.

    ``W = mean_n |g+_n - g-_n|`` ([1, *out], broadcast over the batch), ``g+-`` the gradients of
    :func:`kl_task_loss` (T = 20) w.r.t. the unit output of the **FP** model with every element of the
    output shifted by ``+eps`` / ``-eps``. At the FP point the KL gradient is 0, so
    ``|g+ - g-| ~= 2 eps |H 1|``: the absolute row sums of the output Hessian (the constant 2 eps
    cancels in the normalisation). ``mean`` is over every element (batch, tokens, channels); ``first``
    the raw loss of the first call after :meth:`start`, so the first step's loss is ``norm``.

    Source: GoatWu/APHQ-ViT ``utils/block_recon.py`` (HEAD 84c9fde): ``init_block_perturb_hessian``
    (``perturb_u`` / ``perturb_d`` add ``+-1e-6``: ``eps``; ``(raw_grads[0] - raw_grads[1]).abs()``,
    ``mean(dim=0, keepdim=True)`` with ``use_mean_hessian=True``: ``average``), ``LossFunction``
    (``'hessian_perturb'``: ``((pred - tgt).pow(2) * grad.abs()).mean()``; ``rec_loss * 2 / init_loss``
    from commit 73e78a7 "add a normlization trick": ``norm`` 2), ``configs/3bit/best.py``
    (``temp = 20``, ``use_mean_hessian = True``; ``ablation_avg.py``: False). Before 73e78a7 the loss
    was ``sum(1).mean() / 10`` with W scaled to mean 1 (``norm=None`` here gives the un-normalised mean).
    Precision: in float32 a shift of 1e-6 is below half an ulp of any |z| >= 16 and the T = 20 Hessian
    is small, so float32 g+- are dominated by round-off; float64 reproduces ``2 eps |H 1|``. Hence
    ``grad_dtype="float64"`` by default (a deviation: the authors run float32 and so weight by what is
    partly round-off; ``grad_dtype="float32"`` does as they do).
    """

    name = "hessian_perturb"
    needs_grads = True
    grad_model = "fp"

    def __init__(
        self, eps: float = 1e-6, temperature: float = 20.0, average: bool = True, norm: float | None = 2.0,
        grad_dtype: str = "float64",
    ) -> None:  # fmt: skip
        if grad_dtype not in ("float32", "float64"):
            raise ValueError(f"grad_dtype must be 'float32' or 'float64', got {grad_dtype!r}")
        self.grad_dtype = grad_dtype
        self.eps = _positive("eps", eps)
        self.temperature = _positive("temperature", temperature)
        if not isinstance(average, bool):
            raise ValueError(f"average must be a bool, got {average!r}")
        self.average = average
        self.norm = _norm(norm)
        self.per_sample = not average
        self.grad_shifts = (self.eps, -self.eps)
        self._reset()

    def _reset(self) -> None:
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._first = _FirstValue()

    def start(self, iters: int) -> None:
        super().start(iters)
        self._reset()

    @staticmethod
    def hessian_rows(g_plus: torch.Tensor, g_minus: torch.Tensor) -> torch.Tensor:
        """Per-sample ``|g+ - g-|`` [n, *out] (= 2 eps |H_n 1| up to O(eps^3))."""
        return (g_plus - g_minus).abs()

    def prepare_grads(self, grads: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Chunk of (g+, g-): per-sample rows (``average=False``) or accumulate their sum (None)."""
        if len(grads) != 2:
            raise ValueError(f"hessian_perturb takes (g_plus, g_minus) per chunk, got {len(grads)} tensors")
        rows = self.hessian_rows(grads[0], grads[1])
        if not self.average:
            return rows
        s = rows.sum(0, keepdim=True)
        self._sum = s if self._sum is None else self._sum + s
        self._count += rows.shape[0]
        return None

    @property
    def weight(self) -> torch.Tensor:
        """W [1, *out] (``average=True``): mean of the accumulated rows."""
        if self._sum is None:
            raise RuntimeError("hessian_perturb has no weight: feed prepare_grads() after start()")
        return self._sum / self._count

    def raw(self, pred: torch.Tensor, target: torch.Tensor, state: LossState | None = None) -> torch.Tensor:
        """``mean((pred - target)^2 * W)`` before the first-value normalisation."""
        if self.average:
            w = self.weight.to(pred)
        elif state is None or state.grad is None:
            raise RuntimeError("hessian_perturb with average=False needs state.grad (rows of prepare_grads())")
        else:
            w = state.grad
        return ((pred - target).pow(2) * w).mean()

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, state: LossState | None = None) -> torch.Tensor:
        raw = self.raw(pred, target, state)
        return raw if self.norm is None else self._first(raw, self.norm)


class FisherDPLRLoss(ReconLoss):
    """FIMA-Q's diagonal-plus-low-rank Fisher loss, refreshed ``k`` times during the reconstruction.

    Statistics (refreshed; :meth:`update`): rows ``g_r = mean_n |dL/dz_n|`` and ``d_r = mean_n |z^_n - z_n|``
    (flattened, [N_out]) with ``L`` = :func:`kl_task_loss` (T = 20) through the model with only this
    unit quantized in its current state (``z^``: its outputs, ``z``: FP targets), stacked to G, D
    ([r, N_out], r = refreshes so far) and ``B^-1 = (D D^T)^-1`` [r, r]. With ``e = |pred - target|``
    flattened to [B, N_out] and ``a_b = e_b G^T`` [r]:

        L1 = mean_b a_b B^-1 a_b^T            (low rank: e F_lr e^T, F_lr = G^T B^-1 G)
        L2 = mean_{b, i} e_bi^2 * mean_r G_ri   (diagonal)
        loss = p1 * L1 / L1_0 + p2 * L2 / L2_0

    ``L1_0`` / ``L2_0``: the terms at the first call after :meth:`start` and after every update.
    Refresh schedule (:meth:`refresh`): ``mode="q"``: every ``floor(iters / k)`` steps from step 0
    (``it % floor(iters / k) == 0``; more than k refreshes when k does not divide iters, as their
    code); ``mode="qf"``: steps 0 .. k-1.

    Source: ShiheWang/FIMA-Q ``utils/block_recon.py`` (HEAD 64c4b00): ``new_fisher_ro`` (rows, stacking,
    ``torch.linalg.inv(D D^T)``), ``reconstruct_single_block`` (``i_change = floor(iters / k)``,
    ``dis_mode`` 'q' / 'qf'), ``LossFunction`` (``'fisher_dplr'``; normalisers reset on
    ``count == 1 or update_fisher``); ``configs/{3,4,6}bit/best.py``: ``k = 5``, ``p1 = p2 = 1.0``,
    ``dis_mode = 'q'``, ``temp = 20`` (``LossFunction``'s own default is p1 = p2 = 2). ``iters`` 20000
    (their ``reconstruct_single_block`` default) is replaced by the engine's at :meth:`start`.
    Deviation: ``B^-1`` is computed in float64 (D's rows are positive and strongly correlated).
    In their code the refresh forward runs with every other block FP (all modes 'raw') and this block's
    QDrop dropping active (``training_mode``), on the whole calibration set.
    """

    name = "fisher_dplr"
    grad_model = "current_unit"

    def __init__(self, k: int = 5, p1: float = 1.0, p2: float = 1.0, mode: str = "q", temperature: float = 20.0) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (number of Fisher refreshes) must be an int >= 1, got {k!r}")
        self.k = k
        self.p1 = _non_negative("p1", p1)
        self.p2 = _non_negative("p2", p2)
        if self.p1 == 0 and self.p2 == 0:
            raise ValueError(f"p1 and p2 cannot both be 0, got p1={p1!r}, p2={p2!r}")
        if mode not in REFRESH_MODES:
            raise ValueError(f"mode must be one of {REFRESH_MODES}, got {mode!r}")
        self.mode = mode
        self.temperature = _positive("temperature", temperature)
        self.iters = 20000
        self._reset()

    def _reset(self) -> None:
        self.G: torch.Tensor | None = None
        self.D: torch.Tensor | None = None
        self.B_inv: torch.Tensor | None = None
        self._n1, self._n2 = _FirstValue(), _FirstValue()

    def start(self, iters: int) -> None:
        if isinstance(iters, int) and not isinstance(iters, bool) and self.k > iters >= 1:
            raise ValueError(f"k={self.k} Fisher refreshes do not fit into iters={iters} steps")
        super().start(iters)
        self._reset()

    @property
    def period(self) -> int:
        """Steps between refreshes in mode "q" (``floor(iters / k)``)."""
        return self.iters // self.k

    def refresh(self, iteration: int) -> bool:
        if isinstance(iteration, bool) or not isinstance(iteration, int) or not 0 <= iteration < self.iters:
            raise ValueError(f"iteration must be an int in [0, {self.iters}), got {iteration!r}")
        if self.mode == "q":
            return iteration % self.period == 0
        return iteration < self.k

    def schedule(self) -> list[int]:
        """Every step at which :meth:`refresh` is True."""
        return [it for it in range(self.iters) if self.refresh(it)]

    @staticmethod
    def rows(grads: torch.Tensor, q_out: torch.Tensor, fp_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, d) rows [N_out] from all samples' grads / quantized / FP outputs [N, *out].

        The engine may instead stream: sum ``|g|.flatten(1)`` and ``|z^ - z|.flatten(1)`` over chunks, / N.
        """
        return grads.abs().flatten(1).mean(0), (q_out - fp_out).abs().flatten(1).mean(0)

    def update(self, g_row: torch.Tensor, d_row: torch.Tensor) -> None:
        """Append one refresh's rows (each [N_out] or [1, N_out]); recompute B^-1; reset the normalisers."""
        g, d = g_row.detach().reshape(1, -1).abs(), d_row.detach().reshape(1, -1).abs()
        if g.shape != d.shape or (self.G is not None and g.shape[1] != self.G.shape[1]):
            raise ValueError(f"g/d rows must have the unit output's size, got {tuple(g.shape)} and {tuple(d.shape)}")
        G = g if self.G is None else torch.cat([self.G, g.to(self.G)])
        D = d if self.D is None else torch.cat([self.D, d.to(self.D)])
        D64 = D.double()
        b_inv, info = torch.linalg.inv_ex(D64 @ D64.T)
        if int(info) != 0 or not torch.isfinite(b_inv).all():
            # e.g. a zero d row (nothing quantized yet) or a repeated one: nothing is appended
            raise ValueError(f"D D^T ({D.shape[0]} x {D.shape[0]}) is singular: the d rows are zero or linearly dependent")
        self.G, self.D, self.B_inv = G, D, b_inv.to(D.dtype)
        self._n1, self._n2 = _FirstValue(), _FirstValue()

    def terms(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L1, L2) before normalisation."""
        if self.G is None:
            raise RuntimeError("fisher_dplr has no Fisher rows: call update() when refresh() says so")
        e = (pred - target).abs().flatten(1)  # [B, N_out]
        G = self.G.to(e)
        a = e @ G.T  # [B, r]
        l1 = ((a @ self.B_inv.to(e)) * a).sum(1).mean()
        l2 = (e.pow(2) * G.mean(0)).mean()
        return l1, l2

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, state: LossState | None = None) -> torch.Tensor:
        l1, l2 = self.terms(pred, target)
        return self._n1(l1, self.p1) + self._n2(l2, self.p2)


class KLHeadLoss(ReconLoss):
    """Head loss: ``KL(softmax(target / T) || softmax(pred / T))`` over the last axis, ``batchmean``.

    Source: APHQ-ViT and FIMA-Q ``utils/block_recon.py`` ``LossFunction`` (``'kl_div'``, used for the
    unit named ``head``): ``F.kl_div(F.log_softmax(pred), F.softmax(tgt), reduction="batchmean")``,
    no temperature (``temperature`` 1; their T = 20 is only in the gradient KL). ``norm``: APHQ-ViT
    since commit 73e78a7 also scales it by ``2 / first`` (``norm=2.0``); FIMA-Q does not (default None).
    """

    name = "kl_div"

    def __init__(self, temperature: float = 1.0, norm: float | None = None) -> None:
        self.temperature = _positive("temperature", temperature)
        self.norm = _norm(norm)
        self._first = _FirstValue()

    def start(self, iters: int) -> None:
        super().start(iters)
        self._first = _FirstValue()

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, state: LossState | None = None) -> torch.Tensor:
        t = self.temperature
        raw = F.kl_div(F.log_softmax(pred / t, dim=-1), F.softmax(target.detach() / t, dim=-1), reduction="batchmean")
        return raw if self.norm is None else self._first(raw, self.norm)


#: Losses by the authors' names (BRECQ ``opt_mode``, APHQ-ViT / FIMA-Q ``metric``).
LOSSES: dict[str, type[ReconLoss]] = {
    cls.name: cls for cls in (MSELoss, LpLoss, FisherDiagLoss, APHQLoss, FisherDPLRLoss, KLHeadLoss)
}


def make_loss(name: str, **kw: Any) -> ReconLoss:
    """Build the loss registered as ``name`` with keyword settings ``kw``.

    Raises:
        ValueError: unknown name or setting, or a setting out of range (the message names the value).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown reconstruction loss {name!r}; choose one of {sorted(LOSSES)}")
    cls = LOSSES[name]
    allowed = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    bad = sorted(set(kw) - set(allowed))
    if bad:
        raise ValueError(f"unknown setting(s) {bad} for loss {name!r}; it takes {allowed}")
    return cls(**kw)
