"""Fixed-point helpers: real scales as integer multiplier + shift, uniform codes, the final rescale.

A float32 scale ``s`` is *exactly* ``M * 2^-shift`` with a 24-bit integer mantissa ``M``: exporting a
calibrated scale this way loses nothing, and decoding it gives back the same float32 bit pattern.
"""

from __future__ import annotations

import math

import torch

#: Mantissa bits of a float32 (including the implicit leading one).
FLOAT32_MANTISSA_BITS = 24


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


def rescale(acc: torch.Tensor, multiplier: int, shift: int) -> torch.Tensor:
    """The one final rescale: float32 of ``acc * multiplier * 2^-shift``.

    ``acc`` (int64, ``|acc| < 2^53``) converts exactly to float64; the product with the 24-bit
    multiplier is rounded once to float64, the power-of-two shift is exact, and the cast to float32
    rounds once more. A float64 evaluation of the same real product reproduces it bit for bit.
    """
    if acc.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"acc must be an int32/int64 tensor, got {acc.dtype}")
    if acc.numel() and int(acc.abs().max()) >= 2**53:
        raise ValueError("acc exceeds 2^53: the conversion to float64 would not be exact")
    return (acc.double() * float(multiplier) * math.ldexp(1.0, -int(shift))).float()


def round_half_even_shift(x: int, right: int) -> int:
    """``round(x / 2^right)`` with ties to even, for Python ints (``right >= 0``)."""
    if right <= 0:
        return x << -right
    q, r = divmod(x, 1 << right)
    half = 1 << (right - 1)
    return q + (1 if r > half or (r == half and q % 2 == 1) else 0)
