"""Fixed-point helpers: real scales as integer multiplier + shift, uniform codes, the final rescale.

A float32 scale ``s`` is *exactly* ``M * 2^-shift`` with a 24-bit integer mantissa ``M``: exporting a
calibrated scale this way loses nothing, and decoding it gives back the same float32 bit pattern.

The final rescale is integer-only: an int64 product of the (int32) accumulator with ``M``, an
optional int64 correction in the product's units, and one rounding right shift, round half up (ties
toward ``+inf``, as TFLite's single-rounding ``MultiplyByQuantizedMultiplier``). Its result is an int64
fixed-point number with ``K`` fraction bits, kept within ``|x| <= 2^53`` so that it is exact in
float64; the hand-off to the next, fake-quant, layer is one round-to-nearest-even to float32
(:func:`fixed_to_float32_output`). A deployment would fold that layer's input scale into the multiplier
instead and emit its integer codes with the same :func:`rescale`.
"""

from __future__ import annotations

import math

import torch

#: Mantissa bits of a float32 (including the implicit leading one).
FLOAT32_MANTISSA_BITS = 24
#: Mantissa bits of a float64: integers up to ``2^53`` in magnitude are exact in float64.
FLOAT64_MANTISSA_BITS = 53
#: int64 values must stay below this in magnitude.
INT64_LIMIT = 2**63


def to_multiplier_shift(x: float | torch.Tensor) -> tuple[int, int]:
    """Write a positive float32 value as ``(M, shift)`` with ``x == M * 2^-shift`` exactly, ``0 < M < 2^24``.

    Raises:
        ValueError: if ``x`` is not positive, finite, or not a float32 value.
    """
    v = float(x)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"scale must be a positive finite number, got {x!r}")
    if float(torch.tensor(v, dtype=torch.float32)) != v:
        raise ValueError(f"scale {v!r} is not a float32 value; round it to float32 first")
    m, e = math.frexp(v)  # v = m * 2^e, 0.5 <= m < 1
    mult = int(m * 2**FLOAT32_MANTISSA_BITS)  # exact: the float32 mantissa has 24 bits
    shift = FLOAT32_MANTISSA_BITS - e
    while mult % 2 == 0:  # canonical form: odd multiplier
        mult //= 2
        shift -= 1
    return mult, shift


def from_multiplier_shift(multiplier: int, shift: int) -> float:
    """The real value ``multiplier * 2^-shift`` (a Python float, exact for ``|multiplier| < 2^53``)."""
    return math.ldexp(float(multiplier), -int(shift))


def scale_tensor(multiplier: int, shift: int) -> torch.Tensor:
    """0-d float32 tensor ``multiplier * 2^-shift`` (bit-identical to the exported float32 scale)."""
    return torch.tensor(from_multiplier_shift(multiplier, shift), dtype=torch.float32)


