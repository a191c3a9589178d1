"""``quantize()``: one entry point for I&S-ViT, the baselines and user-composed methods.

``quantize`` resolves the method (a registered name or a :class:`~isvit_viz.calib.Method`), checks
every input before any work, wraps a copy of the model, and hands the method's stages to the engine
(:func:`isvit_viz.calib.engine.run_stages`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quant.config import QuantConfig
from ..quant.wrap import quantize_model, supported_model
from ..utils import resolve_device, retain_freed_memory
from .cache import MemoryBudget
from .engine import (
    EngineContext,
    RunSettings,
    StageCallback,
    _Checkpoint,
    check_handlers,
    reconstruction_units,
    run_stages,
    softmax_choices,
)
from .methods import Method, resolve_method
from .recon import ReconConfig
from .stages import Reconstruct, as_loss, stage_dict


@dataclass
class QuantResult:
    """Output of :func:`quantize`.

    Attributes:
        model: the fake-quantized model, in eval mode (every registered method ends with weight and
            activation quantization on).
        config: everything needed to rebuild it (method, bits, quantizer placement, the stage list).
        timings: wall seconds per stage name (``calibrate``, ``stage1``, ``stage2``, ``stage3``, ...)
            and ``total``.
        unit_losses: per reconstructed unit: stage, name, first/last loss.
    """

    model: nn.Module
    config: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    unit_losses: list[dict[str, Any]] = field(default_factory=list)


def _as_image_tensor(calib: Any) -> torch.Tensor:
    """Accept a tensor [N, C, H, W], a DataLoader / iterable of (images, labels) or of images."""
    if isinstance(calib, torch.Tensor):
        x = calib
    elif isinstance(calib, (str, bytes, Path)):
        raise ValueError(f"calib must be a tensor [N, C, H, W] or a DataLoader, got {type(calib).__name__} {calib!r}; "
                         "for an image folder use isvit_viz.data.imagefolder_loader")  # fmt: skip
    elif isinstance(calib, Iterable):
        chunks = []
        for batch in calib:
            item = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(item, torch.Tensor):
                raise ValueError(f"calibration loader must yield tensors or (images, labels), got {type(item).__name__}")
            chunks.append(item)
        if not chunks:
            raise ValueError("calibration data is empty (the loader yielded no batches)")
        x = torch.cat(chunks)
    else:
        raise ValueError(f"calib must be a tensor [N, C, H, W] or a DataLoader, got {type(calib).__name__}")
    if x.dim() != 4:
        raise ValueError(f"calibration images must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("calibration data is empty (0 images)")
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("calibration images contain NaN/inf values")
    return x


def check_input_shape(model: nn.Module, images: torch.Tensor) -> None:
    """Raise ``ValueError`` before any work if the images do not fit the model's patch embedding."""
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if proj is not None and images.shape[1] != proj.in_channels:
        raise ValueError(f"images have {images.shape[1]} channels but the model expects {proj.in_channels}")
    size = getattr(pe, "img_size", None)
    if size is not None and not getattr(pe, "dynamic_img_size", False) and tuple(images.shape[-2:]) != tuple(size):
        raise ValueError(f"images are {tuple(images.shape[-2:])} pixels but the model expects {tuple(size)}")


def _default_iters(a_bits: int) -> int:
    """Stages that leave ``iters`` unset: 1000 Adam steps per unit and stage, 200 at >= 6-bit activations (paper §5.1)."""
    return 200 if a_bits >= 6 else 1000


def _stage_record(m: Method, run: RunSettings) -> tuple[int, list[dict[str, Any]]]:
    """(``config["iters"]``: the most Adam steps of any reconstruction stage, 0 without one; the stage
    list with the run settings filled in)."""
    resolved = [run.resolve(s) if isinstance(s, Reconstruct) else s for s in m.stages]
    iters = max((s.iters for s in resolved if isinstance(s, Reconstruct)), default=0)
    return iters, [stage_dict(s) for s in resolved]


def _check_loss_schedule(stage: Reconstruct, iters: int) -> None:
    """``ValueError`` before any work if a stage's loss cannot run ``iters`` steps (FIMA-Q: k refreshes)."""
    if iters < 1:
        return
    for key in ("loss", "head_loss"):
        spec = getattr(stage, key)
        if spec is not None:
            try:
                as_loss(spec).build().start(iters)
            except ValueError as e:
                raise ValueError(f"Reconstruct {stage.name!r}: {key}: {e}") from None


