"""Loss landscapes: the paper's block-local protocol (Fig. 3) and Li et al.'s whole-model 2-D slice.

Our own direction and grid code (loss-landscapes 3.0.6 has a misaligned grid, uniform instead of
Gaussian directions, a crash on zero parameters, and leaves models displaced; environment.md 5.3),
kept compatible with its ``loss_landscapes.metrics.Metric`` interface.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calib.pipeline import check_input_shape
from ..calib.recon import recon_loss
from ..quant.config import QuantConfig
from ..quant.wrap import calibrate_activations, calibrate_weights, quantize_model, set_quant_state


@dataclass
class Landscape:
    """A 2-D loss surface: ``Z[i, j]`` is the loss at ``alphas[i] * d1 + betas[j] * d2``."""

    alphas: np.ndarray
    betas: np.ndarray
    Z: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def center(self) -> float:
        """Loss at the unperturbed point (the grid always contains 0 on both axes)."""
        i, j = int(np.argmin(np.abs(self.alphas))), int(np.argmin(np.abs(self.betas)))
        return float(self.Z[i, j])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists of floats); :meth:`from_dict` restores it exactly."""
        return {"alphas": self.alphas.tolist(), "betas": self.betas.tolist(), "Z": self.Z.tolist(), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Landscape:
        return cls(
            np.asarray(d["alphas"], float), np.asarray(d["betas"], float), np.asarray(d["Z"], float), dict(d.get("meta", {}))
        )


def _grid(extent: float, steps: int) -> np.ndarray:
    if not (isinstance(extent, (int, float)) and extent > 0 and np.isfinite(extent)):
        raise ValueError(f"landscape range must be > 0, got {extent!r}")
    if not isinstance(steps, int) or steps < 3 or steps % 2 == 0:
        raise ValueError(f"steps must be an odd int >= 3 (so the grid contains 0), got {steps!r}")
    return np.linspace(-extent, extent, steps)


class _ModelWrapperShim:
    """Minimal object with ``forward`` so ``loss_landscapes.metrics`` metrics can evaluate a model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """Gaussian direction with each output row (filter) rescaled to the norm of the matching weight
    row; parameters with ndim <= 1 (biases, norms) get a zero direction (Li et al. 2018)."""
    dirs = []
    for p in model.parameters():
        if p.dim() <= 1:
            dirs.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
        pn = p.detach().flatten(1).norm(dim=1).view(-1, *[1] * (p.dim() - 1))
        dn = d.flatten(1).norm(dim=1).view(-1, *[1] * (p.dim() - 1)).clamp_min(1e-12)
        dirs.append(d * pn / dn)
    return dirs


@torch.no_grad()
def _walk_grid(
    params: list[torch.Tensor],
    d1: list[torch.Tensor],
    d2: list[torch.Tensor],
    alphas: np.ndarray,
    betas: np.ndarray,
    evaluate: Callable[[], float],
) -> np.ndarray:
    """Set params = theta0 + a d1 + b d2 from a saved copy at every grid point (no drift) and restore."""
    theta0 = [p.detach().clone() for p in params]
    Z = np.empty((len(alphas), len(betas)))
    try:
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                for p, t, u, v in zip(params, theta0, d1, d2):
                    p.copy_(t + float(a) * u + float(b) * v)
                Z[i, j] = evaluate()
    finally:
        for p, t in zip(params, theta0):
            p.copy_(t)
    return Z


def model_landscape(model: nn.Module, metric: Any, extent: float = 1.0, steps: int = 21, seed: int = 0) -> Landscape:
    """Whole-model 2-D landscape around the current weights (Li et al.): filter-normalized Gaussian
    directions, 1-D parameters fixed. ``metric`` is a ``loss_landscapes.metrics.Metric`` (e.g.
    ``Loss(loss_fn, inputs, targets)``) or any callable taking an object with ``.forward``.

    Runs in eval mode under ``no_grad``; the weights and ``requires_grad`` flags are restored.
    """
    alphas = betas = _grid(extent, steps)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    d1, d2 = filter_normalized_direction(model, gen), filter_normalized_direction(model, gen)
    was_training = model.training
    flags = [p.requires_grad for p in params]
    model.eval()
    shim = _ModelWrapperShim(model)
    try:
        Z = _walk_grid(params, d1, d2, alphas, betas, lambda: float(metric(shim)))
    finally:
        model.train(was_training)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return Landscape(alphas, betas, Z, {"kind": "model", "extent": extent, "seed": seed})


@torch.no_grad()
def linear_path(model_start: nn.Module, model_end: nn.Module, metric: Any, steps: int = 10) -> np.ndarray:
    """Metric along theta_start + t (theta_end - theta_start) for t = 1/steps .. 1 (the grid that
    ``loss_landscapes.linear_interpolation`` uses, for cross-checking); the model is restored."""
    params = list(model_start.parameters())
    delta = [e.detach() - s.detach() for s, e in zip(params, model_end.parameters())]
    zero = [torch.zeros_like(p) for p in params]
    ts = np.arange(1, steps + 1) / steps
    model_start.eval()
    shim = _ModelWrapperShim(model_start)
    return _walk_grid(params, delta, zero, ts, np.array([0.0]), lambda: float(metric(shim)))[:, 0]


# ----------------------------------------------------------------------------- block-local (Fig. 3)
FIG3_CONFIGS = {
    "w_channel_a_layer": "(a) channel-wise weights + layer-wise activations",
    "fp_w_a_layer": "(b) FP weights + layer-wise activations",
    "fp_w_a_channel": "(c) FP weights + channel-wise post-LN activations",
}


def fig3_models(fp_model: nn.Module, images: torch.Tensor, bits: int = 4, init_images: int = 64) -> dict[str, nn.Module]:
    """The three quantized configurations of paper Fig. 3, calibrated on ``images[:init_images]``."""
    check_input_shape(fp_model, images)
    out = {}
    for key, post_ln, wq in (
        ("w_channel_a_layer", "layer", True),
        ("fp_w_a_layer", "layer", False),
        ("fp_w_a_channel", "channel", False),
    ):
        q = quantize_model(copy.deepcopy(fp_model), QuantConfig(w_bits=bits, a_bits=bits, post_ln=post_ln)).eval()
        if wq:
            calibrate_weights(q)
        set_quant_state(q, weight=wq, act=True)
        calibrate_activations(q, images[:init_images])
        out[key] = q
    return out


def landscape_for_setting(
    fp_model: nn.Module,
    images: torch.Tensor,
    block: int,
    bits: int = 4,
    eta: float | None = None,
    steps: int = 7,
    extent: float = 0.5,
    seed: int = 0,
) -> Landscape:
    """Block-local landscape of configuration (c) (FP weights, channel-wise post-LN activations) at
    activation bit-width ``bits`` with SULQ shift ``eta`` (``None``: searched). Used by the
    bit-width / shift explorer of notebook 02."""
    kw = {"mode": "paper"} if eta is None else {"mode": "paper", "eta": eta}
    q = quantize_model(copy.deepcopy(fp_model), QuantConfig(w_bits=bits, a_bits=bits, softmax="sulq", softmax_kwargs=kw)).eval()
    set_quant_state(q, weight=False, act=True)
    calibrate_activations(q, images[:64])
    land = block_landscape(q, fp_model, block, images, extent=extent, steps=steps, seed=seed)
    land.meta.update({"bits": bits, "eta": eta})
    return land


def _block_io(
    model: nn.Module, block: nn.Module, images: torch.Tensor, batch_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    store: dict[str, list[torch.Tensor]] = {"x": [], "y": []}

    def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:  # must return None (else it replaces the output)
        store["x"].append(args[0].detach())
        store["y"].append(out.detach())

    h = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for s in range(0, len(images), batch_size):
                model(images[s : s + batch_size].to(next(model.parameters()).device))
    finally:
        h.remove()
    return torch.cat(store["x"]), torch.cat(store["y"])


def _blocks(model: nn.Module) -> list[nn.Module]:
    from ..calib.pipeline import reconstruction_units

    blocks = [m for _, m, kind in reconstruction_units(model) if kind == "block"]
    if not blocks:
        from timm.models.swin_transformer import SwinTransformerBlock
        from timm.models.vision_transformer import Block

        blocks = [m for m in model.modules() if isinstance(m, (Block, SwinTransformerBlock))]
    return blocks


def block_landscape(
    q_model: nn.Module,
    fp_model: nn.Module,
    block: int,
    images: torch.Tensor,
    weight: str = "attn.qkv.weight",
    channels: tuple[int, int] | None = None,
    extent: float = 0.5,
    steps: int = 21,
    seed: int = 0,
) -> Landscape:
    """Paper Fig. 3 protocol (our concrete choices; the paper leaves them open, method.md 3.5).

    Two output channels (rows) of ``weight`` in block ``block`` are perturbed, each along a random
    Gaussian direction scaled to that row's norm; the axes are multiples ``alpha, beta`` in
    ``[-extent, extent]``. The loss is the block-output reconstruction error (sum over tokens of the
    squared error, averaged) of the quantized block against the FP block, on the FP block inputs of
    ``images``. The quantized block uses whatever quantization switches ``q_model`` has.
    """
    alphas = betas = _grid(extent, steps)
    q_blocks, f_blocks = _blocks(q_model), _blocks(fp_model)
    if not (isinstance(block, int) and 0 <= block < len(q_blocks)):
        raise ValueError(f"block must be in [0, {len(q_blocks) - 1}], got {block!r}")
    qb, fb = q_blocks[block], f_blocks[block]
    try:
        w = qb.get_parameter(weight)
    except AttributeError:
        raise ValueError(f"block {block} has no parameter {weight!r}") from None
    x, y = _block_io(fp_model, fb, images)
    gen = torch.Generator().manual_seed(seed)
    if channels is None:
        channels = tuple(torch.randperm(w.shape[0], generator=gen)[:2].tolist())
    if not all(0 <= c < w.shape[0] for c in channels) or len(set(channels)) != 2:
        raise ValueError(f"channels must be two distinct rows in [0, {w.shape[0] - 1}], got {channels!r}")
    dirs = []
    for c in channels:
        d = torch.zeros_like(w)
        g = torch.randn(w.shape[1:], generator=gen).to(w.device, w.dtype)
        d[c] = g / g.norm() * w[c].detach().norm()
        dirs.append(d)
    tokens_last = x.dim() == 4
    was_training = qb.training
    qb.eval()
    try:
        Z = _walk_grid([w], [dirs[0]], [dirs[1]], alphas, betas, lambda: float(recon_loss(qb(x), y, tokens_last)))
    finally:
        qb.train(was_training)
    return Landscape(
        alphas,
        betas,
        Z,
        {"kind": "block", "block": block, "weight": weight, "channels": list(channels), "extent": extent, "seed": seed},
    )


def sos_study(
    fp_model: nn.Module,
    calib: torch.Tensor,
    images: torch.Tensor,
    bits: int = 4,
    block: int = 4,
    extent: float = 0.5,
    steps: int = 21,
    iters: int | None = None,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    model_steps: int | None = None,
    model_extent: float = 0.5,
    progress: bool = False,
    **quantize_kw: Any,
) -> tuple[dict[tuple[int, str, str], Landscape], dict[str, Landscape], Any]:
    """Every landscape of notebook 02 in one call.

    Block-local landscapes of block ``block`` (protocol of :func:`block_landscape`, on the FP block
    inputs of ``images``): the three Fig. 3 configurations calibrated on ``calib``, keyed
    ``(block, "calibrated", config)``, and the I&S-ViT model after each SOS stage, keyed
    ``(block, "stage1" | "stage2" | "stage3", "isvit")``. With ``eval_data = (x, y)`` also the
    whole-model cross-entropy landscapes (:func:`model_landscape`) of the FP and the final I&S-ViT
    model, keyed ``"FP"`` and ``"I&S-ViT"``. Returns ``(block_landscapes, model_landscapes, QuantResult)``.
    ``iters`` and ``quantize_kw`` go to :func:`isvit_viz.quantize` (method ``isvit``, W``bits``/A``bits``).
    """
    from ..calib.pipeline import quantize

    lands: dict[tuple[int, str, str], Landscape] = {}
    for key, q in fig3_models(fp_model, calib, bits=bits).items():
        lands[(block, "calibrated", key)] = block_landscape(q, fp_model, block, images, extent=extent, steps=steps)
    snaps: dict[str, nn.Module] = {}

    def keep(stage: str, m: nn.Module) -> None:
        if stage in ("stage1", "stage2", "stage3"):
            snaps[stage] = copy.deepcopy(m).eval()

    res = quantize(fp_model, "isvit", bits, bits, calib, iters=iters, callbacks=keep, progress=progress, **quantize_kw)
    for stage in ("stage1", "stage2", "stage3"):
        lands[(block, stage, "isvit")] = block_landscape(snaps.pop(stage), fp_model, block, images, extent=extent, steps=steps)
    whole: dict[str, Landscape] = {}
    if eval_data is not None:
        import torch.nn.functional as F
        from loss_landscapes.metrics import Loss

        metric = Loss(F.cross_entropy, *eval_data)
        for name, m in (("FP", fp_model), ("I&S-ViT", res.model)):
            whole[name] = model_landscape(m, metric, extent=model_extent, steps=model_steps or steps)
    return lands, whole, res
