"""Per-sample gradients of the task loss w.r.t. one unit's output, for the Hessian / Fisher losses.

The task loss is :func:`isvit_viz.calib.losses.kl_task_loss` between the FP teacher's logits and the
logits of a network whose unit output is replaced by ``z``. The network after the unit is always the
FP teacher's (every later unit FP), which is what BRECQ (``quantize_model_till``), APHQ-ViT (FP model)
and FIMA-Q (every other block FP) use. A timm model has no generic "tail" function, so the teacher
runs whole with a forward hook on its copy of the unit that swaps the unit's output for a leaf
tensor ``z + shift``; the prefix is recomputed (no graph: nothing before the hook needs a gradient).
What ``z`` is decides the network the gradients describe (:data:`isvit_viz.calib.losses.GRAD_MODELS`):

* ``"fp"``: the teacher's own unit output (APHQ-ViT's perturbation of the FP model);
* ``"quantized_through_unit"``: the quantized model's unit output (every unit up to and including this
  one quantized: BRECQ's ``fisher_diag``), given as per-sample rows;
* ``"current_unit"``: the quantized unit applied to the teacher's unit input (only this unit quantized,
  in its current training state: FIMA-Q's refresh).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .losses import kl_task_loss

#: ``override(start, args, out) -> z``: the unit output to use for the rows ``start:start+len(out)``
#: (``args``: the unit's positional inputs in the teacher; ``out``: the teacher's own unit output).
Override = Callable[[int, tuple, torch.Tensor], torch.Tensor]


@dataclass
class GradChunk:
    """One chunk of the calibration set.

    Attributes:
        start: index of the chunk's first sample.
        grads: one [n, *out] tensor per shift: ``d kl_task_loss / dz`` at ``z + shift``.
        z: [n, *out] the unit output used (before the shift).
        fp_out: [n, *out] the teacher's own unit output.
    """

    start: int
    grads: list[torch.Tensor]
    z: torch.Tensor
    fp_out: torch.Tensor


@contextlib.contextmanager
def _no_param_grads(model: nn.Module) -> Iterator[None]:
    """Parameters do not require grad inside (no graph through the frozen network); restored after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, rg in saved:
            p.requires_grad_(rg)


@torch.no_grad()
def model_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Logits [N, classes] of ``model`` (eval mode) on ``images`` [N, C, H, W], on the host, in the model's dtype."""
    was = model.training
    model.eval()
    try:
        dtype = next(model.parameters()).dtype
        outs = [model(images[i : i + batch_size].to(device, dtype)).cpu() for i in range(0, len(images), batch_size)]
    finally:
        model.train(was)
    return torch.cat(outs)


def unit_output_grads(
    teacher: nn.Module,
    t_unit: nn.Module,
    images: torch.Tensor,
    teacher_logits: torch.Tensor,
    device: torch.device,
    temperature: float = 1.0,
    shifts: tuple[float, ...] = (0.0,),
    override: Override | None = None,
    batch_size: int = 64,
) -> Iterator[GradChunk]:
    """Yield per-sample task-loss gradients at ``t_unit``'s output, chunk by chunk, in sample order.

    Args:
        teacher: the FP model (its dtype is used throughout: a float64 copy gives float64 gradients).
        t_unit: the unit inside ``teacher`` whose output is replaced.
        images: [N, C, H, W] calibration images (host).
        teacher_logits: [N, classes] the teacher's logits on ``images`` (:func:`model_logits`).
        temperature / shifts: T of the KL; one gradient per shift, at ``z + shift`` (every element).
        override: the unit output to use instead of the teacher's (module docstring); ``None``: the
            teacher's own.

    Row n of every tensor depends only on sample n (the models are per-sample), so the chunking does
    not change the result.
    """
    dtype = next(teacher.parameters()).dtype
    state: dict = {}

    def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        state["fp_out"] = out.detach()
        with torch.no_grad():
            z = out if override is None else override(state["start"], args, out)
        state["z"] = z.detach().to(dtype)
        leaf = state["z"].clone().requires_grad_(True)
        state["leaf"] = leaf
        return leaf + state["shift"]

    handle = t_unit.register_forward_hook(hook)
    was = teacher.training
    teacher.eval()
    try:
        with _no_param_grads(teacher), torch.enable_grad():
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].to(device, dtype)
                t_logits = teacher_logits[start : start + batch_size].to(device, dtype)
                grads = []
                for shift in shifts:
                    state.update(start=start, shift=shift)
                    loss = kl_task_loss(teacher(x), t_logits, temperature)
                    (g,) = torch.autograd.grad(loss, state["leaf"])
                    grads.append(g.detach())
                yield GradChunk(start, grads, state["z"], state["fp_out"])
    finally:
        handle.remove()
        teacher.train(was)
