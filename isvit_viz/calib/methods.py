"""The PTQ methods as data: I&S-ViT (paper-faithful and official-code-faithful) and the paper's baselines.

A :class:`Method` is a quantizer placement plus an ordered tuple of stages
(:mod:`isvit_viz.calib.stages`); :func:`isvit_viz.calib.quantize` runs any of them with one engine.
Every registered method records where each of its settings comes from (``provenance``, printed by
:func:`isvit_viz.calib.describe` and ``isvit-viz methods``). Compose your own::

    from isvit_viz.calib import Calibrate, Method, Reconstruct, Requantize, quantize
    mine = Method(name="fp-recon", stages=(Calibrate(), Reconstruct(name="fit", inputs="fp", weights="fp"), Requantize()))
    result = quantize(model, mine, 4, 4, calib_images)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..quant.config import PTQ4VIT_TWIN
from ..quant.uniform import ACT_PERCENTILES
from .provenance import PROVENANCE, Source, ablation_no_sos, ablation_softmax, isvit_plus_provenance
from .stages import (
    Calibrate,
    ChooseSoftmax,
    HessianCalibrate,
    Loss,
    Mix,
    Reconstruct,
    ReluMLP,
    Reparameterize,
    Requantize,
    Stage,
    check_stages,
)  # fmt: skip

#: Method fields that place quantizers (passed to :class:`isvit_viz.quant.config.QuantConfig`).
PLACEMENT_FIELDS = (
    "softmax", "softmax_kwargs", "post_ln", "post_gelu", "weight_granularity", "act_init", "weight_init",
    "input_bits", "reduction_post_ln", "weight_percentiles", "first_last_bits", "matmul_granularity", "mlp_act",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Method:
    """How one PTQ method quantizes a model: quantizer placement + stages.

    Attributes:
        name: recorded as ``config["method"]`` and in progress bars.
        stages: the steps, run in order (checked on construction: ``ValueError`` naming the stage).
        softmax ... weight_percentiles: quantizer placement, see :class:`~isvit_viz.quant.config.QuantConfig`.
        description: one line for tables.
        provenance: setting key (``"post_ln"``, ``"<stage name>.<field>"``, ``"stages"``) -> where the
            value comes from (a :class:`~isvit_viz.calib.provenance.Source` or a string).
    """

    name: str
    stages: tuple[Stage, ...]
    softmax: str = "sulq"
    softmax_kwargs: Mapping[str, Any] = field(default_factory=dict)
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
    description: str = ""
    provenance: Mapping[str, Source] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Method.name must be a non-empty string, got {self.name!r}")
        self.quant_config(4, 4)  # placement values: QuantConfig's ValueError names the field
        channel = "channel" in (self.post_ln, self.reduction_post_ln)
        object.__setattr__(self, "stages", check_stages(self.stages, channel, relu_mlp=self.mlp_act == "relu"))
        object.__setattr__(self, "softmax_kwargs", dict(self.softmax_kwargs))
        prov = {k: v if isinstance(v, Source) else Source(str(v)) for k, v in dict(self.provenance).items()}
        object.__setattr__(self, "provenance", prov)

    def quant_config(self, w_bits: int, a_bits: int) -> Any:
        """The :class:`~isvit_viz.quant.config.QuantConfig` of this placement at the given bit-widths."""
        from ..quant.config import QuantConfig

        kw = {f: getattr(self, f) for f in PLACEMENT_FIELDS}
        return QuantConfig(w_bits=w_bits, a_bits=a_bits, **{**kw, "softmax_kwargs": dict(self.softmax_kwargs)})

    def settings(self) -> list[tuple[str, Any]]:
        """``(key, value)`` for every setting: the stage order, the placement, every stage field."""
        out: list[tuple[str, Any]] = [("stages", " -> ".join(f"{type(s).__name__}({s.name})" for s in self.stages))]
        out += [(f, getattr(self, f)) for f in PLACEMENT_FIELDS]
        for s in self.stages:
            out += [(f"{s.name}.{k}", v) for k, v in s.settings().items()]
        return out

    @property
    def init_images(self) -> int | None:
        """Images the first :class:`Calibrate` stage initialises quantizers on (``None``: all)."""
        return next((s.images for s in self.stages if isinstance(s, Calibrate)), None)

    @property
    def schedule(self) -> str:
        """Label recorded in ``config["schedule"]``: ``"sos"``, ``"single"``, ``"none"`` or ``"custom"``."""
        kinds = [type(s) for s in self.stages]
        if Reconstruct not in kinds:
            return "none"
        if len(kinds) == 2 and kinds[0] is Calibrate:
            return "single"
        return "sos" if _is_sos(self) else "custom"


def _is_sos(m: Method) -> bool:
    """I&S-ViT's shape: calibrate, FP-input/FP-weight reconstruction, reparam, requantize, quantized reconstruction."""
    kinds = [type(s) for s in m.stages]
    if kinds != [Calibrate, Reconstruct, Reparameterize, Requantize, Reconstruct]:
        return False
    s1, s3 = m.stages[1], m.stages[4]
    return (s1.inputs, s1.weights, s3.inputs, s3.weights) == ("fp", "fp", "quantized", "quantized")


