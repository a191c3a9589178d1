"""Integer vs fake-quant vs FP attention: per-layer SQNR and end-to-end accuracy / agreement.

Per layer, every variant gets the *same* Q, K, V: the fake-quant ``qkv`` output on the block input
captured from the fake-quant model. So the comparison isolates the attention core (Q/K/V/P
quantization and the integer arithmetic):

* ``fp``: float32 ``softmax(q k^T * scale) v`` on the unquantized q, k, v;
* ``fake``: the block's fake-quant matmuls (``QuantMatMul`` with its quantizers);
* ``int``: :func:`~.attention.integer_attention_core` (integer softmax, shift-accumulate);
* ``int_fsm``: the same with the fake-quant float softmax (exponents identical to ``fake``);
* ``gemm``: the int8-GEMM variant (:func:`~.gemm.gemm_attention_core`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..evaluate import predict_logits, topk_accuracy
from .attention import integer_attention_core
from .export import IntegerAttentionParams, attention_blocks
from .gemm import gemm_attention_core, int8_frac_bits
from .module import use_integer_attention
from .sulq_codes import fake_quant_exponents


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """``10 log10(sum ref^2 / sum (x - ref)^2)`` in dB (``inf`` when identical)."""
    noise = float((x.double() - ref.double()).pow(2).sum())
    signal = float(ref.double().pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * torch.log10(torch.tensor(signal / noise)).item()


@torch.no_grad()
def capture_block_inputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input of every quantized attention block (name -> [B, N, C]) for one forward of ``images``."""
    store: dict[str, torch.Tensor] = {}
    hooks = [
        mod.register_forward_pre_hook(lambda _m, args, name=name: store.__setitem__(name, args[0].detach().clone()))
        for name, mod in attention_blocks(model)
    ]
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    return store


def block_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, N, d] of a (fake-quant) attention block on input ``x`` [B, N, C]."""
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


@torch.no_grad()
def attention_cores(attn: nn.Module, params: IntegerAttentionParams, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The five attention-core outputs (module docstring) for block input ``x``; each [B, H, N, d]."""
    q, k, v = block_qkv(attn, x)
    sulq = attn.matmul2.quantizer_a
    fp = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1) @ v
    fake = attn.matmul2((attn.matmul1(q, k.transpose(-2, -1)) * attn.scale).softmax(-1), v)
    return {
        "fp": fp,
        "fake": fake,
        "int": integer_attention_core(q, k, v, params),
        "int_fsm": integer_attention_core(q, k, v, params, softmax="float", sulq=sulq),
        "gemm": gemm_attention_core(q, k, v, params),
    }


def exact_pv_reference(exponents: torch.Tensor, vz: torch.Tensor, params: IntegerAttentionParams, n_keys: int) -> np.ndarray:
    """The fake-quant ``P V`` formula ``(2^e - eta_q) @ (Vz s_v)``, exact, rounded once (half up) to the
    output grid ``2^-K`` of :meth:`~.export.IntegerAttentionParams.output_rescale`: an int object array.

    ``y = (2^e - eta_q) @ Vz`` in float64 is exact (every partial sum is a multiple of ``2^(e_lo - G)``,
    below ``2^53`` of them; checked), so ``R = y 2^(G - e_lo)`` is an exact integer; ``R M_v`` and its
    rounding shift are then done in Python ints, which do not wrap (``R M_v`` exceeds int64 at W4/A4).
    Independent of the int64 fold of :func:`~.attention.eta_correction`.
    """
    y = (torch.exp2(exponents.double()) - params.eta_quantized) @ vz.double()
    r = y * 2.0 ** (params.eta_bits - params.e_lo)
    if not (bool((r == r.round()).all()) and float(r.abs().max()) < 2.0**53):
        raise ValueError("the float64 reference of P V is not exact (eta_bits too large for float64)")
    rs = params.output_rescale(n_keys)
    total = params.eta_bits + rs.shift
    big = np.asarray(r.long().cpu().numpy(), dtype=object) * rs.multiplier  # Python ints: no int64 wrap
    return (big + (1 << (total - 1))) >> total


@torch.no_grad()
def pv_bit_exact(attn: nn.Module, params: IntegerAttentionParams, x: torch.Tensor) -> bool:
    """Whether the integer ``P V`` (shift-accumulate, ``eta * colsum`` correction, integer rescale) equals
    :func:`exact_pv_reference` bit for bit, given the fake-quant exponents, and its float32 output is
    ``out_fixed * 2^-K`` rounded once to float32 (eta on the G-bit grid, as ``params.eta_quantized``)."""
    q, k, v = block_qkv(attn, x)
    parts = integer_attention_core(q, k, v, params, softmax="float", sulq=attn.matmul2.quantizer_a, return_parts=True)
    ref = exact_pv_reference(parts.exponents, parts.vz, params, v.shape[-2])
    same_fixed = bool(np.array_equal(ref, parts.out_fixed.cpu().numpy().astype(object)))
    same_float = torch.equal(parts.out, (parts.out_fixed.double() * 2.0**-parts.rescale.frac_bits).float())
    return same_fixed and same_float


