"""Integer execution of the attention core ``softmax(Q K^T / sqrt(d)) V`` with SULQ on the probabilities.

Steps (all per head; shapes [B, H, N, d] for Q, K, V and [B, H, N, N] for the attention map):

1. Codes: ``Qz = codes(Q) - z_q`` etc., exactly the fake-quant quantizers' codes (int32).
2. Logits: ``S = Qz Kz^T`` in int32 (``|S| <= d * max|Qz| * max|Kz|``, checked).
3. Softmax: the exp-table integer softmax (:mod:`.softmax`), probabilities ``P`` in F-bit fixed point.
4. Exponents: SULQ's exponents of ``P`` by the threshold table (:mod:`.sulq_codes`).
5. ``P V``: ``acc = sum_j Vz_j << (e_ij - e_lo)`` (:mod:`.shift`, int32 when the worst case fits) and
   ``colsum(Vz)`` (int32), one vector per head shared by all query rows. The exact result is
   ``R 2^(e_lo - G)`` with ``R = (acc << G) - eta_fixed * colsum``; ``R`` is never formed (it needs
   the accumulator's bits + G = 41 bits at W4/A4, and its worst case times ``M_v`` exceeds int64).
6. One rescale, integer only (:func:`.fixed_point.rescale`): the int64 product ``acc * M_v`` minus the
   per-head correction ``ceil(eta_fixed M_v colsum / 2^G)`` (int64, in the product's units), then one
   round-half-up right shift by ``S`` (:meth:`~.export.IntegerAttentionParams.output_rescale`). For
   ``S >= 1`` this equals ``round_half_up(R M_v / 2^(G + S))`` exactly (:func:`eta_correction`). The
   result, int64 in ``K`` fraction bits (24-39 here) with ``|out| <= 2^53``, is exact in float64; the hand-off to the
   fake-quant ``proj`` rounds it once to float32 (:func:`.fixed_point.fixed_to_float32_output`).

``softmax="float"`` replaces steps 2-4 by the fake-quant path's own float32 logits, float32 softmax
and ``SULQ.encode``: the exponents are then those of fake-quant by construction, which isolates the
integer ``P V`` for bit-exactness checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.sulq import SULQ
from .export import IntegerAttentionParams, OutputRescale
from .fixed_point import fixed_to_float32_output, rescale, uniform_codes
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
        acc: shift-accumulator [B, H, N, d] (int32 when the worst case fits).
        colsum: int32 ``colsum(Vz)`` [B, H, 1, d]; correction: int64 :func:`eta_correction` [B, H, 1, d].
        out_fixed: int64 rescaled output [B, H, N, d], ``|.| <= 2^53``, in ``rescale.frac_bits`` bits.
        out: float32 output, ``out_fixed * 2^-K`` rounded once to float32 [B, H, N, d].
        rescale: the constants used (:class:`~.export.OutputRescale`).
    """

    qz: torch.Tensor
    kz: torch.Tensor
    vz: torch.Tensor
    logits: torch.Tensor | None
    p_fixed: torch.Tensor | None
    exponents: torch.Tensor
    acc: torch.Tensor
    colsum: torch.Tensor
    correction: torch.Tensor
    out_fixed: torch.Tensor
    out: torch.Tensor
    rescale: OutputRescale


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
    """``(acc, colsum)``: the shift-accumulate ``sum_j Vz_j << (e_ij - e_lo)`` and ``colsum(Vz)`` (int32).

    ``(acc << G) - eta_fixed * colsum`` is exactly ``sum_j (2^e_ij - eta_q) Vz_j * 2^(G - e_lo)`` with
    ``eta_q = params.eta_quantized``; :func:`pv_output` rescales it without forming it. ``colsum`` is one
    vector per head ([B, H, 1, d]), shared by all query rows, and int32 whenever ``acc`` is
    (``|colsum| <= N max|Vz| <= max|acc|``).
    """
    shifts = exponents - params.e_lo
    dt = accumulator_dtype(vz.shape[-2], params.v.max_abs_centered, params.max_shift)
    acc = shift_accumulate(shifts, vz, dtype=dt)
    return acc, vz.sum(-2, keepdim=True, dtype=dt)


def eta_correction(colsum: torch.Tensor, rescale_c: OutputRescale) -> torch.Tensor:
    """``ceil(eta_fixed M_v colsum / 2^G)`` (int64, shape of ``colsum``): eta's term in ``acc * M_v`` units.

    Why the ceiling makes the rescale exact: write ``c = eta_fixed M_v colsum = ceil(c / 2^G) 2^G - r``
    with ``0 <= r < 2^G``. Then, for ``S >= 1``,
    ``floor((R M_v + 2^(G+S-1)) / 2^(G+S)) = floor(((acc M_v - ceil(c/2^G)) 2^G + r + 2^(G+S-1)) / 2^(G+S))
    = floor((acc M_v - ceil(c/2^G) + 2^(S-1)) / 2^S)``, since ``floor((r + 2^(G+S-1)) / 2^G) = 2^(S-1)``.
    So the round-half-up of the narrow product equals that of the exact ``R M_v``, which is G bits wider
    (and beyond int64 in the worst case at W4/A4).

    Width: int64. ``|c| <= eta_fixed M_v N max|Vz|`` (below 2^49 on the embedded ViT at W4/A4, asserted
    below 2^62 by :meth:`~.export.IntegerAttentionParams.output_rescale`); the result is bounded by
    ``rescale_c.correction_bound`` (below 2^33 there): it lives in the units of ``acc * M_v``, so it
    cannot be int32 even when ``acc`` is.
    """
    c = colsum.long() * rescale_c.eta_multiplier
    return -((-c) >> rescale_c.eta_bits)  # ceil(c / 2^G): >> floors, also for negative values


def pv_output(
    acc: torch.Tensor, colsum: torch.Tensor, params: IntegerAttentionParams, n_keys: int
) -> tuple[torch.Tensor, torch.Tensor, OutputRescale]:
    """``(out_fixed, correction, rescale)``: the one final integer rescale of the shift path.

    ``out_fixed = round_half_up((acc * M_v - eta_correction(colsum)) / 2^S)`` (int64, ``|.| <= 2^53``), the
    fixed-point output with ``rescale.frac_bits`` fraction bits, for ``n_keys`` keys (N). The worst-case widths are asserted by
    :meth:`~.export.IntegerAttentionParams.output_rescale`, the actual ones by :func:`.fixed_point.rescale`.
    """
    rs = params.output_rescale(int(n_keys))
    correction = eta_correction(colsum, rs)
    return rescale(acc, rs.multiplier, rs.shift, correction=correction), correction, rs


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
    acc, colsum = shift_pv(exps, vz, params)
    out_fixed, correction, rs = pv_output(acc, colsum, params, n_keys=vz.shape[-2])
    out = fixed_to_float32_output(out_fixed, rs.frac_bits)
    if return_parts:
        return IntegerParts(qz, kz, vz, logits, p_fixed, exps, acc, colsum, correction, out_fixed, out, rs)
    return out