def _check_reconstruction(recon: list[Reconstruct], run: RunSettings, model: nn.Module, images: torch.Tensor) -> None:
    """Every reconstruction stage's resolved settings, loss schedule and batch against the data, before any work."""
    for s in recon:
        run.recon_config(s)
        _check_loss_schedule(s, run.resolve(s).iters)
    check_input_shape(model, images)
    for s in recon:
        if len(images) < run.resolve(s).batch_size:
            raise ValueError(f"calibration set has {len(images)} images, fewer than the batch size {run.resolve(s).batch_size}")


def _run_config(
    m: Method, run: RunSettings, recon: list[Reconstruct], qcfg: QuantConfig, given: dict[str, Any]
) -> dict[str, Any]:
    """The run's record (``QuantResult.config``, the checkpoint's resume guard): ``given`` plus what the
    method and the run settings decide, in the record's key order."""
    n_iters, stages = _stage_record(m, run)
    first = run.resolve(recon[0]) if recon else run.resolve(Reconstruct())
    order = ["method", "w_bits", "a_bits", "iters", "batch_size", "lr", "seed", "calib_images", "softmax_quantizer", "sos",
             "schedule", "matmul_dtype", "compile", "quant_config", "model_kind", "build_spec", "stages"]  # fmt: skip
    decided = {"iters": n_iters, "batch_size": first.batch_size, "lr": first.lr, "softmax_quantizer": m.softmax,
               "schedule": m.schedule, "quant_config": qcfg.to_dict(), "stages": stages}  # fmt: skip
    return {k: {**given, **decided}[k] for k in order}


def _teacher_and_student(model: nn.Module, qcfg: QuantConfig, dev: torch.device) -> tuple[nn.Module, nn.Module]:
    """A frozen FP copy of ``model`` (the teacher) and a quant-wrapped copy (the model to calibrate)."""
    teacher = copy.deepcopy(model).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, quantize_model(copy.deepcopy(model), qcfg).to(dev).eval()


def _resume(ctx: EngineContext, checkpoint_dir: str | Path | None, config: dict) -> dict | None:
    """Attach the run's checkpoint to ``ctx`` and restore a previous run's progress (``None``: fresh start)."""
    ctx.checkpoint = _Checkpoint(checkpoint_dir, config) if checkpoint_dir is not None else None
    resume = ctx.checkpoint.load(ctx.qmodel, ctx.generator) if ctx.checkpoint else None
    if resume:
        ctx.timings.update(resume["timings"])
        ctx.unit_losses = resume["unit_losses"]
        ctx.stages_done = list(resume["stages_done"])
    return resume


