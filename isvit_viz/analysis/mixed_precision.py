"""Greedy mixed-precision search: which quantizers to keep at higher precision under an average-bit budget.

**Average bits.** ``avg = sum_q w_q b_q / sum_q w_q`` over the quantizers the model's forward calls,
with ``weighting="count"`` (``w_q = 1``: every quantizer counts once) or ``"elements"`` (``w_q`` = the
elements it quantizes: a weight tensor's size, an activation's elements per image; closer to the bits
stored and moved). The budget is ``avg <= avg_base + extra_bits``.

**Search.** Each candidate q (bit-width below ``high_bits``) gets a measured *gain*: the KL(FP || Q)
recovered by switching q alone off with every other quantizer on (``kl_off_recovery`` of
:func:`~isvit_viz.analysis.sensitivity.analyze_sensitivity`; 8 bits is close to lossless, so this is
the benefit of upgrading q). Candidates are tried in order of gain per unit of average-bit cost; a
candidate that fits the remaining budget is set to ``high_bits`` together with those already chosen
(recalibrated on ``calib``), the whole configuration is *measured*, and it is kept only if the
measured KL falls. The result's metrics are those of the final measured configuration, so applying
``result.bits`` with :func:`~isvit_viz.analysis.sensitivity.apply_precision` and evaluating gives the
same numbers.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quant.base import check_bits
from .sensitivity import (
    MEASUREMENTS,
    QuantizerInfo,
    SensitivityReport,
    StreamingEvaluator,
    analyze_sensitivity,
    bitwidth_sweep,
)

WEIGHTINGS = ("count", "elements")


def average_bits(quantizers: Sequence[QuantizerInfo], bits: Mapping[str, int] | None = None, weighting: str = "count") -> float:
    """Average bit-width of ``quantizers`` (their own bits, overridden by ``bits``) under ``weighting``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    bits = bits or {}
    w = [1 if weighting == "count" else q.elements for q in quantizers]
    return sum(wi * bits.get(q.name, q.bits) for wi, q in zip(w, quantizers)) / sum(w)


@dataclass
class MixedPrecisionResult:
    """Outcome of :func:`mixed_precision_search` (JSON round-trip via :meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        bits: bit-width of every analysed quantizer in the proposal (pass to ``apply_precision``).
        upgraded: the quantizers set to ``high_bits``, in the order they were accepted.
        metrics / base_metrics: measured logit metrics of the proposal and of the quantized model.
        steps: every configuration tried: ``name``, ``avg_bits``, ``kl``, ``agree``, ``accepted``.
    """

    bits: dict[str, int]
    upgraded: list[str]
    high_bits: int
    weighting: str
    extra_bits: float
    base_avg_bits: float
    budget_avg_bits: float
    avg_bits: float
    metrics: dict[str, Any]
    base_metrics: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def agreement_gain(self) -> float:
        """Agreement with FP gained over the base quantized model (absolute, 0..1)."""
        return self.metrics["agree"] - self.base_metrics["agree"]

    @property
    def recovered_share(self) -> float | None:
        """Share of the base model's disagreement with FP that the proposal removes (``None`` if the
        base already agrees everywhere)."""
        gap = 1.0 - self.base_metrics["agree"]
        return None if gap <= 0 else self.agreement_gain / gap

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agreement_gain": self.agreement_gain, "recovered_share": self.recovered_share}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MixedPrecisionResult:
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})


def _gains(ev: StreamingEvaluator, gains: SensitivityReport | Mapping[str, float] | None) -> dict[str, float]:
    if isinstance(gains, SensitivityReport):
        if not all("kl_off_recovery" in r for r in gains.rows):
            raise ValueError("the SensitivityReport has no 'off' measurements; run analyze_sensitivity with 'off' in measure")
        return {r["name"]: r["kl_off_recovery"] for r in gains.rows}
    if gains is not None:
        return {n: float(gains[n]) for n in ev.names}
    report = analyze_sensitivity(ev, measure=("off",))
    return {r["name"]: r["kl_off_recovery"] for r in report.rows}


def _key(names: Sequence[str], high_bits: int) -> str:
    digest = hashlib.sha1("\n".join(sorted(names)).encode()).hexdigest()[:12]
    return f"mp|{high_bits}|{len(names)}|{digest}"


