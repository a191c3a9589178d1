"""``P V`` as shift-and-accumulate: ``acc[i] = sum_j V[j] << sh[i, j]``, no multiplies.

With SULQ levels ``2^e - eta`` and ``sh = e - e_lo >= 0``:
``sum_j (2^e_ij - eta) V_j = 2^e_lo * acc_i - eta * colsum(V)``, and ``colsum(V)`` is one vector per
head, shared by all query rows (method.md 1.8, sota-2025.md section 7).
"""

from __future__ import annotations

import torch

INT32_MAX = 2**31 - 1


def accumulator_dtype(n_keys: int, max_abs_v: int, max_shift: int) -> torch.dtype:
    """int32 when the worst case ``n_keys * max|V| * 2^max_shift`` fits in 31 bits, else int64.

    The bound holds for *any* exponents in range (not only those of a real softmax row), so an
    int32 accumulator chosen here can never wrap.
    """
    if min(n_keys, max_abs_v, max_shift) < 0:
        raise ValueError(f"n_keys, max_abs_v, max_shift must be >= 0, got {(n_keys, max_abs_v, max_shift)}")
    return torch.int32 if n_keys * max_abs_v * (1 << max_shift) <= INT32_MAX else torch.int64


def shift_accumulate(
    shifts: torch.Tensor, v: torch.Tensor, dtype: torch.dtype | None = None, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """``acc[..., i, :] = sum_j keep[..., i, j] * (v[..., j, :] << shifts[..., i, j])`` (shifts and adds only).

    Args:
        shifts: integer [..., M, N], each in ``[0, 62]``.
        v: integer [..., N, d] (signed codes; a left shift of a negative value is ``* 2^k``).
        dtype: accumulator type; default from :func:`accumulator_dtype` (int32 if it cannot overflow).
        keep: optional bool [..., M, N]; dropped terms add nothing (a gated adder; the int8 GEMM
            relation of :mod:`.gemm` uses it).

    Returns:
        [..., M, d] in ``dtype``. Loops over the N keys, so no [M, N, d] temporary is built.
    """
    if shifts.is_floating_point() or v.is_floating_point():
        raise ValueError(f"shifts and v must be integer tensors, got {shifts.dtype} and {v.dtype}")
    if shifts.shape[-1] != v.shape[-2]:
        raise ValueError(f"shifts [..., M, N] and v [..., N, d] disagree on N: {tuple(shifts.shape)} vs {tuple(v.shape)}")
    if shifts.numel() and (int(shifts.min()) < 0 or int(shifts.max()) > 62):
        raise ValueError(f"shifts must lie in [0, 62], got [{int(shifts.min())}, {int(shifts.max())}]")
    if dtype is None:
        max_v = int(v.abs().max()) if v.numel() else 0
        dtype = accumulator_dtype(v.shape[-2], max_v, int(shifts.max()) if shifts.numel() else 0)
    sh, vv = shifts.to(dtype), v.to(dtype)
    batch = torch.broadcast_shapes(sh.shape[:-2], vv.shape[:-2])
    acc = torch.zeros(*batch, sh.shape[-2], vv.shape[-1], dtype=dtype, device=v.device)
    for j in range(vv.shape[-2]):
        term = vv[..., j : j + 1, :] << sh[..., :, j : j + 1]  # [..., M, d]
        if keep is not None:
            term = torch.where(keep[..., :, j : j + 1], term, 0)  # a gate, not a multiply
        acc += term
    return acc
