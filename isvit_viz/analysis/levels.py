"""What post-softmax quantizers' levels really are on attention maps: codes vs distinct vs used levels
across bit-widths, and SULQ's shift trade-off down to the task level.

* :func:`levels_vs_bits`: codes, distinct levels, used levels, MSE and the share on the lowest level
  for LQ, UQ, log-sqrt2, AdaLog and SULQ (paper and official mode) at 2-8 bits on given values.
  SULQ rounds its de-quantized exponent to an integer, so its distinct levels are bounded by the
  exponent range (about ``-log2(eta) + 1``), not by ``2^b``.
* :func:`eta_tradeoff`: SULQ at a fixed shift eta over a grid of etas: share on the lowest level,
  MSE, and (given a model) agreement with the FP top-1 and KL(FP || Q) of the model with only its
  post-softmax maps quantized (:func:`softmax_quantized`), with the eta the calibration search picks.
* :func:`attention_to_artifact` / :func:`attention_from_artifact`: the committed ``attention``
  artifact (histograms + a rounded fixed-seed sample) and back to :class:`AttentionStats`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluate import compare_to_fp, predict_logits, topk_accuracy
from ..quant import OFFICIAL_ETA_GRID, PAPER_ETA_GRID, SULQ, Quantizer, coverage, make_quantizer
from .attention import AttentionStats, attention_modules

#: label -> (registry name, constructor kwargs) of the quantizers compared in :func:`levels_vs_bits`.
LEVEL_QUANTIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "LQ (log2)": ("log2", {}),
    "UQ (uniform)": ("uniform", {}),
    "log-sqrt2": ("logsqrt2", {}),
    "AdaLog": ("adalog", {}),
    "SULQ paper": ("sulq", {"mode": "paper"}),
    "SULQ official": ("sulq", {"mode": "official"}),
}
#: The shifts of :func:`eta_tradeoff`: the paper-mode and official search grids together (18 values).
ETA_GRID: tuple[float, ...] = tuple(sorted(set(PAPER_ETA_GRID) | set(OFFICIAL_ETA_GRID)))


def _values(values: torch.Tensor) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.numel() == 0:
        raise ValueError("values must be a non-empty tensor of post-softmax probabilities")
    return values.detach().float().flatten()


def level_stats(quantizer: Quantizer, values: torch.Tensor, top: int = 4) -> dict[str, Any]:
    """Codes, distinct levels, used levels, MSE and lowest-level shares of a calibrated quantizer on
    ``values`` as a JSON-ready dict (``top``: how many of the highest levels to list)."""
    cov = coverage(quantizer, values)
    row: dict[str, Any] = {
        "n_codes": cov.n_codes,
        "distinct_levels": cov.distinct_levels,
        "used_levels": cov.used_levels,
        "mse": cov.mse,
        "entropy_bits": cov.entropy_bits,
        "lowest_level": cov.lowest_level,
        "collapsed": cov.frac_collapsed,
        "next": cov.frac_next,
        "top_levels": [float(v) for v in cov.levels[-top:]],
    }
    if isinstance(quantizer, SULQ):
        row["eta"] = float(quantizer.eta)
    return row


def levels_vs_bits(
    values: torch.Tensor,
    bits: Sequence[int] = tuple(range(2, 9)),
    quantizers: Mapping[str, tuple[str, Mapping[str, Any]]] = LEVEL_QUANTIZERS,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Calibrate every quantizer at every bit-width on ``values`` (post-softmax, any shape) and measure it.

    Returns one row per (quantizer, bits): ``label``, ``quantizer``, ``bits`` and the fields of
    :func:`level_stats` (``eta`` for SULQ: the one its calibration search picked).
    """
    x = _values(values)
    rows = []
    for label, (name, kw) in tqdm(list(quantizers.items()), desc="levels vs bits", disable=not progress, leave=False):
        for b in bits:
            q = make_quantizer(name, b, **dict(kw)).calibrate(x)
            rows.append({"label": label, "quantizer": name, "bits": b, **level_stats(q, x)})
    return rows