def mixed_precision_search(
    model: nn.Module | StreamingEvaluator,
    data: Any = None,
    calib: torch.Tensor | None = None,
    extra_bits: float = 0.5,
    high_bits: int = 8,
    weighting: str = "count",
    gains: SensitivityReport | Mapping[str, float] | None = None,
    max_trials: int | None = None,
    fp_model: nn.Module | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> MixedPrecisionResult:
    """Greedy measured search for quantizers to keep at ``high_bits`` (see the module docstring).

    Args:
        model: a quantized model or a :class:`StreamingEvaluator` (then ``data``, ``fp_model``,
            ``checkpoint``, ``device`` come from it).
        data: evaluation batches; the search measures and selects on them.
        calib: images [N, C, H, W] to recalibrate upgraded activation quantizers.
        extra_bits: average-bit budget above the model's own average (> 0).
        high_bits: bit-width of an upgraded quantizer.
        weighting: ``"count"`` or ``"elements"`` (how the average is taken).
        gains: per-quantizer gains (a report with ``off`` measurements, or name -> KL recovered);
            measured when ``None``.
        max_trials: stop after this many measured configurations (default: no limit).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not (isinstance(extra_bits, (int, float)) and extra_bits > 0):
        raise ValueError(f"extra_bits must be > 0, got {extra_bits!r}")
    high_bits = check_bits(high_bits)
    if calib is None:
        raise ValueError("mixed_precision_search needs calib images [N, C, H, W] to recalibrate upgraded quantizers")
    t0 = time.perf_counter()
    ev = (
        model
        if isinstance(model, StreamingEvaluator)
        else StreamingEvaluator(model, data, fp_model, device, checkpoint, progress)
    )
    infos = ev.quantizers
    gain = _gains(ev, gains)
    total_w = sum(1 if weighting == "count" else q.elements for q in infos)
    cost = {
        q.name: (1 if weighting == "count" else q.elements) * (high_bits - q.bits) / total_w for q in infos if q.bits < high_bits
    }
    order = sorted(cost, key=lambda n: (-gain[n] / cost[n], next(q.index for q in infos if q.name == n)))
    base = ev.measure("all_on", None)
    base_avg = average_bits(infos, weighting=weighting)
    chosen: list[str] = []
    current, spent, steps = base, 0.0, []
    budget = extra_bits + 1e-9  # float slack for budgets that are exactly reachable
    with tqdm(total=len(order), desc=f"mixed precision ({weighting}, +{extra_bits} bits)", disable=not ev.progress) as bar:
        for n in order:
            bar.update(1)
            if spent + cost[n] > budget:
                continue
            trial = chosen + [n]
            m = ev.measure(_key(trial, high_bits), None, dict.fromkeys(trial, high_bits), calib)
            accepted = m["kl"] < current["kl"]
            steps.append({"name": n, "gain": gain[n], "avg_bits": base_avg + spent + cost[n], "kl": m["kl"], "agree": m["agree"],
                          "accepted": accepted})  # fmt: skip
            if accepted:
                chosen, current, spent = trial, m, spent + cost[n]
            if max_trials is not None and len(steps) >= max_trials:
                break
    bits = {q.name: (high_bits if q.name in chosen else q.bits) for q in infos}
    return MixedPrecisionResult(
        bits=bits,
        upgraded=chosen,
        high_bits=high_bits,
        weighting=weighting,
        extra_bits=float(extra_bits),
        base_avg_bits=base_avg,
        budget_avg_bits=base_avg + extra_bits,
        avg_bits=average_bits(infos, bits, weighting),
        metrics=current,
        base_metrics=base,
        steps=steps,
        wall_s=time.perf_counter() - t0,
    )


def sensitivity_study(
    model: nn.Module,
    data: Any,
    calib: torch.Tensor,
    fp_model: nn.Module | None = None,
    measure: Sequence[str] = MEASUREMENTS,
    sweep_bits: Sequence[int] = (2, 4, 6, 8),
    cell_bits: Sequence[int] = (2, 8),
    extra_bits: Sequence[float] = (0.5,),
    weightings: Sequence[str] = WEIGHTINGS,
    high_bits: int = 8,
    max_trials: int | None = 30,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Everything notebook 05 shows for one quantized model, JSON-ready.

    Runs :func:`analyze_sensitivity` (``measure``), :func:`bitwidth_sweep` per group at ``sweep_bits``
    and per block x group cell at ``cell_bits`` (empty: skipped), and :func:`mixed_precision_search`
    (at most ``max_trials`` measured configurations each) for every ``weighting`` and every budget in
    ``extra_bits``, all on one
    :class:`StreamingEvaluator` (FP logits once; one checkpoint file for all parts).

    Returns ``{"report", "sweep", "cells", "mixed_precision": {"<weighting>+<extra>": result}, "wall_s":
    {part: seconds}}``; ``wall_s`` is the time spent in this call (parts read from a checkpoint cost ~0).
    """
    wall: dict[str, float] = {}
    t0 = time.perf_counter()
    ev = StreamingEvaluator(model, data, fp_model, device, checkpoint, progress)
    wall["fp_logits"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = analyze_sensitivity(ev, measure=measure)
    wall["analysis"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sweep = bitwidth_sweep(ev, calib=calib, bits=sweep_bits, by="group") if sweep_bits else []
    wall["sweep"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cells = bitwidth_sweep(ev, calib=calib, bits=cell_bits, by="cell") if cell_bits else []
    wall["cells"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gains = report if "off" in measure else None
    mp = {
        f"{w}+{e:g}": mixed_precision_search(
            ev, calib=calib, extra_bits=e, high_bits=high_bits, weighting=w, gains=gains, max_trials=max_trials
        ).to_dict()
        for w in weightings
        for e in extra_bits
    }
    wall["mixed_precision"] = time.perf_counter() - t0
    return {"report": report.to_dict(), "sweep": sweep, "cells": cells, "mixed_precision": mp, "wall_s": wall}
