"""``quantize()``: one entry point for I&S-ViT and the baselines (calibration, SOS, reconstruction)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quant.config import QuantConfig
from ..quant.modules import QuantConv2d, QuantLinear
from ..quant.wrap import calibrate_activations, calibrate_weights, quantize_model, set_quant_state, supported_model
from ..utils import atomic_torch_save, resolve_device
from .cache import MemoryBudget
from .capture import capture_unit_io
from .methods import MethodSpec, resolve_method
from .recon import ReconConfig, reconstruct_unit
from .reparam import reparameterize

#: Callback signature: ``callback(stage_name, quantized_model)``; stages are ``"calibrated"``,
#: ``"stage1"``, ``"stage2"``, ``"stage3"`` (SOS) or ``"reconstructed"`` (single-stage).
StageCallback = Callable[[str, nn.Module], None]


@dataclass
class QuantResult:
    """Output of :func:`quantize`.

    Attributes:
        model: the fake-quantized model (quantization switched on), in eval mode.
        config: everything needed to rebuild it (method, bits, quantizer placement, schedule).
        timings: wall seconds per stage (``calibrate``, ``stage1``, ``stage2``, ``stage3``, ...).
        unit_losses: per reconstructed unit: stage, name, first/last loss.
    """

    model: nn.Module
    config: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    unit_losses: list[dict[str, Any]] = field(default_factory=list)


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


def _iters_for(spec: MethodSpec, iters: int | None, a_bits: int) -> int:
    if iters is not None:
        return iters
    return 200 if a_bits >= 6 else spec.default_iters


def quantize(
    model: nn.Module,
    method: str,
    w_bits: int,
    a_bits: int,
    calib: Any,
    iters: int | None = None,
    batch_size: int = 64,
    lr: float = 4e-5,
    device: str | torch.device | None = None,
    seed: int = 0,
    callbacks: Iterable[StageCallback] | StageCallback | None = None,
    softmax_quantizer: str | None = None,
    sos: bool = True,
    memory_budget: int | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    matmul_dtype: str = "float32",
) -> QuantResult:
    """Quantize a timm ViT/DeiT/Swin with ``method`` and return a :class:`QuantResult`.

    Args:
        model: FP timm model (left unchanged; a copy is quantized and another copy is the teacher).
        method: ``isvit``, ``isvit-official``, ``repq-vit``, ``ptq4vit``, ``qdrop`` or ``minmax``.
        w_bits / a_bits: bit-widths (2..16).
        calib: calibration images, a tensor [N, C, H, W] or a DataLoader of (images, labels).
        iters: Adam steps per unit and stage (default 1000, or 200 at >= 6-bit activations, as the paper).
        batch_size / lr: reconstruction mini-batch and Adam learning rate (cosine-decayed).
        device: ``"cpu"``, ``"cuda"``...; default the model's device. On CUDA, cached unit inputs and
            outputs stay in GPU memory while they fit in a third of the free memory.
        seed: seeds the mini-batch sampling (and QDrop's masks); CPU runs are bit-reproducible.
        callbacks: ``f(stage, model)`` called after each stage (snapshot the model there).
        softmax_quantizer / sos: ablation switches (paper Tables 3 and 4).
        memory_budget: bytes of host memory for cached unit inputs/outputs; beyond it caches spill
            to disk (default: a quarter of the available RAM).
        checkpoint_dir: save progress after every reconstructed unit and resume from it.
        progress: tqdm progress bars.
        matmul_dtype: ``"bfloat16"`` runs the reconstruction's matrix products in bf16 (quantizers,
            norms and softmax stay fp32); several times faster on CPUs with AMX and on GPUs. The
            returned model always evaluates in fp32.

    Raises:
        UnsupportedModelError: (a ``ValueError``) before any work, for architectures whose wrapping,
            reparameterization or reconstruction is not implemented (names the module path and class).
    """
    kind = supported_model(model)  # architecture guard first (isvit_viz.models.support)
    spec = resolve_method(method, softmax_quantizer, sos)
    qcfg = QuantConfig(
        w_bits=w_bits, a_bits=a_bits, softmax=spec.softmax, softmax_kwargs=dict(spec.softmax_kwargs),
        post_ln=spec.post_ln, post_gelu=spec.post_gelu, weight_granularity=spec.weight_granularity,
        act_init=spec.act_init, weight_init=spec.weight_init,
    )  # fmt: skip
    n_iters = _iters_for(spec, iters, a_bits)
    rcfg = ReconConfig(iters=n_iters, batch_size=batch_size, lr=lr, act_drop_prob=spec.act_drop_prob, matmul_dtype=matmul_dtype)
    images = _as_image_tensor(calib)
    check_input_shape(model, images)
    if spec.schedule != "none" and len(images) < batch_size:
        raise ValueError(f"calibration set has {len(images)} images, fewer than the batch size {batch_size}")
    dev = resolve_device(device, model)
    cbs = [callbacks] if callable(callbacks) else list(callbacks or [])

    config = {
        "method": method, "w_bits": w_bits, "a_bits": a_bits, "iters": n_iters if spec.schedule != "none" else 0,
        "batch_size": batch_size, "lr": lr, "seed": seed, "calib_images": len(images), "softmax_quantizer": spec.softmax,
        "sos": sos, "schedule": spec.schedule, "matmul_dtype": matmul_dtype, "quant_config": qcfg.to_dict(), "model_kind": kind,
        "build_spec": getattr(model, "isvit_build_spec", None),
    }  # fmt: skip
    teacher = copy.deepcopy(model).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    qmodel = quantize_model(copy.deepcopy(model), qcfg).to(dev).eval()
    n_init = spec.init_images or 256
    init_x = images[:n_init].to(dev)
    budget = MemoryBudget(memory_budget, device=dev)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # QDrop masks use the global RNG
    result = QuantResult(model=qmodel, config=config)
    ckpt = _Checkpoint(checkpoint_dir, config) if checkpoint_dir is not None else None
    resume = ckpt.load(qmodel, gen) if ckpt else None
    if resume:
        result.timings.update(resume["timings"])
        result.unit_losses = resume["unit_losses"]

    def fire(stage: str) -> None:
        for cb in cbs:
            cb(stage, qmodel)

    def done(stage: str) -> bool:
        return bool(resume) and stage in resume["stages_done"]

    def run_recon(stage: str, fp_inputs: bool) -> None:
        t0 = time.perf_counter()
        units = reconstruction_units(qmodel)
        start = resume["next_unit"] if resume and resume["stage"] == stage else 0
        bar = tqdm(units, desc=f"{method} {stage}", disable=not progress)
        for i, (name, unit, ukind) in enumerate(bar):
            if i < start:
                continue
            if not _unit_is_quantized(unit):
                continue  # nothing quantized here (stage-1 patch embedding): the loss is exactly 0
            if rcfg.iters == 0:
                continue  # nothing to fit: skip the capture passes too
            t_unit = teacher.get_submodule(name)
            if fp_inputs:  # inputs and targets both from the FP teacher: one pass
                x_cache, y_cache = capture_unit_io(teacher, t_unit, images, budget, dev)
            else:
                x_cache, _ = capture_unit_io(qmodel, unit, images, budget, dev, want_output=False)
                _, y_cache = capture_unit_io(teacher, t_unit, images, budget, dev, want_input=False)
            try:
                losses = reconstruct_unit(
                    unit,
                    x_cache,
                    y_cache,
                    rcfg,
                    dev,
                    gen,
                    tokens_last=(kind == "swin" and ukind == "block"),
                    desc=name,
                    progress=progress,
                )
            finally:
                x_cache.close()
                y_cache.close()
            result.unit_losses.append({"stage": stage, "unit": name, **losses})
            if ckpt:
                ckpt.save(qmodel, gen, stage, i + 1, result, stages_done)
        result.timings[stage] = result.timings.get(stage, 0.0) + time.perf_counter() - t0

    stages_done: list[str] = list(resume["stages_done"]) if resume else []
    t0 = time.perf_counter()
    if not done("calibrate"):
        weight_first = spec.schedule == "single"
        if weight_first:
            calibrate_weights(qmodel)
        set_quant_state(qmodel, weight=weight_first, act=True)
        calibrate_activations(qmodel, init_x)
        result.timings["calibrate"] = time.perf_counter() - t0
        stages_done.append("calibrate")
        if ckpt:
            ckpt.save(qmodel, gen, "calibrate", 0, result, stages_done)
    fire("calibrated")

    if spec.schedule == "sos":
        set_quant_state(qmodel, weight=False, act=True)
        if not done("stage1"):
            run_recon("stage1", fp_inputs=True)
            stages_done.append("stage1")
        fire("stage1")
        if not done("stage2"):
            t0 = time.perf_counter()
            reparameterize(qmodel, round_zero_point=spec.round_zero_point)
            calibrate_weights(qmodel)
            result.timings["stage2"] = time.perf_counter() - t0
            stages_done.append("stage2")
            if ckpt:
                ckpt.save(qmodel, gen, "stage2", 0, result, stages_done)
        set_quant_state(qmodel, weight=True, act=True)
        fire("stage2")
        if not done("stage3"):
            run_recon("stage3", fp_inputs=False)
            stages_done.append("stage3")
        fire("stage3")
    elif spec.schedule == "single":
        set_quant_state(qmodel, weight=True, act=True)
        if not done("reconstruct"):
            run_recon("reconstruct", fp_inputs=False)
            stages_done.append("reconstruct")
        fire("reconstructed")
    else:
        t0 = time.perf_counter()
        if not done("weights"):
            if spec.reparam:
                reparameterize(qmodel, round_zero_point=spec.round_zero_point)
            calibrate_weights(qmodel)
            stages_done.append("weights")
        result.timings["weights"] = time.perf_counter() - t0
        set_quant_state(qmodel, weight=True, act=True)
    result.timings["total"] = sum(v for k, v in result.timings.items() if k != "total")
    qmodel.eval()
    if ckpt:
        ckpt.finish()
    return result


class _Checkpoint:
    """Atomic progress checkpoints for resumable calibration (one file, replaced after every unit).

    ``progress.pt`` holds only tensors (model state, RNG states) and one JSON string with the rest
    (configuration incl. the package version, stage, timings, losses, quantizer switches), so it is
    read with ``torch.load(weights_only=True)``: a shared run folder cannot execute code when resumed.
    """

    FORMAT = 2

    def __init__(self, folder: str | Path, config: dict[str, Any]) -> None:
        from .. import __version__

        self.folder = Path(folder)
        self.path = self.folder / "progress.pt"
        self.config = json.loads(json.dumps({**config, "isvit_viz_version": __version__}, default=str))

    def _refuse(self, why: str) -> ValueError:
        return ValueError(f"checkpoint {self.path} {why}; delete {self.folder} (CLI: --overwrite) or use another checkpoint_dir")

    def load(self, qmodel: nn.Module, gen: torch.Generator) -> dict[str, Any] | None:
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
        qmodel.load_state_dict(state["model"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        for name, mod in qmodel.named_modules():
            flags = meta["quant_flags"].get(name)
            if flags is not None:
                mod.weight_quant, mod.act_quant = flags
        return meta

    def save(
        self, qmodel: nn.Module, gen: torch.Generator, stage: str, next_unit: int, result: QuantResult, stages_done: list[str]
    ) -> None:
        flags = {n: [bool(m.weight_quant), bool(m.act_quant)] for n, m in qmodel.named_modules() if hasattr(m, "act_quant")}
        meta = {
            "format": self.FORMAT, "config": self.config, "stage": stage, "next_unit": next_unit, "stages_done": list(stages_done),
            "timings": dict(result.timings), "unit_losses": list(result.unit_losses), "quant_flags": flags,
        }  # fmt: skip
        state = {
            "meta": json.dumps(meta),
            "model": qmodel.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        atomic_torch_save(state, self.path)

    def finish(self) -> None:
        (self.folder / "COMPLETE").write_text("calibration finished\n")
