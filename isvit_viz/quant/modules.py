"""Quant-aware replacements for timm layers; they share (not copy) the original parameters.

Each module carries its quantizers and two switches, ``weight_quant`` and ``act_quant``; with both off
it computes exactly what the timm layer computes.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .base import Quantizer


class QuantModule(nn.Module):
    """Mixin state: quantization switches, QDrop's drop probability and a reduced-precision matmul dtype.

    ``act_drop_prob`` (QDrop, reconstruction only): each element of every quantized activation of the
    module keeps its FP value with this probability, a fresh mask per forward (:func:`maybe_drop`).

    ``matmul_dtype=torch.bfloat16`` runs only the matrix products in bf16 (fp32 accumulation) while
    quantizers, norms and softmax stay fp32: a reconstruction speed option (AMX/tensor cores), off by
    default. Fake-quantized operands with <= 8-bit codes lose only their scale's low bits in bf16.
    """

    weight_quant: bool = False
    act_quant: bool = False
    act_drop_prob: float = 0.0
    matmul_dtype: torch.dtype | None = None


def maybe_drop(x_q: torch.Tensor, x_fp: torch.Tensor, p: float) -> torch.Tensor:
    """QDrop: each element takes its FP value ``x_fp`` with probability ``p``, else ``x_q``.

    ``p = 0`` returns ``x_q`` itself (no random draw), ``p = 1`` returns ``x_fp``. The mask comes from
    the global RNG (``torch.rand_like``), fresh on every call, as the QDrop code draws it.
    """
    if p <= 0:
        return x_q
    if p >= 1:
        return x_fp
    return torch.where(torch.rand_like(x_fp) < p, x_fp, x_q)


#: Fake-quantized weights of layers whose weights take no gradient (evaluation), by layer.
_FROZEN_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()
_SETTING_TYPES = (bool, int, float, str, tuple, type(None))


def _weight_state(layer: QuantLinear | QuantConv2d) -> tuple:
    """Everything the fake-quantized weight depends on: the weight and quantizer tensors (the objects
    themselves, so a replaced tensor never matches, their storage, dtype and in-place version
    counters) and the quantizer's plain settings (bits, mode, ...)."""
    q = layer.weight_quantizer
    tensors = (layer.weight, *q._buffers.values(), *q._parameters.values())
    settings = tuple((k, v) for k, v in vars(q).items() if not k.startswith("_") and isinstance(v, _SETTING_TYPES))
    # storage and version of each: ``module.to(...)`` swaps ``.data`` in place of the objects
    versions = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype) for t in tensors)
    return (q, tensors, versions, settings)


def _same_state(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and all(x is y for x, y in zip(a[1], b[1], strict=True)) and a[2:] == b[2:]


def _cacheable(layer: QuantLinear | QuantConv2d) -> bool:
    """Whether the weight quantizer's output may be reused: no gradient can reach the weight, and the
    quantizer is one of ours, called plainly. Hooks (analysis captures, sensitivity switches), a
    replaced ``forward`` (a bypass) or a pending calibration must see every call."""
    q = layer.weight_quantizer
    if torch.is_grad_enabled() and layer.weight.requires_grad:
        return False
    if not isinstance(q, Quantizer) or q.calibrate_on_next_forward or "forward" in vars(q):
        return False
    hooks = (q._forward_hooks, q._forward_pre_hooks, nn.modules.module._global_forward_hooks,
             nn.modules.module._global_forward_pre_hooks)  # fmt: skip
    return not any(hooks)


def _quantized_weight(layer: QuantLinear | QuantConv2d) -> torch.Tensor:
    """The layer's weight as its forward uses it: FP, fake-quantized, or AdaRound's soft rounding.

    ``layer.adaround`` (an :class:`isvit_viz.quant.adaround.AdaRound`) exists only while a
    reconstruction learns the rounding; it is not an attribute otherwise. When no gradient can reach
    the weight (evaluation), the fake-quantized weight is computed once and reused until the weight
    or its quantizer changes (:func:`_weight_state`), so an evaluation pass does not re-quantize every
    weight for every batch.
    """
    if not layer.weight_quant:
        return layer.weight
    ada = layer._modules.get("adaround")
    if ada is not None:
        return ada(layer.weight, layer.weight_quantizer)
    if not _cacheable(layer):
        return layer.weight_quantizer(layer.weight)
    state = _weight_state(layer)
    hit = _FROZEN_WEIGHTS.get(layer)
    if hit is not None and _same_state(hit[0], state):
        return hit[1]
    with torch.no_grad():
        w = layer.weight_quantizer(layer.weight)
    _FROZEN_WEIGHTS[layer] = (state, w)
    return w


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None:
        return F.linear(x, w, b)
    return F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)).to(x.dtype)


