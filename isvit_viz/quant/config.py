"""Typed description of *how* a model is quantized (which quantizer for which tensor role)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .base import check_bits
from .registry import QUANTIZERS

SOFTMAX_QUANTIZERS = ("sulq", "log2", "logsqrt2", "uniform", "twin_uniform", "adalog")
#: PTQ4ViT's official-code twin-uniform quantizers (:mod:`isvit_viz.quant.ptq4vit`), placed by name.
PTQ4VIT_TWIN = "twin_uniform_ptq4vit"


@dataclass(frozen=True)
class QuantConfig:
    """Quantizer placement for a timm ViT/DeiT/Swin (method.md 2.1).

    Attributes:
        w_bits / a_bits: weight and activation bit-widths (2..16).
        softmax: quantizer of the post-softmax operand of ``P @ V`` (a name from ``QUANTIZERS``).
        softmax_kwargs: extra constructor arguments, e.g. ``{"mode": "official"}`` for SULQ.
        post_ln: ``"channel"`` (per-channel inputs of qkv/fc1, SOS stage 1) or ``"layer"``.
        post_gelu: quantizer of the fc2 input: ``"uniform"``, ``"twin_uniform"`` (PTQ4ViT as the paper
            describes it) or ``"twin_uniform_ptq4vit"`` (PTQ4ViT's official code). ``softmax`` also
            accepts ``"twin_uniform_ptq4vit"``.
        weight_granularity: ``"channel"`` (per output row, the paper) or ``"tensor"``.
        act_init / weight_init: ``"percentile_mse"`` (official) or ``"minmax"``.
        input_bits: bit-width of a per-tensor uniform quantizer on the input image of the patch
            embedding (RepQ-ViT: 8); ``None`` (default) keeps the image FP, as I&S-ViT.
        reduction_post_ln: input quantizer of Swin PatchMerging ``reduction`` (post-LN): ``"layer"``
            (default, I&S-ViT) or ``"channel"`` (RepQ-ViT; folded into ``norm`` by reparameterization).
        weight_percentiles: candidate list of the weight percentile search; ``None`` = ``WEIGHT_PERCENTILES``
            (I&S-ViT's 9 values), RepQ-ViT uses ``ACT_PERCENTILES`` (0.999, 0.9999, 0.99999).
        first_last_bits: bit-width of the first and last layers (the patch-embedding weights, the head
            weights and the head input), as BRECQ and QDrop keep them (8); ``None`` (default): ``w_bits``
            / ``a_bits`` like every other layer, as I&S-ViT.
        matmul_granularity: scales of the uniform quantizers on the attention-matmul operands (q, k,
            v and a uniform post-softmax map, [B, heads, N, d]): ``"tensor"`` (one scale, I&S-ViT) or
            ``"head"`` (one per head: APHQ-ViT / FIMA-Q).
        mlp_act: the MLP activation of the quantized model: ``"gelu"`` (the model's own) or ``"relu"``
            (APHQ-ViT replaces every GELU by a ReLU and retrains the MLPs, the ``ReluMLP`` stage).
        softmax_layers: per-attention overrides of ``softmax``: module path of a timm ``Attention`` /
            ``WindowAttention`` -> quantizer name (``softmax_kwargs`` apply only where the name equals
            ``softmax``). Written by the ``ChooseSoftmax`` calibration stage, so a saved model or a
            resumed run rebuilds the same quantizers.
    """

    w_bits: int = 4
    a_bits: int = 4
    softmax: str = "sulq"
    softmax_kwargs: dict[str, Any] = field(default_factory=dict)
    post_ln: str = "channel"
    post_gelu: str = "uniform"
    weight_granularity: str = "channel"
    act_init: str = "percentile_mse"
    weight_init: str = "percentile_mse"
    input_bits: int | None = None
    reduction_post_ln: str = "layer"
    weight_percentiles: tuple[float, ...] | None = None
    first_last_bits: int | None = None
    matmul_granularity: str = "tensor"
    mlp_act: str = "gelu"
    softmax_layers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bits(self.w_bits)
        check_bits(self.a_bits)
        for name in ("input_bits", "first_last_bits"):
            if getattr(self, name) is not None:
                try:
                    check_bits(getattr(self, name))
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        for where, name in (("softmax", self.softmax), *((f"softmax_layers[{k!r}]", v) for k, v in self.softmax_layers.items())):
            if name not in QUANTIZERS and name != PTQ4VIT_TWIN:
                raise ValueError(f"{where}: unknown softmax quantizer {name!r}; valid: {sorted(QUANTIZERS) + [PTQ4VIT_TWIN]}")
        if self.weight_percentiles is not None:  # a JSON round trip gives a list
            object.__setattr__(self, "weight_percentiles", tuple(float(p) for p in self.weight_percentiles))
        for name, val, ok in (
            ("post_ln", self.post_ln, ("channel", "layer")),
            ("reduction_post_ln", self.reduction_post_ln, ("channel", "layer")),
            ("post_gelu", self.post_gelu, ("uniform", "twin_uniform", PTQ4VIT_TWIN)),
            ("weight_granularity", self.weight_granularity, ("channel", "tensor")),
            ("matmul_granularity", self.matmul_granularity, ("tensor", "head")),
            ("mlp_act", self.mlp_act, ("gelu", "relu")),
            ("act_init", self.act_init, ("percentile_mse", "minmax")),
            ("weight_init", self.weight_init, ("percentile_mse", "minmax")),
        ):
            if val not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {val!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        return cls(**d)