def uniform_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmax: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, 0, qmax)`` as int32, with the same float32 operations
    as :class:`isvit_viz.quant.UniformQuantizer` (so the codes equal ``quantizer.encode(x)`` bit for bit).

    Shapes: ``x`` any float tensor, ``scale`` 0-d float32; returns the shape of ``x``.
    """
    return torch.clamp(torch.round(x.float() / scale) + float(zero_point), 0, qmax).to(torch.int32)


def round_half_even_shift(x: int, right: int) -> int:
    """``round(x / 2^right)`` with ties to even, for Python ints (``right >= 0``)."""
    if right <= 0:
        return x << -right
    q, r = divmod(x, 1 << right)
    half = 1 << (right - 1)
    return q + (1 if r > half or (r == half and q % 2 == 1) else 0)


def round_half_up_shift(x: int, right: int) -> int:
    """``round(x / 2^right)`` with ties toward ``+inf`` (round half up), for Python ints.

    The reference of :func:`rounding_right_shift`: ``floor((x + 2^(right - 1)) / 2^right)``; a left
    shift (exact) for ``right <= 0``.
    """
    if right <= 0:
        return x << -right
    return (x + (1 << (right - 1))) >> right


def rounding_right_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """``round(x / 2^shift)``, ties toward ``+inf``: ``(x + 2^(shift - 1)) >> shift`` on an int64 tensor.

    Round half up is TFLite's single-rounding ``MultiplyByQuantizedMultiplier`` (add half, arithmetic
    shift): one add and one shift, and unlike round-half-even it needs no look at the discarded bits.
    ``>>`` on a negative int64 is arithmetic (floor), so e.g. ``-1.5 -> -1`` and ``-2.5 -> -2``.
    ``shift <= 0`` is an exact left shift. The caller keeps ``x + 2^(shift - 1)`` within int64.
    """
    if x.dtype != torch.int64:
        raise ValueError(f"x must be an int64 tensor, got {x.dtype}")
    if shift <= 0:
        return x << -shift
    return (x + (1 << (shift - 1))) >> shift


def rescale(acc: torch.Tensor, multiplier: int, shift: int, correction: torch.Tensor | None = None) -> torch.Tensor:
    """The one final rescale, in integers: ``round_half_up((acc * multiplier - correction) / 2^shift)`` (int64).

    ``acc`` (int32 or int64) is widened to int64 and multiplied by the integer ``multiplier``; the
    optional ``correction`` (int64, broadcast against ``acc``) is subtracted in that product's units;
    :func:`rounding_right_shift` rounds once. No float is involved. For a real scale ``s = M 2^-k``
    (:func:`to_multiplier_shift`) and output fraction bits ``K``, ``shift = k - K`` gives
    ``round(acc * s * 2^K)``.

    Raises:
        ValueError: non-integer inputs, or ``|acc| * |multiplier| + |correction| + 2^(shift-1)`` (from
            the actual maxima, in Python ints; times ``2^-shift`` for a left shift) not below ``2^63``:
            int64 would wrap.
    """
    if acc.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"acc must be an int32/int64 tensor, got {acc.dtype}")
    if correction is not None and correction.dtype != torch.int64:
        raise ValueError(f"correction must be an int64 tensor, got {correction.dtype}")
    bound = (int(acc.abs().max()) if acc.numel() else 0) * abs(int(multiplier))
    if correction is not None and correction.numel():
        bound += int(correction.abs().max())
    if bound + (1 << max(shift - 1, 0)) >= INT64_LIMIT or bound << max(-shift, 0) >= INT64_LIMIT:
        raise ValueError(f"acc * multiplier - correction reaches {bound} (shift {shift}): int64 would wrap")
    prod = acc.long() * int(multiplier)
    if correction is not None:
        prod = prod - correction
    return rounding_right_shift(prod, shift)


def fixed_to_float32_output(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """float32 of the fixed-point value ``x * 2^-frac_bits``, rounded once (to nearest, ties to even).

    ``x`` (int64, ``|x| <= 2^53``) is exact in float64, and so is its product with the power of two;
    the cast to float32 is then the only rounding. Why not a grid coarse enough to be exact in float32
    (``|x| <= 2^24``): a fixed grid is absolute, float32 is relative, and on the embedded ViT at W4/A4
    the ~2^-17 grid that fits 24 bits moved 1 % of the top-1 decisions away from fake-quant's (its error
    flips 4-bit ``proj`` input codes at their rounding boundaries); 2^-37..2^-39 keeps them at 99.9 %.

    Raises:
        ValueError: ``|x| > 2^53`` (the float64 step would round too).
    """
    if x.numel() and int(x.abs().max()) > 2**FLOAT64_MANTISSA_BITS:
        raise ValueError(f"|x| = {int(x.abs().max())} exceeds 2^53: the conversion would round twice")
    return (x.double() * math.ldexp(1.0, -int(frac_bits))).float()
