"""CPU time of the attention variants, measured side by side (round-robin; minimum and median of repeats).

PyTorch has no fused shift-and-accumulate kernel: :func:`~.shift.shift_accumulate` runs N
element-wise shift + add passes over [B, H, N, d] tensors, while float and int8 GEMMs use vectorised
BLAS / oneDNN kernels. So on a CPU the shift path is expected to be *slower*; the saving the paper
argues for (a shifter and an adder instead of a multiplier) needs a dedicated datapath.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .attention import centered_codes, integer_attention_core, integer_logits, pv_output, shift_pv
from .compare import block_qkv
from .export import IntegerAttentionParams
from .fixed_point import rescale
from .gemm import eta_at, fixed_point_p, gemm_attention_core, int8_frac_bits, int8_gemm
from .softmax import integer_softmax


def time_side_by_side(fns: dict[str, Callable[[], object]], repeats: int = 21, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Seconds per call of each function, calls interleaved round-robin: ``{name: {"min_s", "median_s"}}``.

    On a shared machine the minimum is the robust estimate of the intrinsic cost (other load only
    ever adds time); the median shows the typical call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: {"min_s": min(v), "median_s": statistics.median(v)} for k, v in times.items()}


@torch.no_grad()
def time_attention(attn: nn.Module, params: IntegerAttentionParams, x: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Seconds per call on block input ``x`` [B, N, C] (same Q, K, V for all):

    * ``core_*``: the whole attention core: ``fp32`` (float matmul, softmax, matmul), ``fake_quant``
      (the block's quantizers + float matmuls), ``int_shift`` (integer softmax + shift-accumulate),
      ``int8_gemm`` (integer softmax + int8 GEMM);
    * ``qk_*`` / ``softmax_*``: the first two stages alone (``int32`` matmul of the codes; the
      exp-table softmax with its int64 division plus the exponent lookup vs float32 softmax);
    * ``pv_*``: only ``P V`` given P: ``fp32`` float matmul, ``shift`` (shift-accumulate, then the
      ``eta * colsum`` correction and the integer rescale to the output fixed point), ``int8_gemm``
      (``torch._int_mm``, then the same integer rescale).
    """
    q, k, v = block_qkv(attn, x)
    probs = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    parts = integer_attention_core(q, k, v, params, return_parts=True)
    f8 = int8_frac_bits(params)
    p8 = fixed_point_p(parts.exponents, f8, eta_at(params, f8)).to(torch.int8)
    vz = centered_codes(v, params.v)
    logits = q @ k.transpose(-2, -1) * attn.scale
    table = params.table
    n_keys = v.shape[-2]
    k_out = params.output_rescale(n_keys).frac_bits
    fns = {
        "core_fp32": lambda: (q @ k.transpose(-2, -1) * attn.scale).softmax(-1) @ v,
        "core_fake_quant": lambda: attn.matmul2((attn.matmul1(q, k.transpose(-2, -1)) * attn.scale).softmax(-1), v),
        "core_int_shift": lambda: integer_attention_core(q, k, v, params),
        "core_int8_gemm": lambda: gemm_attention_core(q, k, v, params),
        "qk_fp32": lambda: q @ k.transpose(-2, -1),
        "qk_int32": lambda: integer_logits(parts.qz, parts.kz),
        "softmax_fp32": lambda: logits.softmax(-1),
        "softmax_int": lambda: table.lookup(integer_softmax(parts.logits, params.exp_table, params.frac_bits)),
        "pv_fp32": lambda: probs @ v,
        "pv_shift": lambda: pv_output(*shift_pv(parts.exponents, vz, params), params, n_keys),
        "pv_int8_gemm": lambda: rescale(int8_gemm(p8, vz), params.v.multiplier, params.v.shift + f8 - k_out),
    }
    return time_side_by_side(fns, repeats=repeats)