@torch.no_grad()
def exponent_agreement(attn: nn.Module, params: IntegerAttentionParams, x: torch.Tensor) -> dict[str, float]:
    """How often the integer softmax's SULQ exponent differs from fake-quant's (share of entries), and
    the largest difference in exponent steps."""
    q, k, v = block_qkv(attn, x)
    parts = integer_attention_core(q, k, v, params, return_parts=True)
    fake = (attn.matmul1(q, k.transpose(-2, -1)) * attn.scale).softmax(-1)
    ref = fake_quant_exponents(attn.matmul2.quantizer_a, fake, params.code_exponents)
    diff = (parts.exponents - ref).abs()
    return {"exp_mismatch": float((diff > 0).double().mean()), "exp_max_diff": int(diff.max())}


@torch.no_grad()
def layer_report(model: nn.Module, images: torch.Tensor, params: dict[str, IntegerAttentionParams]) -> list[dict[str, Any]]:
    """One row per attention block: SQNR (dB) of each variant vs FP and of the integer ones vs fake-quant,
    exponent mismatch, table sizes, int8 fixed point, the integer rescale (output fraction bits K, its
    right shift, bits of the worst-case int64 product)."""
    inputs = capture_block_inputs(model, images)
    rows = []
    for name, attn in attention_blocks(model):
        p = params[name]
        out = attention_cores(attn, p, inputs[name])
        row: dict[str, Any] = {"layer": name}
        for key in ("fake", "int", "int_fsm", "gemm"):
            row[f"sqnr_{key}_vs_fp"] = sqnr_db(out["fp"], out[key])
        for key in ("int", "int_fsm", "gemm"):
            row[f"sqnr_{key}_vs_fake"] = sqnr_db(out["fake"], out[key])
        row.update(exponent_agreement(attn, p, inputs[name]))
        row["pv_bit_exact"] = pv_bit_exact(attn, p, inputs[name])
        rs = p.output_rescale(int(inputs[name].shape[1]))
        row.update({"eta": p.eta, "frac_bits": p.frac_bits, "exp_table_len": int(p.exp_table.numel()),
                    "n_exponents": int(p.exponents.numel()), "e_lo": p.e_lo, "int8_frac_bits": int8_frac_bits(p),
                    "out_frac_bits": rs.frac_bits, "rescale_shift": rs.shift,
                    "rescale_product_bits": rs.product_bound.bit_length()})  # fmt: skip
        rows.append(row)
    return rows


def logit_metrics(fp_logits: torch.Tensor, labels: torch.Tensor, q_logits: torch.Tensor) -> dict[str, float]:
    """``q_top1``, ``agree_top1`` (top-1 equal to FP's) and ``kl_to_fp`` (mean KL(FP || q), nats), as
    :func:`isvit_viz.evaluate.compare_to_fp` defines them."""
    p_log, q_log = torch.log_softmax(fp_logits.double(), 1), torch.log_softmax(q_logits.double(), 1)
    return {
        "q_top1": topk_accuracy(q_logits, labels, 1),
        "agree_top1": float((fp_logits.argmax(1) == q_logits.argmax(1)).double().mean()),
        "kl_to_fp": float((p_log.exp() * (p_log - q_log)).sum(1).mean()),
    }


@torch.no_grad()
def end_to_end(
    fp_model: nn.Module, qmodel: nn.Module, loader: Iterable, variants: Iterable[str] = ("shift",), progress: bool = False
) -> dict[str, Any]:
    """Top-1 and agreement of the fake-quant model and of the same model with integer attention in every
    block (one entry per variant: ``"shift"``, ``"gemm"``), all against the FP model on ``loader``.

    Returns ``{"fp_top1", "n", "fake": {...}, "int_<variant>": {..., "agree_with_fake"}}``; each entry
    holds ``q_top1``, ``agree_top1`` and ``kl_to_fp`` (:func:`logit_metrics`).
    """
    batches = list(loader)
    fp_logits, labels = predict_logits(fp_model, batches, progress=progress, desc="eval fp")
    fake_logits, _ = predict_logits(qmodel, batches, progress=progress, desc="eval fake-quant")
    out: dict[str, Any] = {"fp_top1": topk_accuracy(fp_logits, labels, 1), "n": int(labels.numel()),
                           "fake": logit_metrics(fp_logits, labels, fake_logits)}  # fmt: skip
    for variant in variants:
        with use_integer_attention(qmodel, variant=variant) as imodel:
            int_logits, _ = predict_logits(imodel, batches, progress=progress, desc=f"eval int {variant}")
        res = logit_metrics(fp_logits, labels, int_logits)
        res["agree_with_fake"] = float((int_logits.argmax(1) == fake_logits.argmax(1)).double().mean())
        out[f"int_{variant}"] = res
    return out
