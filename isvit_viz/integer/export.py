"""Exported integer parameters of a quantized attention block, and saving them with ``save_quantized``.

Everything the integer path needs, as integers: Q/K/V scales as multiplier + shift and integer
zero-points, the exponential table of the integer softmax, the SULQ threshold/exponent table, eta in
fixed point and the output rescale as multiplier + shift (:meth:`IntegerAttentionParams.output_rescale`,
derived from these for a given number of tokens). The float ``attn_scale``, ``eta`` and the
per-code exponents are kept for reference (the float-softmax mode and reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quant.modules import QuantAttention, QuantWindowAttention
from ..quant.sulq import SULQ
from ..quant.uniform import UniformQuantizer
from .fixed_point import FLOAT64_MANTISSA_BITS, from_multiplier_shift, round_half_even_shift, scale_tensor, to_multiplier_shift
from .softmax import exp_table
from .sulq_codes import ExponentTable, code_exponents, exponent_table

#: Key of the optional field that :func:`isvit_viz.save_quantized` writes (absent in older files).
FIELD = "integer_attention"
#: Default fractional bits of eta below the smallest level 2^e_lo.
DEFAULT_ETA_BITS = 16


@dataclass(frozen=True)
class UniformParams:
    """A per-tensor uniform quantizer as integers: ``scale = multiplier * 2^-shift`` (exact float32)."""

    multiplier: int
    shift: int
    zero_point: int
    qmax: int

    @property
    def scale(self) -> torch.Tensor:
        """0-d float32 scale, bit-identical to the calibrated one."""
        return scale_tensor(self.multiplier, self.shift)

    @property
    def max_abs_centered(self) -> int:
        """Largest ``|code - zero_point|``."""
        return max(self.zero_point, self.qmax - self.zero_point)

    @classmethod
    def from_quantizer(cls, q: Any, role: str) -> UniformParams:
        if not isinstance(q, UniformQuantizer):
            raise ValueError(f"{role}: integer attention needs a UniformQuantizer, got {type(q).__name__}")
        if not q.is_calibrated:
            raise ValueError(f"{role}: quantizer is not calibrated")
        if q.scale.numel() != 1:
            raise ValueError(
                f"{role}: per-channel quantizer (scale shape {tuple(q.scale.shape)}); integer attention needs per-tensor"
            )
        if not q.has_integer_zero_point:
            raise ValueError(f"{role}: fractional zero-point {float(q.zero_point)!r}; integer codes need an integer zero-point")
        m, sh = to_multiplier_shift(float(q.scale))
        return cls(multiplier=m, shift=sh, zero_point=int(q.zero_point), qmax=q.qmax)


@dataclass(frozen=True)
class OutputRescale:
    """Constants of the shift path's one final rescale (:meth:`IntegerAttentionParams.output_rescale`).

    ``out_fixed = round_half_up((acc * multiplier - correction) / 2^shift)`` with the per-head
    ``correction = ceil(eta_multiplier * colsum(Vz) / 2^eta_bits)``, and ``out = out_fixed * 2^-frac_bits``.
    For ``shift >= 1`` this is exactly one round-half-up of ``R M_v 2^-(G + shift)`` with the exact
    ``R = (acc << G) - eta_fixed colsum(Vz)`` (see :func:`~.attention.eta_correction`), without ever
    forming ``R`` (up to 25 + G bits here) or ``R M_v`` (beyond int64 at W4/A4).

    Attributes:
        multiplier: ``M_v`` (V's scale is ``M_v 2^-v.shift``).
        eta_multiplier: ``eta_fixed * M_v`` (one integer per layer).
        eta_bits: G.
        shift: the rounding right shift, ``>= 1``.
        frac_bits: K, fraction bits of the output (``v.shift - e_lo - shift``).
        acc_bound / correction_bound / product_bound: worst-case ``|acc|``, ``|correction|`` and
            ``|acc * multiplier - correction|`` (int64: ``product_bound < 2^62``).
    """

    multiplier: int
    eta_multiplier: int
    eta_bits: int
    shift: int
    frac_bits: int
    acc_bound: int
    correction_bound: int
    product_bound: int


@dataclass(frozen=True)
class IntegerAttentionParams:
    """Integer parameters of one attention block (see the module docstring).

    Attributes:
        num_heads / head_dim: block geometry.
        attn_scale: timm's ``head_dim ** -0.5`` (float; inside ``alpha`` and the exp table).
        q / k / v: per-tensor uniform quantizers of Q, K (unscaled, as the official code) and V.
        frac_bits: F, fixed point of the exp table and of the probabilities.
        exp_table: int64, ``round(2^F exp(-alpha D))`` for ``D = 0..``, last entry 0.
        thresholds / exponents: the SULQ exponent table (:class:`~.sulq_codes.ExponentTable`).
        code_exponents: exponent of every SULQ code (reference; the float-softmax mode).
        eta: SULQ's float32 shift; eta_bits: G; eta_fixed: ``round(eta * 2^(G - e_lo))``.
        sulq_bits / sulq_mode: the SULQ quantizer's settings (reference).
    """

    num_heads: int
    head_dim: int
    attn_scale: float
    q: UniformParams
    k: UniformParams
    v: UniformParams
    frac_bits: int
    exp_table: torch.Tensor
    thresholds: torch.Tensor
    exponents: torch.Tensor
    code_exponents: torch.Tensor
    eta: float
    eta_bits: int
    eta_fixed: int
    sulq_bits: int
    sulq_mode: str

    # ------------------------------------------------------------------ derived quantities
    @property
    def alpha(self) -> float:
        """Real logit per integer unit of ``S = Qz Kz^T``: ``s_q s_k attn_scale`` (float64)."""
        return float(self.q.scale) * float(self.k.scale) * self.attn_scale

    @property
    def e_lo(self) -> int:
        """Smallest exponent the table outputs; shifts are ``e - e_lo``."""
        return int(self.exponents[0])

    @property
    def max_shift(self) -> int:
        return int(self.exponents[-1]) - self.e_lo

    @property
    def eta_quantized(self) -> float:
        """The eta the integer path uses: ``eta_fixed * 2^(e_lo - G)`` (exact float64)."""
        return math.ldexp(float(self.eta_fixed), self.e_lo - self.eta_bits)

    def output_rescale(self, n_keys: int) -> OutputRescale:
        """Integer constants of the one final rescale of the shift path for ``n_keys`` keys.

        The output fixed point is the finest whose worst case (any exponents in range, any V codes)
        stays within ``2^53`` (int64, exact in float64; see :func:`~.fixed_point.fixed_to_float32_output`):
        with the worst-case ``|R| <= N max|Vz| (2^(max_shift + G) + eta_fixed)`` of
        ``R = (acc << G) - eta_fixed colsum``, the shift is the smallest ``S >= 1`` with
        ``|R| M_v < 2^(G + 53 + S)`` (``S = 1``, ``K`` = 24-39 on the embedded ViT at 50 tokens).

        Raises:
            ValueError: ``n_keys < 1``, or the worst-case product ``|acc M_v - correction|`` or eta's
                term ``|eta_fixed M_v colsum|`` not below ``2^62`` (int64 with headroom for the rounding add).
        """
        if isinstance(n_keys, bool) or not isinstance(n_keys, int) or n_keys < 1:
            raise ValueError(f"n_keys must be a positive int, got {n_keys!r}")
        g, m, vmax = self.eta_bits, self.v.multiplier, self.v.max_abs_centered
        r_max = n_keys * vmax * ((1 << (self.max_shift + g)) + self.eta_fixed)
        shift = max(1, (r_max * m).bit_length() - g - FLOAT64_MANTISSA_BITS)
        acc_max = n_keys * vmax << self.max_shift
        eta_term_max = self.eta_fixed * m * n_keys * vmax  # |eta_fixed M_v colsum|, formed before its shift
        correction_max = -(-eta_term_max >> g)  # ceil, as the correction itself
        product_max = acc_max * m + correction_max
        if max(product_max, eta_term_max) >= 2**62:
            raise ValueError(f"worst-case rescale terms reach {max(product_max, eta_term_max)} >= 2^62 for {n_keys} keys")
        return OutputRescale(multiplier=m, eta_multiplier=self.eta_fixed * m, eta_bits=g, shift=shift,
                             frac_bits=self.v.shift - self.e_lo - shift, acc_bound=acc_max,
                             correction_bound=correction_max, product_bound=product_max)  # fmt: skip

    @property
    def table(self) -> ExponentTable:
        return ExponentTable(self.thresholds, self.exponents, self.frac_bits)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain ints, floats, strings and int64 tensors (loadable with ``torch.load(weights_only=True)``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            val = getattr(self, f.name)
            out[f.name] = {g.name: getattr(val, g.name) for g in fields(val)} if isinstance(val, UniformParams) else val
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IntegerAttentionParams:
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(f"integer attention parameters: expected keys {sorted(names)}, got {sorted(d)}")
        kw = dict(d)
        for role in ("q", "k", "v"):
            kw[role] = UniformParams(**kw[role])
        return cls(**kw)

    def equals(self, other: IntegerAttentionParams) -> bool:
        """Exact equality of every field (tensors by value)."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            same = torch.equal(a, b) and a.dtype == b.dtype if isinstance(a, torch.Tensor) else a == b
            if not same:
                return False
        return True


def export_attention(attn: nn.Module, frac_bits: int | None = None, eta_bits: int = DEFAULT_ETA_BITS) -> IntegerAttentionParams:
    """Integer parameters of a calibrated :class:`QuantAttention` whose post-softmax quantizer is SULQ.

    Args:
        attn: the quantized timm attention block.
        frac_bits: F (default :data:`~.sulq_codes.DEFAULT_FRAC_BITS` = 24, the largest for which
            ``P / 2^F`` is exact in float32).
        eta_bits: G, fractional bits of eta below ``2^e_lo`` (relative precision of eta ~ ``2^-G``).

    Raises:
        ValueError: for Swin window attention, a non-SULQ post-softmax quantizer, uncalibrated,
            per-channel or fractional-zero-point Q/K/V quantizers.
    """
    if isinstance(attn, QuantWindowAttention):
        raise ValueError("Swin window attention is not supported: its relative-position bias and masks are float")
    if not isinstance(attn, QuantAttention):
        raise ValueError(f"expected a QuantAttention (quantized timm ViT/DeiT attention), got {type(attn).__name__}")
    sulq = attn.matmul2.quantizer_a
    if not isinstance(sulq, SULQ):
        raise ValueError(f"the post-softmax quantizer is {type(sulq).__name__}; integer attention needs SULQ")
    if not sulq.is_calibrated:
        raise ValueError("the SULQ quantizer is not calibrated")
    if not (isinstance(eta_bits, int) and 0 <= eta_bits <= 30):
        raise ValueError(f"eta_bits must be an int in [0, 30], got {eta_bits!r}")
    qp = UniformParams.from_quantizer(attn.matmul1.quantizer_a, "Q (matmul1.quantizer_a)")
    kp = UniformParams.from_quantizer(attn.matmul1.quantizer_b, "K (matmul1.quantizer_b)")
    vp = UniformParams.from_quantizer(attn.matmul2.quantizer_b, "V (matmul2.quantizer_b)")
    table = exponent_table(sulq, frac_bits)
    alpha = from_multiplier_shift(qp.multiplier, qp.shift) * from_multiplier_shift(kp.multiplier, kp.shift) * float(attn.scale)
    eta = float(sulq.eta)
    e_lo = int(table.exponents[0])
    # eta * 2^(G - e_lo) is exact in float64 (a float32 times a power of two); round half to even
    m, sh = math.frexp(eta)
    eta_fixed = round_half_even_shift(int(m * 2**53), 53 - sh - eta_bits + e_lo)
    return IntegerAttentionParams(
        num_heads=int(attn.num_heads), head_dim=int(attn.head_dim), attn_scale=float(attn.scale), q=qp, k=kp, v=vp,
        frac_bits=table.frac_bits, exp_table=exp_table(alpha, table.frac_bits), thresholds=table.thresholds,
        exponents=table.exponents, code_exponents=code_exponents(sulq), eta=eta, eta_bits=eta_bits, eta_fixed=eta_fixed,
        sulq_bits=sulq.bits, sulq_mode=sulq.mode,
    )  # fmt: skip


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every quantized attention block, in forward order; rejects Swin."""
    blocks = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantWindowAttention):
            raise ValueError(f"{name}: Swin window attention is not supported by the integer path")
        if isinstance(mod, QuantAttention):
            blocks.append((name, mod))
    if not blocks:
        raise ValueError("no quantized attention block found: quantize the model first (isvit_viz.quantize)")
    return blocks


def export_model(
    model: nn.Module, frac_bits: int | None = None, eta_bits: int = DEFAULT_ETA_BITS
) -> dict[str, IntegerAttentionParams]:
    """:func:`export_attention` for every attention block, keyed by module name."""
    return {name: export_attention(mod, frac_bits, eta_bits) for name, mod in attention_blocks(model)}


def save_integer_quantized(
    result: Any, path: str | Path, params: dict[str, IntegerAttentionParams] | None = None, **export_kw: Any
) -> Path:
    """``save_quantized(result, path)`` plus the integer attention parameters in its optional field.

    ``params`` defaults to :func:`export_model` of ``result.model`` (``export_kw`` are passed on).
    """
    from ..serialization import save_quantized

    params = export_model(result.model, **export_kw) if params is None else params
    return save_quantized(result, path, integer_attention={name: p.to_dict() for name, p in params.items()})


def load_integer_params(path: str | Path) -> dict[str, IntegerAttentionParams]:
    """The integer attention parameters saved in a quantized-model file (``ValueError`` if none)."""
    from ..serialization import FORMAT

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantized model file not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an isvit_viz quantized model file")
    if FIELD not in payload:
        raise ValueError(f"{path} has no integer attention parameters (save it with save_integer_quantized)")
    return {name: IntegerAttentionParams.from_dict(d) for name, d in payload[FIELD].items()}
