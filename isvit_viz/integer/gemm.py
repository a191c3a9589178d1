"""``P V`` through an ordinary int8 GEMM with P in fixed point: the practical variant, and its exact
relation to the shift-and-accumulate path.

P in ``F``-bit fixed point: ``P_F(e) = round(2^(F + e)) - eta_F`` with ``eta_F = round(eta_q 2^F)``
(``eta_q`` the integer path's eta, :attr:`IntegerAttentionParams.eta_quantized`). Because every
level is a power of two minus one shared ``eta``:

* ``round(2^(F+e)) = 2^(F+e)`` exactly when ``e >= -F`` and 0 when ``e < -F`` (``2^(F+e) <= 1/2``
  rounds to even 0). Hence, exactly, with ``colsum`` over all keys::

      P_F @ Vz == shift_accumulate(e + F, Vz, keep=(e >= -F)) - eta_F * colsum(Vz)

* With ``F = G - e_lo`` no exponent is dropped and ``eta_F = eta_fixed``: the GEMM then equals the
  shift path's ``R`` bit for bit (``P`` needs ``G + e_max - e_lo + 1`` bits, more than int8).
* int8 allows only ``F + e_max <= 6`` (or 7 when ``eta_F >= 1``): levels below ``2^-F`` are dropped
  and eta is rounded to ``F`` bits. That is the price of the ordinary int8 GEMM.

V codes enter as int8: ``Vz`` itself when ``|Vz| <= 127`` (<= 7-bit V), else ``Vc - 128`` with the
zero-point term ``(128 - z) * rowsum(P)`` added back.
"""

from __future__ import annotations

import torch

from ..quant.sulq import SULQ
from .attention import centered_codes, float_softmax_exponents, integer_logits
from .export import IntegerAttentionParams
from .fixed_point import fixed_to_float32_output, rescale, round_half_even_shift
from .shift import shift_accumulate
from .softmax import integer_softmax

INT8_MIN, INT8_MAX = -128, 127


def eta_at(params: IntegerAttentionParams, frac_bits: int) -> int:
    """``round(eta_q * 2^F)`` (ties to even) from the exported ``eta_fixed``."""
    return round_half_even_shift(params.eta_fixed, params.eta_bits - params.e_lo - frac_bits)


def int8_frac_bits(params: IntegerAttentionParams) -> int:
    """Largest ``F`` whose levels ``2^(F+e) - eta_F`` all fit in int8."""
    e_max = int(params.exponents[-1])
    for f in range(30, -e_max - 1, -1):
        eta_f = eta_at(params, f)
        if (1 << (f + e_max)) - eta_f <= INT8_MAX and -eta_f >= INT8_MIN:
            return f
    raise ValueError(f"no fixed point fits SULQ's levels in int8 (e_max={e_max})")


def fixed_point_p(exponents: torch.Tensor, frac_bits: int, eta_f: int) -> torch.Tensor:
    """int64 ``round(2^(F+e)) - eta_F`` for integer exponents (``e < -F`` gives ``-eta_F``)."""
    kept = exponents >= -frac_bits
    pow2 = torch.ones_like(exponents) << (exponents + frac_bits).clamp_min(0)
    return torch.where(kept, pow2, 0) - eta_f


def shift_relation(exponents: torch.Tensor, vz: torch.Tensor, frac_bits: int, eta_f: int) -> torch.Tensor:
    """The shift-and-accumulate expression that ``P_F @ Vz`` equals exactly (int64 [..., N, d])."""
    kept = exponents >= -frac_bits
    acc = shift_accumulate((exponents + frac_bits).clamp_min(0), vz, dtype=torch.int64, keep=kept)
    return acc - eta_f * vz.sum(-2, keepdim=True, dtype=torch.int64)


def int8_gemm(p8: torch.Tensor, vz: torch.Tensor) -> torch.Tensor:
    """``P8 @ Vz`` with int8 operands and int32 accumulation (``torch._int_mm`` per matrix).

    Shapes: ``p8`` int8 [..., M, N], ``vz`` integer [..., N, d] (centred V codes) -> int32 [..., M, d].
    """
    if p8.dtype != torch.int8:
        raise ValueError(f"p8 must be int8, got {p8.dtype}")
    offset = 0
    if int(vz.abs().max()) > INT8_MAX:  # 8-bit V: shift codes into int8, add the offset back per row
        offset = int(vz.min()) + 128  # vz spans <= 255 values, so vz - offset lies in [-128, 127]
        v8 = (vz - offset).to(torch.int8)  # vz = v8 + offset
    else:
        v8 = vz.to(torch.int8)
    batch = torch.broadcast_shapes(p8.shape[:-2], v8.shape[:-2])
    a = p8.expand(*batch, *p8.shape[-2:]).reshape(-1, *p8.shape[-2:])
    b = v8.expand(*batch, *v8.shape[-2:]).reshape(-1, *v8.shape[-2:])
    out = torch.stack([torch._int_mm(a[i], b[i]) for i in range(a.shape[0])]).reshape(*batch, p8.shape[-2], v8.shape[-1])
    if offset:
        out = out + offset * p8.sum(-1, keepdim=True, dtype=torch.int32)
    return out


def gemm_attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: IntegerAttentionParams,
    frac_bits: int | None = None,
    softmax: str = "integer",
    sulq: SULQ | None = None,
) -> torch.Tensor:
    """The integer attention core with ``P V`` as an int8 GEMM (float32 [B, H, N, d] out).

    Steps 1-4 as :func:`~.attention.integer_attention_core`; then ``P8 = fixed_point_p(e, F, eta_F)``
    (int8, ``F`` default :func:`int8_frac_bits`), one int8 GEMM (int32 out), and one integer rescale
    by ``s_v 2^-F`` (:func:`~.fixed_point.rescale`: int64 product with ``M_v``, round-half-up shift) to
    the shift path's output fixed point. No correction term: eta is inside ``P8``.

    Raises:
        ValueError: ``P`` outside int8, or an output beyond ``2^53`` on that grid (the int8 levels'
            rounded eta can exceed the shift path's worst case). With ``K`` = 24-39 the shift is
            small or negative (an exact left shift at W4/A4, where the output is then rounded only at
            the float32 hand-off).
    """
    f = int8_frac_bits(params) if frac_bits is None else frac_bits
    qz, kz, vz = centered_codes(q, params.q), centered_codes(k, params.k), centered_codes(v, params.v)
    if softmax == "integer":
        p_fixed = integer_softmax(integer_logits(qz, kz), params.exp_table.to(q.device), params.frac_bits)
        exps = params.table.lookup(p_fixed)
    elif softmax == "float" and sulq is not None:
        exps = float_softmax_exponents(qz, kz, params, sulq)
    else:
        raise ValueError(f"softmax must be 'integer' or 'float' (with sulq=...), got {softmax!r}")
    p = fixed_point_p(exps, f, eta_at(params, f))
    if int(p.max()) > INT8_MAX or int(p.min()) < INT8_MIN:
        raise ValueError(f"frac_bits={f} puts P outside int8 ([{int(p.min())}, {int(p.max())}])")
    r = int8_gemm(p.to(torch.int8), vz)  # int32
    # the shift path's output fixed point K, so both variants hand over on one grid; r * 2^-F * s_v
    # = r M_v 2^-(v.shift + F), i.e. a right shift by v.shift + F - K (a left shift when negative)
    k = params.output_rescale(int(vz.shape[-2])).frac_bits
    out_fixed = rescale(r, params.v.multiplier, params.v.shift + f - k)
    return fixed_to_float32_output(out_fixed, k)
