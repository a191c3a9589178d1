"""Capture the input and output of one unit (block or layer) over a calibration set."""

from __future__ import annotations

import torch
from torch import nn

from .cache import MemoryBudget, TensorCache


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the unit is needed."""


@torch.no_grad()
def capture_unit_io(
    model: nn.Module,
    unit: nn.Module,
    images: torch.Tensor,
    budget: MemoryBudget,
    device: torch.device,
    batch_size: int = 128,
    want_input: bool = True,
    want_output: bool = True,
) -> tuple[TensorCache | None, TensorCache | None]:
    """Run ``model`` over ``images`` ([N, C, H, W], host memory) and cache ``unit``'s first positional
    input and/or its output per sample. The forward stops right after the unit; the hook is always
    removed. Returns ``(inputs, outputs)`` caches (``None`` where not requested).
    """
    n = len(images)
    caches: dict[str, TensorCache | None] = {"in": None, "out": None}
    offset = [0]

    def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        for key, want, t in (("in", want_input, args[0]), ("out", want_output, out)):
            if not want:
                continue
            if caches[key] is None:
                caches[key] = TensorCache(n, tuple(t.shape[1:]), budget)
            caches[key].write(offset[0], t)
        raise _StopForward

    handle = unit.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            offset[0] = start
            try:
                model(images[start : start + batch_size].to(device))
            except _StopForward:
                pass
    finally:
        handle.remove()
        model.train(was_training)
    return caches["in"], caches["out"]