def synthetic_softmax(seed: int = 0, shape: Sequence[int] = (8, 6, 197, 197), logit_std: float = 2.5) -> torch.Tensor:
    """Softmax over the last axis of logits ~ N(0, logit_std^2) drawn by ``torch.randn(shape,
    generator=torch.Generator().manual_seed(seed))`` (default: 8 images x 6 heads of 197 x 197, the
    synthetic attention of method.md 1.7)."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(tuple(shape), generator=g) * logit_std, -1)


# ----------------------------------------------------------------------------- softmax-only quantized model
@contextmanager
def softmax_quantized(model: nn.Module, quantizers: Sequence[Quantizer]) -> Iterator[nn.Module]:
    """Inside the block, ``model`` (a timm ViT/Swin with unfused attention) runs with its post-softmax
    maps replaced by ``quantizers[i](map_i)``, one per attention module in forward order; every other
    tensor stays FP. Implemented as forward hooks on ``attn_drop``, removed on exit."""
    mods = attention_modules(model)
    if len(quantizers) != len(mods):
        raise ValueError(f"need one quantizer per attention module: got {len(quantizers)} for {len(mods)} modules")
    handles = [m.attn_drop.register_forward_hook(lambda _m, _i, out, q=q: q(out)) for (_, m), q in zip(mods, quantizers)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate_softmax_quantizers(model: nn.Module, quantizers: Sequence[Quantizer], images: torch.Tensor) -> None:
    """Calibrate ``quantizers`` in forward order with one forward pass of ``images`` (as the PTQ
    pipeline initialises activation quantizers): each one sees the map computed after the layers
    before it were quantized."""
    for q in quantizers:
        q.calibrate_on_next_forward = True
    was_training = model.training
    model.eval()
    try:
        with softmax_quantized(model, quantizers):
            model(images)
    finally:
        model.train(was_training)
        for q in quantizers:
            q.calibrate_on_next_forward = False


def _task_effect(
    model: nn.Module,
    quantizers: list[Quantizer],
    calib_images: torch.Tensor,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    fp_outputs: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, float]:
    calibrate_softmax_quantizers(model, quantizers, calib_images)
    with softmax_quantized(model, quantizers):
        r = compare_to_fp(model, model, batches, progress=False, fp_outputs=fp_outputs)
    return {"agree_top1": r["agree_top1"], "kl_to_fp": r["kl_to_fp"], "q_top1": r["q_top1"]}


def eta_tradeoff(
    values: torch.Tensor,
    bits: int = 3,
    mode: str = "paper",
    etas: Sequence[float] = ETA_GRID,
    model: nn.Module | None = None,
    calib_images: torch.Tensor | None = None,
    eval_images: torch.Tensor | None = None,
    eval_labels: torch.Tensor | None = None,
    batch_size: int = 250,
    baselines: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """SULQ's shift trade-off: for each fixed ``eta``, a ``bits``-bit SULQ (``mode``) calibrated on ``values``.

    Per eta (one row): ``lowest_level``, ``highest_level``, ``collapsed`` (share of ``values`` mapped onto the lowest
    level), ``next`` (share on the second-lowest), ``distinct_levels``, ``used_levels``, ``mse``; with
    ``model`` also ``agree_top1``, ``kl_to_fp`` (mean KL(FP || Q), nats) and ``q_top1`` of the model
    with ONLY its post-softmax maps quantized, one SULQ per attention layer at this eta, calibrated
    per layer in forward order on ``calib_images`` (min/max of its map), evaluated on ``eval_images``.

    ``searched_eta``: the eta SULQ's own calibration search (its mode's default grid) picks on
    ``values``; with a model, ``searched`` holds the per-layer searched etas (each layer searches on
    its own map, as the PTQ pipeline does) and that model's task metrics. ``baselines`` (label ->
    (registry name, kwargs), e.g. :data:`LEVEL_QUANTIZERS` entries): the same softmax-only model with
    those ``bits``-bit quantizers instead of SULQ, under ``out["baselines"][label]``.

    Faithful to the formula ``x_hat = 2^e - eta`` with an integer exponent ``e``, SULQ's lowest level
    ``2^e_min - eta`` is negative whenever ``eta > 2^e_min`` (eta = 0.01 at 3 bits: 2^-7 - 0.01 =
    -0.0022), and its top level can exceed 1 (eta = 0.5: x = 1 gives e = round(log2 1.5) = 1, x_hat =
    1.5). Rows keep these values as they are.
    """
    if mode not in ("paper", "official"):
        raise ValueError(f"mode must be 'paper' or 'official', got {mode!r}")
    if not etas:
        raise ValueError("etas must not be empty")
    x = _values(values)
    searched = SULQ(bits, mode=mode).calibrate(x)
    out: dict[str, Any] = {"bits": bits, "mode": mode, "searched_eta": float(searched.eta), "rows": []}
    task = model is not None
    if task:
        if calib_images is None or eval_images is None or eval_labels is None:
            raise ValueError("with a model, eta_tradeoff needs calib_images, eval_images and eval_labels")
        n_layers = len(attention_modules(model))
        batches = [
            (eval_images[i : i + batch_size], eval_labels[i : i + batch_size]) for i in range(0, len(eval_images), batch_size)
        ]
        fp_outputs = predict_logits(model, batches, progress=False)
        out["fp_top1"] = topk_accuracy(*fp_outputs, 1)
        qs = [SULQ(bits, mode=mode) for _ in range(n_layers)]
        out["searched"] = {
            **_task_effect(model, qs, calib_images, batches, fp_outputs),
            "eta_per_layer": [float(q.eta) for q in qs],
        }
        out["baselines"] = {
            label: _task_effect(
                model, [make_quantizer(name, bits, **dict(kw)) for _ in range(n_layers)], calib_images, batches, fp_outputs
            )
            for label, (name, kw) in (baselines or {}).items()
        }
    for eta in tqdm(etas, desc=f"eta trade-off {bits}-bit {mode}", disable=not progress, leave=False):
        q = SULQ(bits, mode=mode, eta=eta).calibrate(x)
        cov = coverage(q, x)
        row: dict[str, Any] = {"eta": float(eta), "lowest_level": cov.lowest_level, "collapsed": cov.frac_collapsed,
                               "next": cov.frac_next, "distinct_levels": cov.distinct_levels, "used_levels": cov.used_levels,
                               "highest_level": float(cov.levels[-1]), "mse": cov.mse}  # fmt: skip
        if task:
            qs = [SULQ(bits, mode=mode, eta=eta) for _ in range(n_layers)]
            row.update(_task_effect(model, qs, calib_images, batches, fp_outputs))
        out["rows"].append(row)
    return out


# ----------------------------------------------------------------------------- the "attention" artifact
def attention_to_artifact(stats: AttentionStats, sample_per_layer: int = 6000, seed: int = 0, digits: int = 6) -> dict[str, Any]:
    """JSON-ready dict of ``stats``: layer names, histogram edges and per layer x head counts, row-max
    means, shares below 1e-3, and per layer ``sample_per_layer`` of its stored sample values (a
    fixed-seed draw without replacement), each rounded to ``digits`` significant digits."""
    if sample_per_layer < 0 or not stats.samples:
        raise ValueError("attention_to_artifact needs stats captured with samples and sample_per_layer >= 0")
    g = torch.Generator().manual_seed(seed)
    samples = []
    for s in stats.samples:
        pick = torch.randperm(s.numel(), generator=g)[: min(sample_per_layer, s.numel())]
        samples.append([float(f"{v:.{digits}g}") for v in s[pick].tolist()])
    return {
        "layer_names": list(stats.layer_names),
        "edges": stats.edges.tolist(),
        "counts": stats.counts.tolist(),
        "row_max_mean": [round(float(v), 6) for v in stats.row_max_mean],
        "frac_below_1e3": [round(float(v), 6) for v in stats.frac_below_1e3],
        "samples": samples,
    }


def attention_from_artifact(payload: Mapping[str, Any]) -> AttentionStats:
    """:class:`AttentionStats` from the dict of :func:`attention_to_artifact` (or the loaded artifact);
    its samples are float32 tensors of the stored rounded values."""
    return AttentionStats(
        layer_names=list(payload["layer_names"]),
        edges=torch.tensor(payload["edges"], dtype=torch.float64),
        counts=torch.tensor(payload["counts"], dtype=torch.long),
        row_max_mean=torch.tensor(payload["row_max_mean"]),
        frac_below_1e3=torch.tensor(payload["frac_below_1e3"]),
        samples=[torch.tensor(s, dtype=torch.float32) for s in payload["samples"]],
    )
