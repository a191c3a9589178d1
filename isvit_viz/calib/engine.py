"""The engine that runs a method's stages in order (:func:`run_stages`), with resumable checkpoints.

One handler per stage type (:data:`STAGE_HANDLERS`, extend with :func:`register_stage`) does the work
on an :class:`EngineContext`: the quantized model, the FP teacher, the calibration images, the memory
budget and the random generator. After each stage the engine records its wall time under the stage
name, writes a checkpoint and calls the callbacks with the stage's event name. Inside a
:class:`~isvit_viz.calib.stages.Reconstruct` stage it checkpoints after every unit, so a resumed run
continues at the next unit and gives a bit-identical model.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quant.config import QuantConfig
from ..quant.modules import QuantConv2d, QuantLinear
from ..quant.wrap import calibrate_activations, calibrate_weights, quant_modules, set_quant_state
from ..utils import atomic_torch_save
from .cache import MemoryBudget, TensorCache
from .capture import capture_unit_io
from .choose import choose_softmax_quantizers, install_softmax_quantizers
from .losses import ReconLoss, make_loss
from .recon import ReconConfig, act_scale_quantizers, reconstruct_unit
from .reparam import reparameterize
from .stages import (
    Calibrate,
    ChooseSoftmax,
    HessianCalibrate,
    Mix,
    Reconstruct,
    ReluMLP,
    Reparameterize,
    Requantize,
    Stage,
    as_loss,
)
from .task_grads import model_logits, unit_output_grads

#: Run defaults of reconstruction stages that leave ``batch_size`` / ``lr`` unset (I&S-ViT paper §5.1).
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 4e-5

#: Callback signature: ``callback(event, quantized_model)`` after each stage that has an event.
StageCallback = Callable[[str, nn.Module], None]


def reconstruction_units(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Units in forward order: ``(name, module, kind)`` with kind ``"layer"`` or ``"block"``.

    Patch-embedding conv, every transformer block (the guard's block kinds, incl. parallel blocks),
    Swin PatchMerging reductions, and the heads (``head``/``head.fc``, DeiT's ``head_dist``).
    """
    from ..models.support import HEAD_LINEARS, block_types

    units: list[tuple[str, nn.Module, str]] = []
    taken: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        leaf = name.rpartition(".")[2]
        if type(mod) in block_types():
            units.append((name, mod, "block"))
        elif isinstance(mod, QuantConv2d) or (isinstance(mod, QuantLinear) and (leaf == "reduction" or name in HEAD_LINEARS)):
            units.append((name, mod, "layer"))
        else:
            continue
        taken.append(name)
    return units


def _unit_is_quantized(unit: nn.Module) -> bool:
    for m in unit.modules():
        if getattr(m, "weight_quant", False) or (
            getattr(m, "act_quant", False) and (getattr(m, "input_quantizer", None) is not None or hasattr(m, "quantizer_a"))
        ):
            return True
    return False


@dataclass(frozen=True)
class RunSettings:
    """Run-level reconstruction settings (the ``quantize()`` arguments; ``compile``: see :class:`ReconConfig`).

    ``iters`` / ``batch_size`` / ``lr``: ``None`` lets each stage use its own value, and the run default
    (``default_iters``, batch 64, lr 4e-5) where the stage leaves it ``None``; a number overrides every
    stage (one matched budget for all methods).
    """

    iters: int | None
    batch_size: int | None
    lr: float | None
    matmul_dtype: str = "float32"
    default_iters: int = 1000
    compile: bool = False

    def resolve(self, stage: Reconstruct) -> Reconstruct:
        """``stage`` with ``iters`` / ``batch_size`` / ``lr`` decided (run override > stage > default)."""
        pick = lambda run, own, default: run if run is not None else (own if own is not None else default)  # noqa: E731
        return replace(
            stage,
            iters=pick(self.iters, stage.iters, self.default_iters),
            batch_size=pick(self.batch_size, stage.batch_size, DEFAULT_BATCH_SIZE),
            lr=pick(self.lr, stage.lr, DEFAULT_LR),
        )

    def recon_config(self, stage: Reconstruct) -> ReconConfig:
        """The optimiser settings of one (resolved) reconstruction stage."""
        s = self.resolve(stage)
        mix = s.inputs.p if isinstance(s.inputs, Mix) else 0.0
        return ReconConfig(iters=s.iters, batch_size=s.batch_size, lr=s.lr, act_drop_prob=s.act_drop_prob,
                           matmul_dtype=self.matmul_dtype, compile=self.compile, rounding=s.rounding, input_mix=mix,
                           act_scale_lr=s.act_scale_lr, act_scale_grad_scale=s.act_scale_grad_scale,
                           loss_p=s.loss_p)  # fmt: skip


