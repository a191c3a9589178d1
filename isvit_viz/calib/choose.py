"""Choose each attention's post-softmax quantizer by its calibration error (the ``ChooseSoftmax`` stage).

SULQ is a power-of-two quantizer: its distinct levels are bounded by its exponent range, not by
``2 ** bits``, so at 6 bits a uniform or log-sqrt2 quantizer can reproduce attention better (issue
#17). Which one wins depends on the layer, so the choice is made per attention: every candidate is
calibrated on the post-softmax map ``P`` [B, heads, N, N] that the quantized model (in its current
state) feeds the ``P @ V`` matmul, and scored by the error that matters downstream, the matmul output
error ``mean((Q(P) @ V_q - P @ V_q) ** 2)`` with ``V_q`` the value operand as that matmul quantizes it.
The lowest error wins (ties: the earlier candidate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..quant.base import Quantizer
from ..quant.config import QuantConfig
from ..quant.modules import QuantAttention, QuantMatMul, QuantWindowAttention
from ..quant.wrap import softmax_quantizer
from .capture import _StopForward


def softmax_matmuls(model: nn.Module) -> list[tuple[str, QuantMatMul]]:
    """``(attention module path, its P @ V matmul)`` for every quantized attention, in forward order."""
    return [(n, m.matmul2) for n, m in model.named_modules() if isinstance(m, (QuantAttention, QuantWindowAttention))]


@torch.no_grad()
def capture_operands(
    model: nn.Module, mm: QuantMatMul, images: torch.Tensor, device: torch.device, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP operands ``(P, V)`` that ``mm`` receives over ``images`` (forward stopped after it), on the host."""
    got: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        got.append((args[0].detach().cpu(), args[1].detach().cpu()))
        raise _StopForward

    handle = mm.register_forward_pre_hook(hook)
    try:
        for i in range(0, len(images), batch_size):
            try:
                model(images[i : i + batch_size].to(device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat([a for a, _ in got]), torch.cat([b for _, b in got])


@torch.no_grad()
def matmul_error(q: Quantizer, p: torch.Tensor, v_q: torch.Tensor) -> float:
    """``mean((q(P) @ V_q - P @ V_q) ** 2)``: the attention-output error of quantizing ``P`` with ``q``."""
    return float((torch.matmul(q(p) - p, v_q)).pow(2).mean())


@torch.no_grad()
def choose_softmax_quantizers(
    model: nn.Module,
    cfg: QuantConfig,
    images: torch.Tensor,
    candidates: Sequence[str],
    device: torch.device,
) -> dict[str, dict[str, float | str]]:
    """Give every attention of the quantized ``model`` its lowest-error post-softmax quantizer.

    Args:
        model: the quantized model, activation quantization on and calibrated (its state decides the
            ``P`` and ``V`` each matmul sees).
        cfg: the placement (bits, ``softmax_kwargs`` for ``cfg.softmax``, ``act_init`` for uniform).
        images: [N, C, H, W] calibration images.
        candidates: quantizer names (:data:`isvit_viz.quant.config.SOFTMAX_QUANTIZERS`).

    Returns:
        attention path -> ``{"choice": name, "<candidate>": error, ...}``; the chosen, calibrated
        quantizer is installed in place of the old one (device and mode kept).
    """
    out: dict[str, dict[str, float | str]] = {}
    for path, mm in softmax_matmuls(model):
        p, v = capture_operands(model, mm, images, device)
        p, v = p.to(device), v.to(device)
        name, q, errors = choose_for(p, mm.quantizer_b(v) if mm.act_quant else v, cfg, candidates)
        q.train(mm.quantizer_a.training)
        mm.quantizer_a = q
        out[path] = {"choice": name, **errors}
    return out


@torch.no_grad()
def choose_for(
    p: torch.Tensor, v_q: torch.Tensor, cfg: QuantConfig, candidates: Sequence[str]
) -> tuple[str, Quantizer, dict[str, float]]:
    """(name, calibrated quantizer, errors by name): the candidate with the lowest :func:`matmul_error`
    for ``P`` [..., N, N] and ``V_q`` [..., N, d] (ties: the earlier candidate)."""
    errors: dict[str, float] = {}
    best: tuple[float, str, Quantizer] | None = None
    for name in candidates:
        q = softmax_quantizer(cfg, name).to(p.device).calibrate(p)
        errors[name] = err = matmul_error(q, p, v_q)
        if best is None or err < best[0]:
            best = (err, name, q)
    if best is None:
        raise ValueError("choose_for needs at least one candidate")
    return best[1], best[2], errors


def install_softmax_quantizers(model: nn.Module, cfg: QuantConfig, choices: dict[str, str]) -> None:
    """Put fresh (uncalibrated) quantizers of the chosen types in place, e.g. before loading a state dict."""
    mms = dict(softmax_matmuls(model))
    for path, name in choices.items():
        if path not in mms:
            raise ValueError(f"no quantized attention at {path!r} (softmax choice {name!r})")
        ref = next(mms[path].quantizer_b.buffers(), None)
        q = softmax_quantizer(cfg, name)
        mms[path].quantizer_a = q if ref is None else q.to(ref.device)
