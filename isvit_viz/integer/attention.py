"""Integer execution of the attention core ``softmax(Q K^T / sqrt(d)) V`` with SULQ on the probabilities.

Steps (all per head; shapes [B, H, N, d] for Q, K, V and [B, H, N, N] for the attention map):

1. Codes: ``Qz = codes(Q) - z_q`` etc., exactly the fake-quant quantizers' codes (int32).
2. Logits: ``S = Qz Kz^T`` in int32 (``|S| <= d * max|Qz| * max|Kz|``, checked).
3. Softmax: the exp-table integer softmax (:mod:`.softmax`), probabilities ``P`` in F-bit fixed point.
4. Exponents: SULQ's exponents of ``P`` by the threshold table (:mod:`.sulq_codes`).
5. ``P V``: ``acc = sum_j Vz_j << (e_ij - e_lo)`` (:mod:`.shift`, int32 when the worst case fits),
   then ``R = (acc << G) - eta_fixed * colsum(Vz)`` (int64: ``acc`` bits + G) with ``colsum`` shared by
   all query rows of a head.
6. One rescale: ``out = R * M_v * 2^-(shift_v + G - e_lo)`` (:func:`.fixed_point.rescale`).

``softmax="float"`` replaces steps 2-4 by the fake-quant path's own float32 logits, float32 softmax
and ``SULQ.encode``: the exponents are then those of fake-quant by construction, which isolates the
integer ``P V`` for bit-exactness checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.sulq import SULQ
from .export import IntegerAttentionParams
from .fixed_point import rescale, uniform_codes
from .shift import accumulator_dtype, shift_accumulate
from .softmax import integer_softmax
from .sulq_codes import fake_quant_exponents

SOFTMAX_MODES = ("integer", "float")


@dataclass
class IntegerParts:
    """Intermediates of one integer attention evaluation (for tests and reports).

    Attributes:
        qz / kz / vz: centred int32 codes [B, H, N, d].
        logits: int32 ``Qz Kz^T`` [B, H, N, N] (``None`` in float-softmax mode).
        p_fixed: int64 probabilities in F-bit fixed point (``None`` in float-softmax mode).
        exponents: int64 SULQ exponents [B, H, N, N].
        acc: shift-accumulator [B, H, N, d]; r: int64 ``(acc << G) - eta_fixed * colsum``.
        out: float32 output [B, H, N, d].
    """

    qz: torch.Tensor
    kz: torch.Tensor
    vz: torch.Tensor
    logits: torch.Tensor | None
    p_fixed: torch.Tensor | None
    exponents: torch.Tensor
    acc: torch.Tensor
    r: torch.Tensor
    out: torch.Tensor


def centered_codes(x: torch.Tensor, p) -> torch.Tensor:
    """``codes(x) - zero_point`` (int32) for :class:`~.export.UniformParams` ``p``."""
    return uniform_codes(x, p.scale.to(x.device), p.zero_point, p.qmax) - p.zero_point


def integer_logits(qz: torch.Tensor, kz: torch.Tensor) -> torch.Tensor:
    """``S = Qz Kz^T`` in int32 ([..., N, d] x [..., N, d] -> [..., N, N]); int64 if int32 could overflow."""
    bound = qz.shape[-1] * int(qz.abs().max()) * int(kz.abs().max()) if qz.numel() else 0
    dt = torch.int32 if bound < 2**31 else torch.int64
    return qz.to(dt) @ kz.to(dt).transpose(-2, -1)


def float_softmax_exponents(qz: torch.Tensor, kz: torch.Tensor, params: IntegerAttentionParams, sulq: SULQ) -> torch.Tensor:
    """Exponents of the fake-quant path: float32 ``softmax(q_hat k_hat^T * scale)`` through ``sulq``."""
    qh = qz.float() * params.q.scale.to(qz.device)  # == (codes - z) * s, the fake-quant value
    kh = kz.float() * params.k.scale.to(kz.device)
    probs = (qh @ kh.transpose(-2, -1) * params.attn_scale).softmax(dim=-1)
    return fake_quant_exponents(sulq, probs, params.code_exponents)


def shift_pv(exponents: torch.Tensor, vz: torch.Tensor, params: IntegerAttentionParams) -> tuple[torch.Tensor, torch.Tensor]:
    """``(acc, R)``: the shift-accumulate and ``R = (acc << G) - eta_fixed * colsum(Vz)`` (int64).

    ``R * 2^(e_lo - G)`` is exactly ``sum_j (2^e_ij - eta_q) Vz_j`` with ``eta_q = params.eta_quantized``.
    """
    shifts = exponents - params.e_lo
    dt = accumulator_dtype(vz.shape[-2], params.v.max_abs_centered, params.max_shift)
    acc = shift_accumulate(shifts, vz, dtype=dt)
    colsum = vz.sum(-2, keepdim=True, dtype=torch.int64)  # [B, H, 1, d]: one per head, shared by all rows
    return acc, (acc.long() << params.eta_bits) - params.eta_fixed * colsum


def integer_attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: IntegerAttentionParams,
    softmax: str = "integer",
    sulq: SULQ | None = None,
    return_parts: bool = False,
) -> torch.Tensor | IntegerParts:
    """Integer attention core on float Q, K, V [B, H, N, d] (e.g. the fake-quant qkv output).

    Args:
        params: exported integer parameters of the block.
        softmax: ``"integer"`` (exp-table softmax + exponent table) or ``"float"`` (the fake-quant
            path's float32 softmax and ``sulq.encode``; needs ``sulq``).
        return_parts: return :class:`IntegerParts` instead of the output tensor.

    Returns:
        float32 [B, H, N, d] attention output (before the head merge and ``proj``).
    """
    if softmax not in SOFTMAX_MODES:
        raise ValueError(f"softmax must be one of {SOFTMAX_MODES}, got {softmax!r}")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one shape [B, H, N, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    qz, kz, vz = centered_codes(q, params.q), centered_codes(k, params.k), centered_codes(v, params.v)
    logits = p_fixed = None
    if softmax == "integer":
        logits = integer_logits(qz, kz)
        p_fixed = integer_softmax(logits, params.exp_table.to(q.device), params.frac_bits)
        exps = params.table.lookup(p_fixed)
    else:
        if sulq is None:
            raise ValueError("softmax='float' needs the block's SULQ quantizer (sulq=...)")
        exps = float_softmax_exponents(qz, kz, params, sulq)
    acc, r = shift_pv(exps, vz, params)
    out = rescale(r, params.out_multiplier, params.out_shift)
    if return_parts:
        return IntegerParts(qz, kz, vz, logits, p_fixed, exps, acc, r, out)
    return out