def _sos_stages(zero_point: str, images: int) -> tuple[Stage, ...]:
    """SOS (paper §4.3, official ``test_quant.py``): stage 1, stage 2 (fold + weight init), stage 3."""
    return (
        Calibrate(images=images),
        Reconstruct(name="stage1", inputs="fp", weights="fp"),
        Reparameterize(name="stage2", event=None, zero_point=zero_point),
        Requantize(name="stage2"),
        Reconstruct(name="stage3", inputs="quantized", weights="quantized"),
    )


def _calibration_only(images: int, reparam: str | None, weights: str = "fp") -> tuple[Stage, ...]:
    """Calibrate activations, then (optionally fold and) calibrate weights: one step named ``weights``."""
    fold = (Reparameterize(name="weights", event=None, zero_point=reparam),) if reparam else ()
    return (Calibrate(weights=weights, images=images), *fold, Requantize(name="weights", event=None))


#: BRECQ / QDrop reconstruction settings (their ImageNet scripts): 20,000 steps of batch 32, Lp loss p = 2.4.
_BRECQ_RECON = {"iters": 20000, "batch_size": 32, "loss": "lp", "loss_p": 2.4}


def _brecq_stages() -> tuple[Stage, ...]:
    """BRECQ (``main_imagenet.py``): weights (64-image init, AdaRound block reconstruction, activations
    FP), then activations (64-image init, step sizes learned over 5000 steps at lr 4e-4)."""
    return (
        Requantize(name="init_weights", event=None),
        Reconstruct(name="weight_recon", event=None, activations="fp", rounding="adaround", **_BRECQ_RECON),
        Calibrate(weights="quantized", images=64),
        Reconstruct(
            name="act_recon",
            event="reconstructed",
            rounding="fixed",
            act_scale_lr=4e-4,
            act_scale_grad_scale=False,
            **{**_BRECQ_RECON, "iters": 5000},
        ),  # fmt: skip
    )


#: APHQ-ViT / FIMA-Q placement (their shared AdaLog-derived code): uniform everywhere, channel-wise post-LN
#: (incl. PatchMerging) folded into the LayerNorms, per-head attention-matmul scales.
_APHQ_FIMA_PLACEMENT = {"softmax": "uniform", "post_ln": "channel", "reduction_post_ln": "channel", "matmul_granularity": "head"}


def _aphq_fima_stages(loss: Loss, head_loss: Loss | str) -> tuple[Stage, ...]:
    """Calibrate (128 images), fold, requantize, then AdaRound + QDrop block reconstruction with ``loss``."""
    return (
        Calibrate(weights="fp", images=128),
        Reparameterize(name="weights", event=None, zero_point="mean"),
        Requantize(name="weights", event=None),
        Reconstruct(name="reconstruct", event="reconstructed", inputs=Mix(0.5), rounding="adaround", loss=loss,
                    head_loss=head_loss, iters=20000, batch_size=32, act_drop_prob=0.5, act_scale_lr=4e-5,
                    act_scale_grad_scale=False),
    )  # fmt: skip


#: ``isvit+``'s post-softmax candidates: SULQ (wins at 3 bits), uniform (6 bits), log-sqrt2 (4 bits)
#: (``benchmarks/results/softmax_choice.json``).
ISVIT_PLUS_CANDIDATES = ("sulq", "uniform", "logsqrt2")


