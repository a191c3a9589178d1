"""The PTQ methods: I&S-ViT (paper-faithful and official-code-faithful) and the paper's baselines.

A method is data: a :class:`MethodSpec` says which quantizers to place and which calibration /
reconstruction schedule to run; :func:`isvit_viz.calib.pipeline.quantize` executes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    """How one PTQ method quantizes a model.

    Attributes:
        softmax / softmax_kwargs: post-softmax quantizer.
        post_ln: ``"channel"`` calibrates qkv/fc1 inputs per channel (then ``reparam`` folds them),
            ``"layer"`` uses per-tensor quantizers throughout.
        post_gelu, weight_granularity, act_init, weight_init: see :class:`QuantConfig`.
        schedule: ``"sos"`` (I&S-ViT: stage 1 FP weights + FP-teacher inputs, stage 2 reparam, stage 3
            quantized weights + quantized-model inputs), ``"single"`` (one reconstruction with
            quantized weights and quantized-model inputs, BRECQ/QDrop style), or ``"none"``
            (calibration only).
        reparam: fold channel-wise post-LN scales (stage 2 / RepQ-ViT).
        round_zero_point: integer layer-wise zero-point after reparam (exact); the official code
            keeps the fractional mean.
        init_images: images used to initialise quantizers (official: the first 64); ``None`` = up to 256.
        act_drop_prob: QDrop's probability of dropping activation quantization during reconstruction.
        default_iters: iterations per unit and stage when the caller passes ``iters=None``.
    """

    softmax: str = "sulq"
    softmax_kwargs: dict[str, Any] = field(default_factory=dict)
    post_ln: str = "channel"
    post_gelu: str = "uniform"
    weight_granularity: str = "channel"
    act_init: str = "percentile_mse"
    weight_init: str = "percentile_mse"
    schedule: str = "sos"
    reparam: bool = True
    round_zero_point: bool = True
    init_images: int | None = None
    act_drop_prob: float = 0.0
    default_iters: int = 1000
    description: str = ""


METHODS: dict[str, MethodSpec] = {
    "isvit": MethodSpec(
        softmax="sulq",
        softmax_kwargs={"mode": "paper"},
        description="I&S-ViT as the paper describes it: paper-mode SULQ + SOS (3 stages) with block reconstruction",
    ),
    "isvit-official": MethodSpec(
        softmax="sulq",
        softmax_kwargs={"mode": "official"},
        round_zero_point=False,
        init_images=64,
        description="I&S-ViT as the released code runs it: official-mode SULQ, init on 64 images, fractional zero-point",
    ),
    "repq-vit": MethodSpec(
        softmax="logsqrt2",
        schedule="none",
        round_zero_point=False,
        init_images=64,
        description="RepQ-ViT: channel-wise post-LN calibration + reparameterization, log-sqrt2 softmax, no reconstruction",
    ),
    "ptq4vit": MethodSpec(
        softmax="twin_uniform",
        post_ln="layer",
        post_gelu="twin_uniform",
        schedule="none",
        reparam=False,
        init_images=64,
        description="PTQ4ViT: twin-uniform softmax and GELU quantizers (MSE search), calibration only",
    ),
    "qdrop": MethodSpec(
        softmax="uniform",
        post_ln="layer",
        schedule="single",
        reparam=False,
        act_drop_prob=0.5,
        description="QDrop-style: block reconstruction with quantized weights from the start, "
        "layer-wise post-LN, activation-quantization dropping (p=0.5); weights trained through STE, no AdaRound",
    ),
    "minmax": MethodSpec(
        softmax="uniform",
        post_ln="layer",
        weight_granularity="tensor",
        act_init="minmax",
        weight_init="minmax",
        schedule="none",
        reparam=False,
        init_images=64,
        description="plain per-tensor min/max uniform quantization of every tensor",
    ),
}


def resolve_method(method: str, softmax_quantizer: str | None = None, sos: bool = True) -> MethodSpec:
    """Look up a method and apply the ablation switches.

    ``softmax_quantizer`` replaces the post-softmax quantizer (paper Table 4); ``sos=False`` turns
    I&S-ViT's three stages into one reconstruction with quantized weights and layer-wise post-LN
    activations (paper Table 3, "without SOS").
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {sorted(METHODS)}")
    spec = METHODS[method]
    if softmax_quantizer is not None:
        from ..quant.config import SOFTMAX_QUANTIZERS

        if softmax_quantizer not in SOFTMAX_QUANTIZERS:
            raise ValueError(f"unknown softmax_quantizer {softmax_quantizer!r}; valid: {list(SOFTMAX_QUANTIZERS)}")
        kw = spec.softmax_kwargs if softmax_quantizer == spec.softmax else {}
        spec = replace(spec, softmax=softmax_quantizer, softmax_kwargs=kw)
    if not sos:
        if spec.schedule != "sos":
            raise ValueError(f"sos=False only applies to the I&S-ViT methods, not {method!r}")
        spec = replace(spec, schedule="single", post_ln="layer", reparam=False)
    return spec
