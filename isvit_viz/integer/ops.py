"""Operation counts of the attention core: fp32, integer shift-and-accumulate, integer int8 GEMM.

Counts are per head and image for N tokens and head dimension d (scalar operations; a multiply-add
counts as one ``mul`` and one ``add``). The integer softmax is counted in its division form (one
integer division per probability); its division-free form trades those for ``m`` multiplies per row
and ``m`` comparisons per entry (``m`` = number of exponent thresholds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

OPS = ("mul", "shift", "add", "exp", "div", "lookup", "compare")
VARIANTS = ("fp32", "int_shift", "int8_gemm")


def attention_op_counts(n_tokens: int, head_dim: int, n_thresholds: int) -> dict[str, dict[str, int]]:
    """``{variant: {op: count}}`` for one head of one image.

    fp32: ``Q K^T`` (N^2 d mul + add), softmax (N^2 exp, N^2 div, max/sum N^2 add each), ``P V``.
    int_shift: integer ``Q K^T``; softmax = N^2 subtract + N^2 table lookups + N^2 row-sum adds + N^2
    divisions; exponents by binary search over the thresholds; ``P V`` = N^2 d shifts + N^2 d adds;
    correction ``eta * colsum(V)``: N d adds (column sum) + d multiplies + d shifts (``ceil(. / 2^G)``);
    integer rescale: N d multiplies (``acc * M``) + N d subtracts (the correction) + N d adds and N d
    shifts (round half up). int8_gemm: the same up to the exponents, then one lookup per entry
    (exponent -> int8 level), an ordinary GEMM (N^2 d mul + add) and the rescale (N d mul, add, shift).
    """
    for name, val in (("n_tokens", n_tokens), ("head_dim", head_dim), ("n_thresholds", n_thresholds)):
        if isinstance(val, bool) or not isinstance(val, int) or val < (0 if name == "n_thresholds" else 1):
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    n2, n2d, nd = n_tokens**2, n_tokens**2 * head_dim, n_tokens * head_dim
    search = math.ceil(math.log2(n_thresholds + 1)) if n_thresholds else 0
    qk = {"mul": n2d, "add": n2d}
    int_softmax = {"add": 2 * n2, "lookup": 2 * n2, "div": n2, "compare": n2 * search}  # (max - S, row sum), (exp, exponent)
    fp = {"mul": 2 * n2d, "add": 2 * n2d + 2 * n2, "exp": n2, "div": n2, "shift": 0, "lookup": 0, "compare": n2}
    shift = {"mul": qk["mul"] + head_dim + nd, "shift": n2d + head_dim + nd, "add": qk["add"] + int_softmax["add"] + n2 + n2d + 3 * nd,
             "exp": 0, "div": n2, "lookup": int_softmax["lookup"], "compare": int_softmax["compare"] + n2}  # fmt: skip
    gemm = {"mul": 2 * n2d + nd, "shift": nd, "add": qk["add"] + int_softmax["add"] + n2d + nd, "exp": 0, "div": n2,
            "lookup": int_softmax["lookup"] + n2, "compare": int_softmax["compare"] + n2}  # fmt: skip
    # the "+ n2" compares of fp32 / integer are the row max; "+ n2" adds of int_shift: e - e_lo
    return {v: {op: int(c.get(op, 0)) for op in OPS} for v, c in (("fp32", fp), ("int_shift", shift), ("int8_gemm", gemm))}


def model_op_counts(params: Mapping[str, object], n_tokens: int) -> dict[str, dict[str, int]]:
    """Sum of :func:`attention_op_counts` over every block and head of a model, per image.

    ``params``: block name -> :class:`~.export.IntegerAttentionParams` (uses heads, head_dim, thresholds).
    """
    total = {v: dict.fromkeys(OPS, 0) for v in VARIANTS}
    for p in params.values():
        counts = attention_op_counts(n_tokens, p.head_dim, int(p.thresholds.numel()))
        for v in VARIANTS:
            for op in OPS:
                total[v][op] += p.num_heads * counts[v][op]
    return total


def multiplies_replaced(counts: Mapping[str, Mapping[str, int]]) -> int:
    """Multiplies the shift path removes relative to fp32 (the ``P V`` products)."""
    return counts["fp32"]["mul"] - counts["int_shift"]["mul"]


def pv_shifts(params: Mapping[str, object], n_tokens: int) -> int:
    """Multiplies of ``P V`` that become shifts, per image: ``sum over blocks of heads * N^2 * d``."""
    return sum(p.num_heads * n_tokens**2 * p.head_dim for p in params.values())