def isvit_plus(
    *,
    choose_softmax: bool = True,
    sos: bool = True,
    act_drop_prob: float = 0.0,
    rounding: str = "ste",
    loss: str | Loss = "mse",
    name: str = "isvit+",
) -> Method:
    """``isvit+``: this package's own combination on I&S-ViT (not a published method).

    I&S-ViT's paper placement and SOS, plus a per-attention choice of the post-softmax quantizer by
    attention-output error among :data:`ISVIT_PLUS_CANDIDATES` (:class:`ChooseSoftmax`, after
    calibration: SULQ stays where it wins). ``isvit_plus(choose_softmax=False)`` is exactly ``isvit``.

    Each keyword switches one ingredient (the ablation of ``benchmarks/isvit_plus.py``):
    ``choose_softmax=False`` keeps SULQ everywhere, ``sos=False`` replaces the three SOS stages by one
    reconstruction with quantized weights and layer-wise post-LN activations (paper Table 3),
    ``act_drop_prob`` adds QDrop's element-wise FP/quantized mixing in the quantized-weight
    reconstruction (measured: no gain at W4/A4 and W6/A6 on the embedded ViT, about 2x stage three's
    time, so off by default), ``rounding="adaround"`` and ``loss`` change the reconstruction(s). A
    non-default switch should get its own ``name``.
    """
    head = (ChooseSoftmax(candidates=ISVIT_PLUS_CANDIDATES, images=256),) if choose_softmax else ()
    last = {"inputs": "quantized", "weights": "quantized", "act_drop_prob": act_drop_prob, "rounding": rounding, "loss": loss}
    if sos:  # isvit's own SOS stages, the choice after calibration, the switches in the reconstructions
        cal, s1, *fold, s3 = _sos_stages("round", 256)
        stages = (cal, *head, replace(s1, loss=loss), *fold, replace(s3, **last))
    else:
        stages = (
            Calibrate(weights="calibrate", images=256),
            *head,
            Reconstruct(name="reconstruct", event="reconstructed", **last),
        )
    return Method(
        name=name,
        stages=stages,
        softmax="sulq",
        softmax_kwargs={"mode": "paper"},
        post_ln="channel" if sos else "layer",
        description="our own combination (not a published method): I&S-ViT (paper-mode SULQ + SOS) with each "
        "attention's post-softmax quantizer chosen by attention-output error among SULQ, uniform and log-sqrt2",
        provenance=isvit_plus_provenance(stages, choose_softmax=choose_softmax, sos=sos),
    )


def _registered(name: str, **kw: Any) -> Method:
    return Method(name=name, provenance=PROVENANCE[name], **kw)


METHODS: dict[str, Method] = {
    "isvit": _registered(
        "isvit",
        stages=_sos_stages("round", 256),
        softmax="sulq",
        softmax_kwargs={"mode": "paper"},
        description="I&S-ViT as the paper describes it: paper-mode SULQ + SOS (3 stages) with block reconstruction",
    ),
    "isvit-official": _registered(
        "isvit-official",
        stages=_sos_stages("mean", 64),
        softmax="sulq",
        softmax_kwargs={"mode": "official"},
        description="I&S-ViT as the released code runs it: official-mode SULQ, init on 64 images, fractional zero-point",
    ),
    "repq-vit": _registered(
        "repq-vit",
        stages=_calibration_only(32, reparam="mean", weights="calibrate"),
        softmax="logsqrt2",
        softmax_kwargs={"include_max": False},
        reduction_post_ln="channel",
        input_bits=8,
        weight_percentiles=ACT_PERCENTILES,
        description="RepQ-ViT as its code runs it: activations calibrated with quantized weights on 32 images, "
        "channel-wise post-LN (incl. Swin PatchMerging) folded with a fractional zero-point, log-sqrt2 softmax, "
        "8-bit input image; no reconstruction",
    ),
    "reparam-logsqrt2": _registered(
        "reparam-logsqrt2",
        stages=_calibration_only(64, reparam="mean"),
        softmax="logsqrt2",
        description="RepQ-ViT's two quantizers on I&S-ViT's placement (this package's 'repq-vit' before 0.2): "
        "FP-weight calibration, channel-wise post-LN folded, log-sqrt2 softmax; no reconstruction",
    ),
    "ptq4vit": _registered(
        "ptq4vit",
        stages=(HessianCalibrate(images=32),),
        softmax=PTQ4VIT_TWIN,
        post_ln="layer",
        post_gelu=PTQ4VIT_TWIN,
        weight_granularity="tensor",
        description="PTQ4ViT as its code runs it: twin-uniform softmax and GELU quantizers, every step searched "
        "with the Hessian-guided metric on 32 images; no reconstruction",
    ),
    "twin-uniform-mse": _registered(
        "twin-uniform-mse",
        stages=_calibration_only(64, reparam=None),
        softmax="twin_uniform",
        post_ln="layer",
        post_gelu="twin_uniform",
        description="PTQ4ViT's twin-uniform quantizers searched by MSE (this package's 'ptq4vit' before 0.2); calibration only",
    ),
    "brecq": _registered(
        "brecq",
        stages=_brecq_stages(),
        softmax="uniform",
        post_ln="layer",
        first_last_bits=8,
        description="BRECQ: AdaRound block reconstruction of the weights (20k steps, batch 32, Lp 2.4), then a "
        "separate pass learning the activation step sizes (5k steps); first and last layers at 8 bits",
    ),
    "qdrop": _registered(
        "qdrop",
        stages=(
            Calibrate(weights="calibrate", images=256),
            Reconstruct(
                name="reconstruct",
                event="reconstructed",
                inputs=Mix(0.5),
                rounding="adaround",
                act_drop_prob=0.5,
                act_scale_lr=4e-5,
                **_BRECQ_RECON,
            ),  # fmt: skip
        ),
        softmax="uniform",
        post_ln="layer",
        first_last_bits=8,
        description="QDrop: BRECQ's AdaRound block reconstruction with activation step sizes learned jointly "
        "(LSQ), every quantized activation and the block input mixed with FP (p = 0.5); 20k steps, batch 32",
    ),
    "qdrop-ste": _registered(
        "qdrop-ste",
        stages=(
            Calibrate(weights="calibrate", images=256),
            Reconstruct(name="reconstruct", event="reconstructed", inputs="quantized", weights="quantized", act_drop_prob=0.5),
        ),
        softmax="uniform",
        post_ln="layer",
        description="QDrop's activation dropping on I&S-ViT's reconstruction (this package's 'qdrop' before 0.2): "
        "STE weights, fixed activation scales, quantized block inputs, I&S-ViT's steps and batch",
    ),
    "aphq-vit": _registered(
        "aphq-vit",
        stages=(
            ReluMLP(),
            *_aphq_fima_stages(
                Loss("hessian_perturb", eps=1e-6, temperature=20.0, average=True, norm=2.0), Loss("kl_div", norm=2.0)
            ),
        ),
        mlp_act="relu",
        description="APHQ-ViT (CVPR 2025) from its code: GELU -> ReLU with MLP reconstruction, folded channel-wise "
        "post-LN, per-head uniform attention quantizers, AdaRound + QDrop block reconstruction weighted by the "
        "average-perturbation Hessian, KL head; 20k steps, batch 32",
        **_APHQ_FIMA_PLACEMENT,
    ),
    "fima-q": _registered(
        "fima-q",
        stages=_aphq_fima_stages(Loss("fisher_dplr", k=5, p1=1.0, p2=1.0, mode="q", temperature=20.0), "kl_div"),
        description="FIMA-Q (CVPR 2025): RepQ-style folded channel-wise post-LN, per-head uniform attention quantizers, "
        "AdaRound + QDrop block reconstruction with the diagonal-plus-low-rank Fisher loss (k = 5 refreshes), KL head; "
        "20k steps, batch 32",
        **_APHQ_FIMA_PLACEMENT,
    ),
    "isvit+": isvit_plus(),
    "minmax": _registered(
        "minmax",
        stages=_calibration_only(64, reparam=None),
        softmax="uniform",
        post_ln="layer",
        weight_granularity="tensor",
        act_init="minmax",
        weight_init="minmax",
        description="plain per-tensor min/max uniform quantization of every tensor",
    ),
}