@dataclass
class EngineContext:
    """Everything a stage handler works on; ``timings`` / ``unit_losses`` / ``stages_done`` accumulate."""

    qmodel: nn.Module
    teacher: nn.Module
    images: torch.Tensor
    device: torch.device
    budget: MemoryBudget
    generator: torch.Generator
    run: RunSettings
    model_kind: str
    label: str = "method"
    quant_config: QuantConfig | None = None
    progress: bool = True
    checkpoint: _Checkpoint | None = None
    timings: dict[str, float] = field(default_factory=dict)
    unit_losses: list[dict[str, Any]] = field(default_factory=list)
    stages_done: list[str] = field(default_factory=list)
    stage_index: int = 0
    start_unit: int = 0  # first unit of the current Reconstruct stage (after a resume)
    # Hessian / Fisher losses: FP teachers by dtype (a float64 copy on demand) and their logits
    _teachers: dict[torch.dtype, nn.Module] = field(default_factory=dict, repr=False)
    _logits: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    def teacher_as(self, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
        """The FP teacher in ``dtype`` (a copy unless float32) and its logits on the calibration images."""
        if dtype not in self._teachers:
            self._teachers[dtype] = self.teacher if dtype == torch.float32 else copy.deepcopy(self.teacher).to(dtype)
            self._logits[dtype] = model_logits(self._teachers[dtype], self.images, self.device)
        return self._teachers[dtype], self._logits[dtype]

    def save(self, next_unit: int = 0) -> None:
        """Checkpoint the current stage's progress (no-op without ``checkpoint_dir``)."""
        if self.checkpoint is not None:
            self.checkpoint.save(self, next_unit)


StageHandler = Callable[[Any, EngineContext], None]
#: Stage type -> the function that runs it.
STAGE_HANDLERS: dict[type, StageHandler] = {}


def register_stage(stage_type: type) -> Callable[[StageHandler], StageHandler]:
    """Decorator: make ``handler(stage, ctx)`` run every stage of ``stage_type`` (a :class:`Stage` subclass)."""

    def deco(fn: StageHandler) -> StageHandler:
        STAGE_HANDLERS[stage_type] = fn
        return fn

    return deco


@register_stage(Calibrate)
def _calibrate(stage: Calibrate, ctx: EngineContext) -> None:
    if stage.weights == "calibrate":
        calibrate_weights(ctx.qmodel)
    set_quant_state(ctx.qmodel, weight=stage.weights != "fp", act=True)
    calibrate_activations(ctx.qmodel, ctx.images[: stage.images].to(ctx.device))


@register_stage(HessianCalibrate)
def _hessian(stage: HessianCalibrate, ctx: EngineContext) -> None:
    from .hessian import HessianConfig, hessian_calibrate

    cfg = HessianConfig(n_candidates=stage.candidates, rounds=stage.rounds)
    hessian_calibrate(ctx.qmodel, ctx.images[: stage.images].to(ctx.device), cfg=cfg, progress=ctx.progress)
    set_quant_state(ctx.qmodel, weight=True, act=True)


@register_stage(ReluMLP)
def _relu_mlp(stage: ReluMLP, ctx: EngineContext) -> None:
    from .mlp_recon import MLPReconConfig, aph_weight, mlp_units, positive_quantile, reconstruct_mlp

    set_quant_state(ctx.qmodel, weight=False, act=False)
    a_bits = ctx.quant_config.a_bits if ctx.quant_config is not None else 8
    cfg = MLPReconConfig(
        iters=ctx.run.iters if ctx.run.iters is not None else stage.iters,
        batch_size=ctx.run.batch_size if ctx.run.batch_size is not None else stage.batch_size,
        lr=stage.lr, clamp_weight=stage.clamp_weight, eps=stage.eps, temperature=stage.temperature,
        clamp_pct=stage.clamp_pct if stage.clamp_pct is not None else (0.99 if a_bits <= 3 else 0.98),
    )  # fmt: skip
    teacher64, logits64 = ctx.teacher_as(torch.float64)
    for i, (path, mlp, t_mlp) in enumerate(mlp_units(ctx.qmodel, ctx.teacher)):
        if i < ctx.start_unit:
            continue  # done before a resume
        x, y = capture_unit_io(ctx.teacher, t_mlp, ctx.images, ctx.budget, ctx.device)
        try:
            w = aph_weight(teacher64, teacher64.get_submodule(path), ctx.images, logits64, ctx.device, cfg.eps, cfg.temperature)
            ub = positive_quantile(t_mlp, x, cfg.clamp_pct, ctx.device)
            out = reconstruct_mlp(mlp, x, y, w, ub, cfg, ctx.device, ctx.generator, ctx.progress, desc=path)
        finally:
            x.close()
            y.close()
        ctx.unit_losses.append({"stage": stage.name, "unit": path, "ub": ub, **out})
        ctx.save(next_unit=i + 1)


@register_stage(ChooseSoftmax)
def _choose_softmax(stage: ChooseSoftmax, ctx: EngineContext) -> None:
    if ctx.quant_config is None:
        raise ValueError(f"{stage.name}: the engine context has no quant_config (the placement to build candidates)")
    found = choose_softmax_quantizers(ctx.qmodel, ctx.quant_config, ctx.images[: stage.images], stage.candidates, ctx.device)
    for path, rec in found.items():
        ctx.unit_losses.append({"stage": stage.name, "unit": path, "softmax_choice": rec.pop("choice"), "errors": rec})


def softmax_choices(unit_losses: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Attention path -> chosen post-softmax quantizer, from the records of ``ChooseSoftmax`` stages (last wins)."""
    return {u["unit"]: u["softmax_choice"] for u in unit_losses if "softmax_choice" in u}


@register_stage(Reparameterize)
def _reparameterize(stage: Reparameterize, ctx: EngineContext) -> None:
    reparameterize(ctx.qmodel, round_zero_point=stage.zero_point == "round")


@register_stage(Requantize)
def _requantize(stage: Requantize, ctx: EngineContext) -> None:
    calibrate_weights(ctx.qmodel)
    for _, mod in quant_modules(ctx.qmodel):  # activations stay as they are
        mod.weight_quant = True


def _unit_data(stage: Reconstruct, ctx: EngineContext, unit: nn.Module, t_unit: nn.Module) -> tuple[TensorCache, ...]:
    """(inputs, targets, FP inputs or None): targets are always the FP teacher's unit outputs."""
    cap = lambda model, mod, **kw: capture_unit_io(model, mod, ctx.images, ctx.budget, ctx.device, **kw)
    if stage.inputs == "fp":  # inputs and targets both from the FP teacher: one pass
        x, y = cap(ctx.teacher, t_unit)
        return x, y, None
    x, _ = cap(ctx.qmodel, unit, want_output=False)
    if isinstance(stage.inputs, Mix):
        fp_x, y = cap(ctx.teacher, t_unit)
        return x, y, fp_x
    _, y = cap(ctx.teacher, t_unit, want_input=False)
    return x, y, None


def _unit_loss(stage: Reconstruct, ctx: EngineContext, name: str) -> ReconLoss:
    """A fresh loss object for unit ``name``: the stage's ``head_loss`` for classifier heads, else ``loss``."""
    from ..models.support import HEAD_LINEARS

    spec = stage.head_loss if (name in HEAD_LINEARS and stage.head_loss is not None) else stage.loss
    if spec == "lp":  # the plain name takes the stage's loss_p (BRECQ / QDrop: 2.4)
        return make_loss("lp", p=stage.loss_p)
    return as_loss(spec).build()


def _prepare_loss(
    loss: ReconLoss, ctx: EngineContext, name: str, unit: nn.Module, iters: int
) -> tuple[TensorCache | None, Callable[[], tuple[torch.Tensor, torch.Tensor]] | None]:
    """Start ``loss`` for a unit of ``iters`` steps and compute what it needs from the task loss.

    Returns the per-sample gradient rows (a cache, for ``per_sample`` losses) and the refresh function
    (``None`` for losses that never refresh): ``() -> (g_row, d_row)`` with the unit in its state at
    the call (FIMA-Q, :meth:`~isvit_viz.calib.losses.FisherDPLRLoss.update`).
    """
    loss.start(iters)
    dtype = getattr(torch, getattr(loss, "grad_dtype", "float32"))
    if loss.grad_model == "current_unit":
        teacher, logits = ctx.teacher_as(torch.float32)
        t_unit = teacher.get_submodule(name)

        def refresh() -> tuple[torch.Tensor, torch.Tensor]:
            g_sum = d_sum = None
            for c in unit_output_grads(teacher, t_unit, ctx.images, logits, ctx.device, loss.temperature,
                                       override=lambda _start, args, _out: unit(*args)):  # fmt: skip
                g = c.grads[0].abs().flatten(1).sum(0)
                d = (c.z - c.fp_out.to(c.z)).abs().flatten(1).sum(0)
                g_sum, d_sum = (g, d) if g_sum is None else (g_sum + g, d_sum + d)
            return g_sum / len(ctx.images), d_sum / len(ctx.images)

        return None, refresh
    if not loss.needs_grads:
        return None, None
    teacher, logits = ctx.teacher_as(dtype)
    override = None
    q_out = None
    if loss.grad_model == "quantized_through_unit":
        _, q_out = capture_unit_io(ctx.qmodel, unit, ctx.images, ctx.budget, ctx.device, want_input=False)
        override = lambda start, _args, out: q_out.gather(torch.arange(start, start + len(out)), out.device)  # noqa: E731
    rows: TensorCache | None = None
    try:
        for c in unit_output_grads(teacher, teacher.get_submodule(name), ctx.images, logits, ctx.device,
                                   loss.temperature, loss.grad_shifts, override):  # fmt: skip
            r = loss.prepare_grads(c.grads)
            if r is not None:
                if rows is None:
                    rows = TensorCache(len(ctx.images), tuple(r.shape[1:]), ctx.budget)
                rows.write(c.start, r.float())
    finally:
        if q_out is not None:
            q_out.close()
    return rows, None


@register_stage(Reconstruct)
def _reconstruct(stage: Reconstruct, ctx: EngineContext) -> None:
    set_quant_state(ctx.qmodel, weight=stage.weights == "quantized", act=stage.activations == "quantized")
    rcfg = ctx.run.recon_config(stage)
    units = reconstruction_units(ctx.qmodel)
    bar = tqdm(units, desc=f"{ctx.label} {stage.name}", disable=not ctx.progress)
    for i, (name, unit, _kind) in enumerate(bar):
        if i < ctx.start_unit or not _unit_is_quantized(unit):
            continue  # done before a resume, or nothing quantized (stage-1 patch embedding: the loss is exactly 0)
        if rcfg.iters == 0:
            continue  # nothing to fit: skip the capture passes too
        if rcfg.rounding == "fixed" and not act_scale_quantizers(unit):
            continue  # only step sizes learn, and this unit has none (the patch embedding of an FP image)
        caches = _unit_data(stage, ctx, unit, ctx.teacher.get_submodule(name))
        loss = _unit_loss(stage, ctx, name)
        rows = None
        try:
            rows, refresh = _prepare_loss(loss, ctx, name, unit, rcfg.iters)
            # tokens_last=None: the loss layout follows the unit (NHWC for Swin blocks and PatchMerging)
            losses = reconstruct_unit(unit, caches[0], caches[1], rcfg, ctx.device, ctx.generator, tokens_last=None,
                                      desc=name, progress=ctx.progress, fp_inputs=caches[2], loss=loss,
                                      grad_rows=rows, refresh=refresh)  # fmt: skip
        finally:
            for c in (*caches, rows):
                if c is not None:
                    c.close()
        ctx.unit_losses.append({"stage": stage.name, "unit": name, **losses})
        ctx.save(next_unit=i + 1)


def check_handlers(stages: Sequence[Stage]) -> None:
    """``ValueError`` before any work if a stage type has no registered handler."""
    for i, s in enumerate(stages):
        if type(s) not in STAGE_HANDLERS:
            raise ValueError(f"stages[{i}] ({type(s).__name__} {s.name!r}): no engine handler registered for "
                             f"{type(s).__name__}; use isvit_viz.calib.engine.register_stage")  # fmt: skip


def run_stages(
    stages: Sequence[Stage], ctx: EngineContext, callbacks: Sequence[StageCallback] = (), resume: dict | None = None
) -> None:
    """Run ``stages`` in order on ``ctx``, skipping those a resumed checkpoint has finished.

    Each stage's wall time is added to ``ctx.timings[stage.name]`` (stages sharing a name add up); a
    checkpoint is written after it; then every callback gets ``(stage.callback_event, ctx.qmodel)``
    (also for stages finished before a resume, so snapshots are complete).
    """
    check_handlers(stages)
    n_done = len(resume["stages_done"]) if resume else 0
    for i, stage in enumerate(stages):
        if i >= n_done:
            ctx.stage_index = i
            ctx.start_unit = resume["next_unit"] if resume and resume["stage_index"] == i else 0
            t0 = time.perf_counter()
            STAGE_HANDLERS[type(stage)](stage, ctx)
            ctx.timings[stage.name] = ctx.timings.get(stage.name, 0.0) + time.perf_counter() - t0
            ctx.stages_done.append(stage.name)
            ctx.start_unit = 0
            ctx.save()
        event = stage.callback_event
        if event is not None:
            for cb in callbacks:
                cb(event, ctx.qmodel)


class _Checkpoint:
    """Atomic progress checkpoints for resumable calibration (one file, replaced after every unit).

    ``progress.pt`` holds only tensors (model state, RNG states) and one JSON string with the rest
    (configuration incl. the package version and the stage list, stage index, timings, losses, quantizer
    switches), so it is read with ``torch.load(weights_only=True)``: a shared run folder cannot execute
    code when resumed.
    """

    FORMAT = 3

    def __init__(self, folder: str | Path, config: dict[str, Any]) -> None:
        from .. import __version__

        self.folder = Path(folder)
        self.path = self.folder / "progress.pt"
        self.config = json.loads(json.dumps({**config, "isvit_viz_version": __version__}, default=str))

    def _refuse(self, why: str) -> ValueError:
        return ValueError(f"checkpoint {self.path} {why}; delete {self.folder} (CLI: --overwrite) or use another checkpoint_dir")

    def load(self, qmodel: nn.Module, gen: torch.Generator) -> dict[str, Any] | None:
        """Restore model, generator, global RNG and quantizer switches; return the progress record (or None)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as e:  # a damaged or foreign checkpoint must not be silently ignored
            raise self._refuse(f"cannot be read safely (weights_only=True): {str(e).splitlines()[0] if str(e) else e!r}") from e
        if not isinstance(state, dict) or not isinstance(state.get("meta"), str):
            raise self._refuse("was written by an older isvit_viz (no version recorded)")
        meta = json.loads(state["meta"])
        if meta.get("format") != self.FORMAT:
            raise self._refuse(f"has checkpoint format {meta.get('format')!r}, this code writes {self.FORMAT}")
        theirs, ours = meta["config"].get("isvit_viz_version"), self.config["isvit_viz_version"]
        if theirs != ours:
            raise self._refuse(f"was written by isvit_viz {theirs}, this is {ours}; results would mix two code versions")
        if meta["config"] != self.config:
            raise self._refuse("was written for a different run configuration")
        choices = softmax_choices(meta["unit_losses"])
        if choices:  # a ChooseSoftmax stage ran: the same quantizer types before the state is loaded
            install_softmax_quantizers(qmodel, QuantConfig.from_dict(self.config["quant_config"]), choices)
        qmodel.load_state_dict(state["model"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        for name, mod in qmodel.named_modules():
            flags = meta["quant_flags"].get(name)
            if flags is not None:
                mod.weight_quant, mod.act_quant = flags
        return meta

    def save(self, ctx: EngineContext, next_unit: int) -> None:
        qmodel = ctx.qmodel
        flags = {n: [bool(m.weight_quant), bool(m.act_quant)] for n, m in qmodel.named_modules() if hasattr(m, "act_quant")}
        meta = {
            "format": self.FORMAT, "config": self.config, "stage_index": ctx.stage_index, "next_unit": next_unit,
            "stages_done": list(ctx.stages_done), "timings": dict(ctx.timings), "unit_losses": list(ctx.unit_losses),
            "quant_flags": flags,
        }  # fmt: skip
        state = {
            "meta": json.dumps(meta),
            "model": qmodel.state_dict(),
            "generator": ctx.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        atomic_torch_save(state, self.path)

    def finish(self) -> None:
        (self.folder / "COMPLETE").write_text("calibration finished\n")