class QuantLinear(QuantModule):
    """``nn.Linear`` with an optional input quantizer and a weight quantizer.

    Shapes: input [..., in_features] -> output [..., out_features]. The weight quantizer is usually
    per output row (``channel_axis=0``).
    """

    def __init__(self, linear: nn.Linear, weight_quantizer: Quantizer, input_quantizer: Quantizer | None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def quantized_weight(self) -> torch.Tensor:
        return _quantized_weight(self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # noqa: ANN001
        # SOS reparameterization gives a bias-free Linear (qkv_bias=False) a bias (calib/reparam.py);
        # a freshly wrapped model has none yet, so create it from the saved tensor before loading.
        key = prefix + "bias"
        if self.bias is None and key in state_dict:  # a wrong shape is reported by the base class
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=self.weight.dtype, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant and self.input_quantizer is not None:
            x = maybe_drop(self.input_quantizer(x), x, self.act_drop_prob)
        return _linear(x, self.quantized_weight(), self.bias, self.matmul_dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w_quant={self.weight_quant}, a_quant={self.act_quant}"


class QuantConv2d(QuantModule):
    """Patch-embedding ``nn.Conv2d`` with a weight quantizer and an optional input-image quantizer.

    ``input_quantizer=None`` (default) keeps the image FP, as I&S-ViT; RepQ-ViT quantizes it (8 bits).
    """

    def __init__(self, conv: nn.Conv2d, weight_quantizer: Quantizer, input_quantizer: Quantizer | None = None) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero padding is supported, got padding_mode={conv.padding_mode!r}")
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def quantized_weight(self) -> torch.Tensor:
        return _quantized_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant and self.input_quantizer is not None:
            x = maybe_drop(self.input_quantizer(x), x, self.act_drop_prob)
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class QuantMatMul(QuantModule):
    """``a @ b`` with both operands fake-quantized (attention: Q @ K^T and P @ V)."""

    def __init__(self, quantizer_a: Quantizer, quantizer_b: Quantizer) -> None:
        super().__init__()
        self.quantizer_a = quantizer_a
        self.quantizer_b = quantizer_b

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.act_quant:
            p = self.act_drop_prob
            a, b = maybe_drop(self.quantizer_a(a), a, p), maybe_drop(self.quantizer_b(b), b, p)
        if self.matmul_dtype is not None:
            return (a.to(self.matmul_dtype) @ b.to(self.matmul_dtype)).to(a.dtype)
        return a @ b


class QuantAttention(nn.Module):
    """timm ``Attention`` (ViT/DeiT) with its two matmuls routed through :class:`QuantMatMul`.

    Reuses the timm module's sub-modules (``qkv``, ``proj``, norms, dropouts) so parameter names are
    unchanged. The post-softmax map passes through ``attn_drop`` (identity in eval), so forward hooks
    on ``attn_drop`` capture attention probabilities exactly as on the FP timm model.
    """

    def __init__(self, attn: nn.Module, matmul1: QuantMatMul, matmul2: QuantMatMul) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))
        self.gate = getattr(attn, "gate", None)
        self.matmul1, self.matmul2 = matmul1, matmul2

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        # Scale after matmul1, as the official code does for ViT/DeiT: Q and K are quantized unscaled.
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        if attn_mask is not None:
            attn = attn + attn_mask if attn_mask.dtype != torch.bool else attn.masked_fill(~attn_mask, float("-inf"))
        if is_causal:
            causal = torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1)
            attn = attn.masked_fill(causal, float("-inf"))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(nn.Module):
    """timm Swin ``WindowAttention`` with quantized matmuls; relative-position bias and masks stay FP."""

    def __init__(self, attn: nn.Module, matmul1: QuantMatMul, matmul2: QuantMatMul) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.window_size, self.window_area = attn.window_size, attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        for name in ("qkv", "attn_drop", "proj", "proj_drop", "softmax"):
            setattr(self, name, getattr(attn, name))
        self.matmul1, self.matmul2 = matmul1, matmul2

    def _get_rel_pos_bias(self) -> torch.Tensor:
        idx = self.relative_position_index.view(-1)
        bias = self.relative_position_bias_table[idx].view(self.window_area, self.window_area, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale  # timm semantics for Swin: scale before matmul1 (as the official code)
        attn = self.matmul1(q, k.transpose(-2, -1)) + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul2(attn, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, -1)))
