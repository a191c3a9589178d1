"""Swap integer attention into every block of a quantized ViT/DeiT (temporarily, restorable).

The integer module replaces only the attention core (``softmax(Q K^T) V`` with its Q/K/V/P
quantizers); ``qkv`` and ``proj`` remain the block's fake-quant linears, and the MLPs, norms and head
are untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..quant.modules import QuantAttention
from .attention import SOFTMAX_MODES, integer_attention_core
from .export import IntegerAttentionParams, attention_blocks, export_attention
from .gemm import gemm_attention_core

VARIANTS = ("shift", "gemm")


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, leaf, new)


class IntegerAttention(nn.Module):
    """A :class:`QuantAttention` whose core runs in integers from exported parameters.

    Args:
        base: the fake-quant block (its ``qkv``, ``proj``, norms are reused; its SULQ quantizer is
            used only by ``softmax="float"``).
        params: :class:`~.export.IntegerAttentionParams` (e.g. loaded from a file).
        variant: ``"shift"`` (shift-and-accumulate, the reference) or ``"gemm"`` (int8 GEMM).
        softmax: ``"integer"`` or ``"float"`` (see :func:`~.attention.integer_attention_core`).
    """

    def __init__(
        self, base: QuantAttention, params: IntegerAttentionParams, variant: str = "shift", softmax: str = "integer"
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if softmax not in SOFTMAX_MODES:
            raise ValueError(f"softmax must be one of {SOFTMAX_MODES}, got {softmax!r}")
        if (params.num_heads, params.head_dim) != (base.num_heads, base.head_dim):
            raise ValueError(
                f"parameters are for {params.num_heads} heads x {params.head_dim}, the block has {base.num_heads} x {base.head_dim}"
            )
        self.base, self.params, self.variant, self.softmax = base, params, variant, softmax

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Integer attention core on Q, K, V [B, H, N, d] -> float32 [B, H, N, d]."""
        sulq = self.base.matmul2.quantizer_a
        if self.variant == "gemm":
            return gemm_attention_core(q, k, v, self.params, softmax=self.softmax, sulq=sulq)
        return integer_attention_core(q, k, v, self.params, softmax=self.softmax, sulq=sulq)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("integer attention does not support attention masks")
        b = self.base
        B, N, _ = x.shape
        gate = b.gate(x).sigmoid() if b.gate is not None else None
        qkv = b.qkv(x).reshape(B, N, 3, b.num_heads, b.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = b.q_norm(q), b.k_norm(k)
        out = self.core(q, k, v).to(x.dtype)
        out = b.norm(out.transpose(1, 2).reshape(B, N, b.attn_dim))
        if gate is not None:
            out = out * gate
        return b.proj_drop(b.proj(out))


class IntegerSwap:
    """Handle of :func:`use_integer_attention`: ``model``, ``layers`` (name -> module), ``params``.

    Use as a context manager (restores on exit) or call :meth:`restore`.
    """

    def __init__(self, model: nn.Module, originals: dict[str, nn.Module], layers: dict[str, IntegerAttention]) -> None:
        self.model, self._originals, self.layers = model, originals, layers
        self.params = {name: layer.params for name, layer in layers.items()}

    def restore(self) -> nn.Module:
        """Put the fake-quant blocks back; returns the model."""
        for name, mod in self._originals.items():
            _set_submodule(self.model, name, mod)
        self._originals = {}
        return self.model

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def use_integer_attention(
    model: nn.Module,
    params: dict[str, IntegerAttentionParams] | None = None,
    variant: str = "shift",
    softmax: str = "integer",
    **export_kw: Any,
) -> IntegerSwap:
    """Replace every quantized attention block of ``model`` (in place) by :class:`IntegerAttention`.

    Args:
        model: a quantized ViT/DeiT (``isvit_viz.quantize(...).model``) with SULQ post-softmax
            quantizers and activation quantization on in its attention matmuls.
        params: exported parameters per block name (default: :func:`~.export.export_attention` of each
            block with ``export_kw``, e.g. ``frac_bits``, ``eta_bits``).
        variant / softmax: see :class:`IntegerAttention`.

    Returns:
        An :class:`IntegerSwap`; ``with use_integer_attention(m) as m: ...`` restores on exit.

    Raises:
        ValueError: no quantized attention, Swin, non-SULQ, quantization switched off, or ``params``
            missing a block.
    """
    blocks = attention_blocks(model)
    for name, mod in blocks:
        if not (mod.matmul1.act_quant and mod.matmul2.act_quant):
            raise ValueError(f"{name}: activation quantization is off in its matmuls; the integer path always quantizes")
    if params is not None:
        missing = sorted({n for n, _ in blocks} - set(params))
        if missing:
            raise ValueError(f"params has no entry for attention blocks {missing}")
    layers, originals = {}, {}
    for name, mod in blocks:
        p = params[name] if params is not None else export_attention(mod, **export_kw)
        layers[name] = IntegerAttention(mod, p, variant=variant, softmax=softmax)
    for name, mod in blocks:
        originals[name] = mod
        _set_submodule(model, name, layers[name])
    return IntegerSwap(model, originals, layers)