def _without_sos(m: Method) -> Method:
    """Paper Table 3 "without SOS": one reconstruction with quantized weights and layer-wise post-LN."""
    cal, s3 = m.stages[0], m.stages[4]
    stages = (replace(cal, weights="calibrate"), replace(s3, name="reconstruct", event="reconstructed"))
    return replace(m, post_ln="layer", stages=stages, provenance=ablation_no_sos(m.provenance, s3.name))


def resolve_method(method: str | Method, softmax_quantizer: str | None = None, sos: bool = True) -> Method:
    """Look up a registered method (or take a :class:`Method`) and apply the ablation switches.

    ``softmax_quantizer`` replaces the post-softmax quantizer (paper Table 4); ``sos=False`` turns
    I&S-ViT's three stages into one reconstruction with quantized weights and layer-wise post-LN
    activations (paper Table 3, "without SOS"). The provenance records the switch.
    """
    if isinstance(method, Method):
        m = method
    elif isinstance(method, str) and method in METHODS:
        m = METHODS[method]
    else:
        raise ValueError(f"unknown method {method!r}; valid methods: {sorted(METHODS)} or an isvit_viz.calib.Method")
    if softmax_quantizer is not None:
        from ..quant.config import SOFTMAX_QUANTIZERS

        if softmax_quantizer not in SOFTMAX_QUANTIZERS:
            raise ValueError(f"unknown softmax_quantizer {softmax_quantizer!r}; valid: {list(SOFTMAX_QUANTIZERS)}")
        kw = m.softmax_kwargs if softmax_quantizer == m.softmax else {}
        prov = ablation_softmax(m.provenance, softmax_quantizer, kept_kwargs=bool(kw))
        m = replace(m, softmax=softmax_quantizer, softmax_kwargs=kw, provenance=prov)
    if not sos:
        if not _is_sos(m):
            raise ValueError(f"sos=False only applies to the I&S-ViT methods, not {m.name!r}")
        m = _without_sos(m)
    return m


__all__ = ["ISVIT_PLUS_CANDIDATES", "METHODS", "Method", "Mix", "PLACEMENT_FIELDS", "isvit_plus", "resolve_method"]
