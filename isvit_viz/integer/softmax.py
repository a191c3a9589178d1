"""Integer softmax by an exact exponential table (division-free option), for integer logits.

Choice (sota-2025.md section 7 lists I-ViT's Shiftmax and FQ-ViT's Log-Int-Softmax): with integer
codes for Q and K the logits are ``alpha * S`` with an integer ``S = Qz Kz^T`` and one real constant
``alpha = s_q s_k / sqrt(d)`` per layer. So ``exp(alpha * (S - max S))`` only ever takes the values
``exp(-alpha * D)`` for integers ``D >= 0``: one table ``E[D] = round(2^F exp(-alpha D))`` holds them
all, rounded once. It ends where the entry rounds to 0 (``D ~ (F + 1) ln 2 / alpha``: a few hundred to
a few thousand int entries at 3-4 bit Q/K). Shiftmax approximates ``exp`` by shifts (a few percent
error) and Log-Int-Softmax quantizes ``log2 p`` directly (no ``eta``), so neither fits SULQ's
``log2(p + eta)`` thresholds better than an exact table; the table is exact to ``2^-F`` per entry.

Output: probabilities in fixed point ``P = floor(2^F E / sum_row E)`` (int64; ``E * 2^F`` needs
``2F + 1`` bits, so this stage is int64). The threshold test of :mod:`.sulq_codes` can also run
division-free, comparing ``E * 2^F`` with ``T * sum_row E`` (see :func:`exceeds_thresholds`).
"""

from __future__ import annotations

import math

import torch

#: Largest table accepted (entries); beyond it lower ``frac_bits`` or use coarser Q/K scales.
MAX_TABLE = 1 << 20


def exp_table(alpha: float, frac_bits: int) -> torch.Tensor:
    """``E[D] = round_half_even(2^F exp(-alpha D))`` for ``D = 0, 1, ...`` up to and including the first 0.

    Args:
        alpha: real logit step per integer unit of ``S`` (> 0), e.g. ``s_q * s_k * head_dim**-0.5``.
        frac_bits: ``F`` (1..30), fractional bits of the table and of the probabilities.

    Returns:
        1-D int64 tensor, ``E[0] = 2^F``, non-increasing, last entry 0.
    """
    if not (isinstance(frac_bits, int) and 1 <= frac_bits <= 30):
        raise ValueError(f"frac_bits must be an int in [1, 30], got {frac_bits!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    n = math.ceil((frac_bits + 1) * math.log(2) / alpha) + 2  # exp(-alpha n) 2^F < 1/2 beyond this
    if n > MAX_TABLE:
        raise ValueError(f"exp table would need {n} entries (alpha={alpha:.3g}, frac_bits={frac_bits}) > {MAX_TABLE}")
    d = torch.arange(n, dtype=torch.float64)
    table = torch.round(torch.exp(-alpha * d) * 2.0**frac_bits).long()
    zero = int(torch.nonzero(table == 0)[0])
    return table[: zero + 1].clone()


def exp_numerators(s: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``E = table[min(max_row S - S, len - 1)]`` (int64), shape of ``s`` ([..., N] integer logits)."""
    if s.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"integer logits expected (int32/int64), got {s.dtype}")
    d = s.amax(-1, keepdim=True) - s  # >= 0, exact in the logits' integer type
    return table[d.clamp_max(table.numel() - 1).long()]


def integer_softmax(s: torch.Tensor, table: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Fixed-point softmax over the last axis: ``P = floor(2^F E / sum_row E)``, int64 in ``[0, 2^F]``.

    ``P / 2^F`` approximates ``softmax(alpha * s)`` with error below ``2^-F`` per entry plus the
    table's rounding (``<= 2^-F-1`` on each ``E``). Shape: ``s`` [..., N] -> [..., N].
    """
    e = exp_numerators(s, table)
    z = e.sum(-1, keepdim=True)  # >= 2^F: the row maximum contributes E[0] = 2^F
    return torch.div(e << frac_bits, z, rounding_mode="floor")


def exceeds_thresholds(e: torch.Tensor, z: torch.Tensor, thresholds: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Division-free count ``#{t : E 2^F >= t * Z}`` per entry (== ``searchsorted(T, P, right=True)``).

    Since ``t`` is an integer, ``E 2^F >= t Z  <=>  floor(E 2^F / Z) >= t``: the per-row products
    ``t * Z`` (one multiply per threshold and row) replace the per-entry division.
    Shapes: ``e`` [..., N], ``z`` [..., 1], ``thresholds`` [m] -> int64 [..., N].
    """
    lhs = (e << frac_bits).unsqueeze(-1)  # [..., N, 1]
    rhs = z.unsqueeze(-1) * thresholds  # [..., 1, m]
    return (lhs >= rhs).sum(-1)