def quantize(
    model: nn.Module,
    method: str | Method,
    w_bits: int,
    a_bits: int,
    calib: Any,
    iters: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    callbacks: Iterable[StageCallback] | StageCallback | None = None,
    softmax_quantizer: str | None = None,
    sos: bool = True,
    memory_budget: int | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    matmul_dtype: str = "float32",
    compile: bool = False,
) -> QuantResult:
    """Quantize a timm ViT/DeiT/Swin with ``method`` and return a :class:`QuantResult`.

    Args:
        model: FP timm model (left unchanged; a copy is quantized and another copy is the teacher).
        method: a registered name (``isvit``, ``isvit-official``, ``qdrop``, ``brecq``, ``repq-vit``,
            ``ptq4vit``, ``fima-q``, the cheaper ``qdrop-ste``, ``reparam-logsqrt2``, ``twin-uniform-mse``, and ``minmax``;
            :data:`~isvit_viz.calib.METHODS`) or your own :class:`~isvit_viz.calib.Method`.
        w_bits / a_bits: bit-widths (2..16).
        calib: calibration images, a tensor [N, C, H, W] or a DataLoader of (images, labels).
        iters / batch_size / lr: Adam steps per unit and stage, reconstruction mini-batch and learning
            rate of STE-trained weights (cosine-decayed). ``None`` (default): each stage's own setting
            (``qdrop``: 20,000 steps of batch 32), and where a stage leaves it unset 1000 steps (200 at
            >= 6-bit activations), batch 64 and lr 4e-5, as the I&S-ViT paper. A value given here
            overrides every reconstruction stage: one matched budget for every method.
        device: ``"cpu"``, ``"cuda"``...; default the model's device. On CUDA, cached unit inputs and
            outputs stay in GPU memory while they fit in a third of the free memory.
        seed: seeds the mini-batch sampling (and QDrop's masks); CPU runs are bit-reproducible.
        callbacks: ``f(event, model)`` called after each stage that has an event (snapshot the model
            there): ``"calibrated"``, then ``"stage1"``, ``"stage2"``, ``"stage3"`` (I&S-ViT) or
            ``"reconstructed"`` (``qdrop``, ``brecq``, ``sos=False``); calibration-only methods fire only ``"calibrated"``.
        softmax_quantizer / sos: ablation switches (paper Tables 3 and 4).
        memory_budget: bytes of host memory for cached unit inputs/outputs; beyond it caches spill
            to disk (default: a quarter of the available RAM).
        checkpoint_dir: save progress after every stage and reconstructed unit and resume from it.
        progress: tqdm progress bars.
        matmul_dtype: ``"bfloat16"`` runs the reconstruction's matrix products in bf16 (quantizers,
            norms and softmax stay fp32); several times faster on CPUs with AMX and on GPUs. The
            returned model always evaluates in fp32.
        compile: run every reconstruction step through ``torch.compile`` (one compilation per unit,
            eager fallback with a warning; :mod:`isvit_viz.calib.fast`). Faster for long runs; not
            bit-identical to eager.

    Raises:
        UnsupportedModelError: (a ``ValueError``) before any work, for architectures whose wrapping,
            reparameterization or reconstruction is not implemented (names the module path and class).
        ValueError: before any work, for an unknown method, a bad stage list (naming the stage and
            field), bad run settings or calibration data.
    """
    kind = supported_model(model)  # architecture guard first (isvit_viz.models.support)
    retain_freed_memory()  # reconstruction steps re-allocate the same large blocks: no page faults for them
    m = resolve_method(method, softmax_quantizer, sos)
    check_handlers(m.stages)
    qcfg = m.quant_config(w_bits, a_bits)
    run = RunSettings(iters, batch_size, lr, matmul_dtype, _default_iters(a_bits), compile)
    given = {k: v for k, v in {"iters": iters, "batch_size": batch_size, "lr": lr}.items() if v is not None}
    ReconConfig(**given, matmul_dtype=matmul_dtype, compile=compile)  # check the run settings, even where no stage uses them
    recon = [s for s in m.stages if isinstance(s, Reconstruct)]
    images = _as_image_tensor(calib)
    _check_reconstruction(recon, run, model, images)
    dev = resolve_device(device, model)
    cbs = [callbacks] if callable(callbacks) else list(callbacks or [])
    config = _run_config(m, run, recon, qcfg, {
        "method": method if isinstance(method, str) else m.name, "w_bits": w_bits, "a_bits": a_bits, "seed": seed,
        "calib_images": len(images), "sos": sos, "matmul_dtype": matmul_dtype, "compile": compile, "model_kind": kind,
        "build_spec": getattr(model, "isvit_build_spec", None),
    })  # fmt: skip
    teacher, qmodel = _teacher_and_student(model, qcfg, dev)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # QDrop masks use the global RNG
    ctx = EngineContext(qmodel=qmodel, teacher=teacher, images=images, device=dev, budget=MemoryBudget(memory_budget, device=dev),
                        generator=gen, run=run, model_kind=kind, label=m.name, progress=progress, quant_config=qcfg)  # fmt: skip
    resume = _resume(ctx, checkpoint_dir, config)
    run_stages(m.stages, ctx, cbs, resume)
    return _result(ctx, config, qcfg)


def _result(ctx: EngineContext, config: dict[str, Any], qcfg: Any) -> QuantResult:
    """The finished run: total time, the softmax choices in the recorded placement, the checkpoint closed."""
    ctx.timings["total"] = sum(v for k, v in ctx.timings.items() if k != "total")
    choices = softmax_choices(ctx.unit_losses)
    if choices:  # so save_quantized / load_quantized rebuild the chosen quantizers
        config["quant_config"] = replace(qcfg, softmax_layers={**qcfg.softmax_layers, **choices}).to_dict()
    ctx.qmodel.eval()
    if ctx.checkpoint:
        ctx.checkpoint.finish()
    return QuantResult(model=ctx.qmodel, config=config, timings=ctx.timings, unit_losses=ctx.unit_losses)


__all__ = ["QuantResult", "StageCallback", "check_input_shape", "quantize", "reconstruction_units"]
