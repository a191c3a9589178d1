"""SULQ exponents straight from fixed-point probabilities, by a small threshold table.

SULQ de-quantizes code ``c`` to ``2^e(c) - eta`` with an integer exponent ``e(c)`` (method.md 1.3-1.4).
Composed with its encoder, ``p -> e(encode(p))`` is a non-decreasing step function of ``p`` in both
modes (paper mode's codes *decrease* with ``p``, but its exponents still increase). On fixed-point
probabilities ``P`` in ``[0, 2^F]`` it is therefore given exactly by the ``m`` values of ``P`` where the
exponent steps up (the thresholds) and the ``m + 1`` exponents: a table of about 20 integers.

The thresholds are found by bisection on the fake-quant quantizer itself (``SULQ.encode`` of the
float32 value ``P * 2^-F``), so the lookup reproduces fake-quant SULQ bit for bit on every ``P``;
:func:`count_mismatches` checks that exhaustively.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.sulq import SULQ

#: Default probability fixed point F: the largest for which every ``P / 2^F`` is exact in float32. The
#: exp table grows only linearly with F (``~(F + 1) ln 2 / alpha`` entries) and ``E * 2^F`` needs
#: ``2F + 1`` bits (int64). Measured on the embedded ViT at W3/A3: F = 16 / 20 / 24 moves 4e-4 / 4e-5 /
#: 3e-6 of the exponents away from fake-quant's.
DEFAULT_FRAC_BITS = 24


def code_exponents(q: SULQ) -> torch.Tensor:
    """Integer exponent of every SULQ code (int64 [n_codes]), checked against ``q.decode``.

    Recovered from the de-quantized levels and verified: ``exp2(e) - eta`` in float32 must give
    back ``q.decode(code)`` exactly, else ``ValueError``.
    """
    if not isinstance(q, SULQ):
        raise ValueError(f"expected a SULQ quantizer, got {type(q).__name__}")
    codes = torch.arange(q.n_codes, device=q.eta.device)
    levels = q.decode(codes)
    e = torch.round(torch.log2(levels.double() + float(q.eta))).float()
    if not torch.equal(torch.exp2(e) - q.eta, levels):
        raise ValueError("SULQ levels are not of the form 2^e - eta with integer e (cannot export exponents)")
    return e.long().cpu()


def fixed_to_float32(p_fixed: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """float32 of ``P * 2^-F`` (exact for ``F <= 24`` and ``0 <= P <= 2^F``)."""
    return (p_fixed.double() * 2.0**-frac_bits).float()


def fake_quant_exponents(q: SULQ, p: torch.Tensor, code_exps: torch.Tensor | None = None) -> torch.Tensor:
    """Exponents the fake-quant SULQ gives to float probabilities ``p`` (int64, shape of ``p``)."""
    ce = code_exponents(q) if code_exps is None else code_exps
    return ce.to(p.device)[q.encode(p)]


@dataclass(frozen=True)
class ExponentTable:
    """``exponent(P) = exponents[#{t in thresholds : t <= P}]`` for fixed-point ``P`` in ``[0, 2^F]``.

    Attributes:
        thresholds: int64 [m], strictly increasing values of ``P`` where the exponent steps up.
        exponents: int64 [m + 1], strictly increasing exponents (``exponents[0]`` at ``P = 0``).
        frac_bits: ``F``.
    """

    thresholds: torch.Tensor
    exponents: torch.Tensor
    frac_bits: int

    def lookup(self, p_fixed: torch.Tensor) -> torch.Tensor:
        """Exponents (int64, shape of ``p_fixed``) of integer probabilities ``P`` (int64)."""
        idx = torch.searchsorted(self.thresholds.to(p_fixed.device), p_fixed, right=True)
        return self.exponents.to(p_fixed.device)[idx]


def exponent_table(q: SULQ, frac_bits: int | None = None) -> ExponentTable:
    """Threshold table of a calibrated SULQ quantizer for probabilities in ``F``-bit fixed point.

    Each threshold is the smallest ``P`` whose fake-quant exponent reaches the next exponent value,
    found by bisection over ``[0, 2^F]`` (``F + 1`` vectorised steps). Exponent values that no ``P``
    attains are dropped. Assumes the fake-quant map is monotone; :func:`count_mismatches` verifies.
    """
    if not q.is_calibrated:
        raise ValueError("the SULQ quantizer is not calibrated")
    f = DEFAULT_FRAC_BITS if frac_bits is None else frac_bits
    if not (isinstance(f, int) and 1 <= f <= 30):
        raise ValueError(f"frac_bits must be an int in [1, 30], got {frac_bits!r}")
    ce = code_exponents(q)
    dev = q.eta.device

    def exp_at(p_fixed: torch.Tensor) -> torch.Tensor:
        return fake_quant_exponents(q, fixed_to_float32(p_fixed.to(dev), f), ce).cpu()

    top = 1 << f
    e0, e_top = (int(v) for v in exp_at(torch.tensor([0, top])))
    cands = torch.unique(ce)
    cands = cands[(cands > e0) & (cands <= e_top)]
    lo = torch.zeros_like(cands)  # exp_at(lo) < c
    hi = torch.full_like(cands, top)  # exp_at(hi) >= c
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        ge = exp_at(mid) >= cands
        hi, lo = torch.where(ge, mid, hi), torch.where(ge, lo, mid)
    hit = exp_at(hi) == cands  # an exponent skipped between two P values is never output
    return ExponentTable(thresholds=hi[hit].clone(), exponents=torch.cat([torch.tensor([e0]), cands[hit]]), frac_bits=f)


@torch.no_grad()
def count_mismatches(q: SULQ, table: ExponentTable, chunk: int = 1 << 20) -> int:
    """Number of ``P`` in ``[0, 2^F]`` where the table and the fake-quant SULQ disagree (exhaustive)."""
    ce = code_exponents(q)
    bad = 0
    for start in range(0, (1 << table.frac_bits) + 1, chunk):
        p = torch.arange(start, min(start + chunk, (1 << table.frac_bits) + 1), dtype=torch.int64)
        ref = fake_quant_exponents(q, fixed_to_float32(p, table.frac_bits).to(q.eta.device), ce).cpu()
        bad += int((table.lookup(p) != ref).sum())
    return bad
