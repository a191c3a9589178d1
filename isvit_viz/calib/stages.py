"""The steps of a PTQ method, as frozen dataclasses: a method is an ordered tuple of stages (data).

:class:`isvit_viz.calib.Method` pairs a quantizer placement with a tuple of these stages and
:func:`isvit_viz.calib.quantize` runs them in order with one engine (:mod:`isvit_viz.calib.engine`).
Every stage has a ``name`` (the key of its timing, of its per-unit losses and of its settings in
:func:`isvit_viz.calib.describe`) and an ``event``: the name passed to ``callbacks`` after the stage
(``""``: the stage name; ``None``: no callback). Consecutive stages may share a name; they then form
one timed step (I&S-ViT's stage 2 is :class:`Reparameterize` + :class:`Requantize`).

Stage fields are checked when the stages are put into a :class:`~isvit_viz.calib.Method`
(:func:`check_stages`), so an error can name the stage's position and name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .losses import LOSSES as LOSS_REGISTRY
from .losses import ReconLoss, make_loss

#: Where the inputs of each reconstructed unit come from (:class:`Reconstruct`).
INPUTS = ("fp", "quantized")
#: Weight state of the model during a reconstruction.
WEIGHTS = ("fp", "quantized")
#: Activation state of the model during a reconstruction.
ACTIVATIONS = ("quantized", "fp")
#: How weights are trained (``isvit_viz.calib.recon.ROUNDINGS``); ``"fixed"``: not at all.
ROUNDINGS = ("ste", "adaround", "fixed")
#: Reconstruction losses (:data:`isvit_viz.calib.losses.LOSSES`): ``"mse"`` is the official ``lp_loss``
#: (squared error summed over dim 1); ``"lp"`` the same with ``|error| ** loss_p`` (BRECQ / QDrop:
#: p = 2.4); ``"fisher_diag"`` (BRECQ), ``"hessian_perturb"`` (APHQ-ViT), ``"fisher_dplr"`` (FIMA-Q),
#: ``"kl_div"`` (head units of APHQ-ViT / FIMA-Q). Settings other than the defaults: :class:`Loss`.
LOSSES = tuple(LOSS_REGISTRY)
#: Weight state during a :class:`Calibrate` pass.
CALIBRATE_WEIGHTS = ("fp", "calibrate", "quantized")
#: Layer-wise zero-point after reparameterization: ``"round"`` (integer mean, exact) or ``"mean"``.
ZERO_POINTS = ("round", "mean")


@dataclass(frozen=True)
class Mix:
    """QDrop input mixing: each element of a unit's input is the FP teacher's with probability ``p``
    (0 < p < 1) and the quantized model's otherwise (a fresh mask every step)."""

    p: float


@dataclass(frozen=True, init=False)
class Loss:
    """A reconstruction loss with settings: ``Loss("fisher_dplr", k=5, p1=1.0)`` (a plain name such as
    ``"mse"`` means the loss with its defaults). Settings are those of the registered class
    (:func:`isvit_viz.calib.losses.make_loss`); they are checked when the stage is put into a method.
    """

    name: str
    settings: tuple[tuple[str, Any], ...]

    def __init__(self, name: str, **settings: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "settings", tuple(sorted(settings.items())))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.settings)

    def build(self) -> ReconLoss:
        """A fresh loss object (``ValueError`` naming the value for an unknown name or bad setting)."""
        return make_loss(self.name, **self.kwargs)

    def __repr__(self) -> str:
        return f"Loss({', '.join([repr(self.name)] + [f'{k}={v!r}' for k, v in self.settings])})"


def as_loss(loss: str | Loss) -> Loss:
    """A stage's ``loss`` / ``head_loss`` field as a :class:`Loss` (a name gets the defaults)."""
    return loss if isinstance(loss, Loss) else Loss(loss)


@dataclass(frozen=True, kw_only=True)
class Stage:
    """Base of every stage: ``name`` (timing / loss / settings key) and ``event`` (callback name)."""

    name: str
    event: str | None = ""

    @property
    def callback_event(self) -> str | None:
        """The name passed to callbacks after this stage, or ``None`` for no callback."""
        return self.name if self.event == "" else self.event

    def settings(self) -> dict[str, Any]:
        """The fields that change the result (every field but ``name`` and ``event``), in order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("name", "event")}


@dataclass(frozen=True, kw_only=True)
class Calibrate(Stage):
    """Initialise the activation quantizers with one forward pass (quantizer percentile/MSE searches).

    Attributes:
        weights: the weights during the activation pass: ``"fp"`` (I&S-ViT stage 1), ``"calibrate"``
            (calibrate the weight quantizers first and quantize with them: QDrop, RepQ-ViT) or
            ``"quantized"`` (keep the current, already calibrated weight quantizers, e.g. BRECQ's
            activation pass after AdaRound).
        images: the first ``images`` calibration images are used; ``None``: all of them.
    """

    name: str = "calibrate"
    event: str | None = "calibrated"
    weights: str = "fp"
    images: int | None = 256


@dataclass(frozen=True, kw_only=True)
class Reconstruct(Stage):
    """Block/layer-wise reconstruction of every unit in forward order against FP-teacher outputs.

    Attributes:
        inputs: ``"fp"`` (the FP teacher's unit inputs: units learn independently), ``"quantized"``
            (the current quantized model's: sequential, BRECQ style) or :class:`Mix`.
        weights: ``"fp"`` (weight quantization off) or ``"quantized"`` (on; needs calibrated weight
            quantizers: :class:`Calibrate` with ``weights="calibrate"`` or :class:`Requantize` before).
        activations: ``"quantized"`` (needs a :class:`Calibrate` before) or ``"fp"`` (activation
            quantization off: BRECQ's weight pass).
        rounding: ``"ste"`` (latent FP weights trained through the fake quantizer), ``"adaround"`` or
            ``"fixed"`` (weights not trained: only the activation step sizes learn, BRECQ's activation pass).
        loss / loss_p: a registered loss name (:data:`LOSSES`) or a :class:`Loss` with settings:
            ``"mse"`` (squared error summed over the token axis), ``"lp"`` (``|error| ** loss_p``), the
            Hessian / Fisher losses (``"fisher_diag"``, ``"hessian_perturb"``, ``"fisher_dplr"``: the
            engine computes the task-loss gradients they need, :mod:`isvit_viz.calib.task_grads`) or
            ``"kl_div"``. ``loss_p`` applies to ``"lp"`` only.
        head_loss: the loss of the classifier-head units (``head``, ``head.fc``, ``head_dist``);
            ``None``: the same as ``loss``. APHQ-ViT and FIMA-Q use ``"kl_div"``.
        iters / batch_size / lr: Adam steps per unit, mini-batch, learning rate of STE weights; ``None``
            takes the run default (``quantize()``: 1000 steps, 200 at >= 6-bit activations; batch 64;
            lr 4e-5). ``quantize(iters=..., batch_size=..., lr=...)`` given explicitly overrides every
            stage (one matched budget for all methods).
        act_drop_prob: QDrop: probability that an element of a quantized activation stays FP.
        act_scale_lr: ``None``: activation step sizes stay fixed (I&S-ViT). A number: Adam learning
            rate of the uniform activation quantizers' step sizes (LSQ, QDrop: 4e-5, BRECQ: 4e-4).
        act_scale_grad_scale: multiply the step-size gradient by LSQ's ``1 / sqrt(N * Qp)`` (QDrop) or
            not (BRECQ).
    """

    name: str = "reconstruct"
    inputs: str | Mix = "quantized"
    weights: str = "quantized"
    activations: str = "quantized"
    rounding: str = "ste"
    loss: str | Loss = "mse"
    loss_p: float = 2.0
    head_loss: str | Loss | None = None
    iters: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    act_drop_prob: float = 0.0
    act_scale_lr: float | None = None
    act_scale_grad_scale: bool = True


@dataclass(frozen=True, kw_only=True)
class Reparameterize(Stage):
    """Fold channel-wise post-LayerNorm activation scales into LayerNorm and the next Linear (SOS
    stage 2, RepQ-ViT); the quantizers become per-tensor. Changes the weights, so weight quantizers
    need a :class:`Requantize` afterwards before weights are quantized.

    Attributes:
        zero_point: the layer-wise zero-point: ``"round"`` (integer mean: exact in the quantized
            domain) or ``"mean"`` (fractional mean, paper Eq. 15 and the official code).
    """

    name: str = "reparameterize"
    zero_point: str = "round"


@dataclass(frozen=True, kw_only=True)
class Requantize(Stage):
    """Calibrate every weight quantizer on the current weights and switch weight quantization on
    (activation quantization is left as it is)."""

    name: str = "requantize"


@dataclass(frozen=True, kw_only=True)
class HessianCalibrate(Stage):
    """PTQ4ViT's Hessian-guided search of every weight and activation step
    (:func:`isvit_viz.calib.hessian.hessian_calibrate`); leaves both quantizations on.

    Needs PTQ4ViT's placement (layer-wise post-LN, uniform or PTQ4ViT twin-uniform inputs) and must
    not be followed by a stage that recalibrates (it would overwrite the searched steps).

    Attributes:
        images: the first ``images`` calibration images (PTQ4ViT: 32); ``None``: all of them.
        candidates / rounds: step candidates per search and weight/input alternations (PTQ4ViT: 100, 3).
    """

    name: str = "hessian"
    event: str | None = "calibrated"
    images: int | None = 32
    candidates: int = 100
    rounds: int = 3


@dataclass(frozen=True, kw_only=True)
class ReluMLP(Stage):
    """APHQ-ViT's MLP reconstruction (:mod:`isvit_viz.calib.mlp_recon`): before any calibration, train
    fc1 / fc2 of every block MLP, which computes with a ReLU (placement ``mlp_act="relu"``), to
    reproduce the FP GELU MLP, each on FP data. Quantization is off during the stage.

    Attributes:
        iters / batch_size / lr: Adam steps per MLP, mini-batch, learning rate (cosine to 0);
            ``quantize(iters=..., batch_size=...)`` given explicitly override them (matched budget).
        clamp_weight: weight of the loss with fc2's input clamped to [0, ub].
        clamp_pct: quantile of the positive FP GELU outputs that sets ub; ``None``: 0.99 at <= 3-bit
            activations, else 0.98 (APHQ-ViT's 3-bit and 4-bit configs).
        eps / temperature: the perturbation and KL temperature of the Hessian weight.
    """

    name: str = "mlp_recon"
    event: str | None = None
    iters: int = 20000
    batch_size: int = 32
    lr: float = 4e-5
    clamp_weight: float = 2.0
    clamp_pct: float | None = None
    eps: float = 1e-6
    temperature: float = 20.0


@dataclass(frozen=True, kw_only=True)
class ChooseSoftmax(Stage):
    """Give every attention the post-softmax quantizer with the lowest attention-output error among
    ``candidates`` (:func:`isvit_viz.calib.choose.choose_softmax_quantizers`); needs calibrated
    activations. The choices are recorded per attention (``unit_losses``, ``quant_config.softmax_layers``).

    Attributes:
        candidates: quantizer names (:data:`isvit_viz.quant.config.SOFTMAX_QUANTIZERS`); the method's own
            ``softmax`` keeps its ``softmax_kwargs``.
        images: the first ``images`` calibration images; ``None``: all of them.
    """

    name: str = "choose_softmax"
    event: str | None = None
    candidates: tuple[str, ...] = ("sulq", "uniform", "logsqrt2")
    images: int | None = 256


def stage_dict(stage: Stage) -> dict[str, Any]:
    """JSON-ready description of a stage: ``{"stage": class name, "name": ..., "event": ..., **settings}``."""
    out: dict[str, Any] = {"stage": type(stage).__name__, "name": stage.name, "event": stage.event}
    for key, val in stage.settings().items():
        if isinstance(val, Mix):
            val = {"mix": val.p}
        elif isinstance(val, Loss):
            val = {"loss": val.name, **val.kwargs}
        out[key] = val
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")


class _StageChecker:
    """Walks the stages in order, tracking what is calibrated, and raises on the first bad one."""

    def __init__(self, channel_post_ln: bool, relu_mlp: bool = False) -> None:
        self.channel_post_ln = channel_post_ln
        self.relu_mlp = relu_mlp
        self.acts_calibrated = False
        self.weights_calibrated = False  # and still valid for the current weights
        self.hessian = False
        self.where = ""

    def fail(self, field: str, why: str) -> ValueError:
        return ValueError(f"{self.where}: {field}: {why}")

    def check(self, i: int, stage: Any) -> None:
        if not isinstance(stage, Stage):
            raise ValueError(f"stages[{i}]: {stage!r} is not a stage (Calibrate, Reconstruct, Reparameterize, Requantize, "
                             "HessianCalibrate)")  # fmt: skip
        self.where = f"stages[{i}] ({type(stage).__name__} {stage.name!r})"
        if not isinstance(stage.name, str) or not stage.name:
            raise self.fail("name", f"must be a non-empty string, got {stage.name!r}")
        if stage.event is not None and not isinstance(stage.event, str):
            raise self.fail("event", f"must be a string or None, got {stage.event!r}")
        for kind, check in ((Calibrate, self._calibrate), (Reconstruct, self._reconstruct),
                            (Reparameterize, self._reparameterize), (Requantize, self._requantize),
                            (HessianCalibrate, self._hessian), (ChooseSoftmax, self._choose),
                            (ReluMLP, self._relu_mlp)):  # fmt: skip
            if isinstance(stage, kind):
                check(stage)

    def _images(self, images: Any) -> None:
        if images is not None and not (_is_int(images) and images >= 1):
            raise self.fail("images", f"must be None or an int >= 1, got {images!r}")

    def _calibrate(self, s: Calibrate) -> None:
        if self.hessian:
            raise self.fail("stage order", "Calibrate after HessianCalibrate would overwrite the searched steps")
        if s.weights not in CALIBRATE_WEIGHTS:
            raise self.fail("weights", f"must be one of {CALIBRATE_WEIGHTS}, got {s.weights!r}")
        if s.weights == "quantized" and not self.weights_calibrated:
            raise self.fail("weights", "'quantized' needs calibrated weight quantizers: a Requantize stage before "
                                       "(after any Reparameterize), or weights='calibrate'")  # fmt: skip
        self._images(s.images)
        self.acts_calibrated = True
        self.weights_calibrated = self.weights_calibrated or s.weights == "calibrate"

    def _hessian(self, s: HessianCalibrate) -> None:
        self._images(s.images)
        for name in ("candidates", "rounds"):
            if not (_is_int(getattr(s, name)) and getattr(s, name) >= 1):
                raise self.fail(name, f"must be an int >= 1, got {getattr(s, name)!r}")
        if self.acts_calibrated or self.weights_calibrated:
            raise self.fail("stage order", "HessianCalibrate searches every quantizer itself; it must be the first "
                                           "calibrating stage")  # fmt: skip
        self.acts_calibrated = self.weights_calibrated = True
        self.hessian = True

    def _reconstruct(self, s: Reconstruct) -> None:
        if s.activations not in ACTIVATIONS:
            raise self.fail("activations", f"must be one of {ACTIVATIONS}, got {s.activations!r}")
        if s.activations == "quantized" and not self.acts_calibrated:
            raise self.fail("stage order", "reconstruction before calibration; put a Calibrate stage first "
                                           "(or activations='fp')")  # fmt: skip
        if s.activations == "fp" and s.weights == "fp":
            raise self.fail("activations", "with weights='fp' and activations='fp' nothing is quantized")
        if isinstance(s.inputs, Mix):
            p = s.inputs.p
            if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p < 1):
                raise self.fail("inputs", f"Mix(p) needs 0 < p < 1 (p=0 is 'quantized', p=1 is 'fp'), got p={p!r}")
        elif s.inputs not in INPUTS:
            raise self.fail("inputs", f"must be one of {INPUTS} or Mix(p), got {s.inputs!r}")
        if s.weights not in WEIGHTS:
            raise self.fail("weights", f"must be one of {WEIGHTS}, got {s.weights!r}")
        if s.rounding not in ROUNDINGS:
            raise self.fail("rounding", f"unknown rounding {s.rounding!r}; valid: {ROUNDINGS}")
        for key in ("loss", "head_loss"):
            self._loss(key, getattr(s, key))
        if not _positive(s.loss_p) or (s.loss != "lp" and s.loss_p != 2.0):
            raise self.fail("loss_p", f"must be a positive finite number, and 2 unless loss='lp', got {s.loss_p!r}")
        if not isinstance(s.act_scale_grad_scale, bool):
            raise self.fail("act_scale_grad_scale", f"must be True or False, got {s.act_scale_grad_scale!r}")
        if s.iters is not None and not (_is_int(s.iters) and s.iters >= 0):
            raise self.fail("iters", f"must be None or an int >= 0, got {s.iters!r}")
        if s.batch_size is not None and not (_is_int(s.batch_size) and s.batch_size >= 1):
            raise self.fail("batch_size", f"must be None or an int >= 1, got {s.batch_size!r}")
        if s.lr is not None and not _positive(s.lr):
            raise self.fail("lr", f"must be None or a positive finite number, got {s.lr!r}")
        if s.act_scale_lr is not None and not _positive(s.act_scale_lr):
            raise self.fail("act_scale_lr", f"must be None or a positive finite number, got {s.act_scale_lr!r}")
        p = s.act_drop_prob
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1):
            raise self.fail("act_drop_prob", f"must be a probability in [0, 1], got {p!r}")
        if s.weights == "quantized" and not self.weights_calibrated:
            raise self.fail("weights", "'quantized' needs calibrated weight quantizers: a Requantize stage before "
                                       "(after any Reparameterize) or Calibrate(weights='calibrate')")  # fmt: skip
        if s.rounding == "adaround" and s.weights != "quantized":
            raise self.fail("rounding", "'adaround' learns the rounding of quantized weights; it needs weights='quantized'")
        if s.rounding == "fixed" and (s.act_scale_lr is None or s.activations != "quantized"):
            raise self.fail("rounding", "'fixed' trains no weights, so it needs quantized activations whose step "
                                        "sizes learn (activations='quantized', act_scale_lr)")  # fmt: skip

    def _relu_mlp(self, s: ReluMLP) -> None:
        if not self.relu_mlp:
            raise self.fail("mlp_act", "ReluMLP retrains ReLU MLPs; the method's placement must set mlp_act='relu'")
        if self.acts_calibrated or self.weights_calibrated:
            raise self.fail("stage order", "ReluMLP changes the MLP weights and outputs; it must come before any calibration")
        for name in ("iters", "batch_size"):
            if not (_is_int(getattr(s, name)) and getattr(s, name) >= 1):
                raise self.fail(name, f"must be an int >= 1, got {getattr(s, name)!r}")
        for name in ("lr", "eps", "temperature"):
            if not _positive(getattr(s, name)):
                raise self.fail(name, f"must be a positive finite number, got {getattr(s, name)!r}")
        if not (
            isinstance(s.clamp_weight, (int, float))
            and not isinstance(s.clamp_weight, bool)
            and 0 <= s.clamp_weight < float("inf")
        ):
            raise self.fail("clamp_weight", f"must be a finite number >= 0, got {s.clamp_weight!r}")
        p = s.clamp_pct
        if p is not None and not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1):
            raise self.fail("clamp_pct", f"must be None or a quantile in (0, 1], got {p!r}")

    def _choose(self, s: ChooseSoftmax) -> None:
        from ..quant.config import PTQ4VIT_TWIN
        from ..quant.registry import QUANTIZERS

        if not self.acts_calibrated:
            raise self.fail("stage order", "choosing quantizers before calibration; put a Calibrate stage first")
        names = s.candidates
        if isinstance(names, str) or not isinstance(names, (tuple, list)) or not names:
            raise self.fail("candidates", f"must be a non-empty tuple of quantizer names, got {names!r}")
        for n in names:
            if n not in QUANTIZERS and n != PTQ4VIT_TWIN:
                raise self.fail("candidates", f"unknown quantizer {n!r}; valid: {sorted(QUANTIZERS) + [PTQ4VIT_TWIN]}")
        self._images(s.images)

    def _loss(self, key: str, loss: Any) -> None:
        if loss is None and key == "head_loss":
            return
        if not isinstance(loss, (str, Loss)):
            raise self.fail(key, f"must be a loss name or Loss(name, **settings), got {loss!r}")
        if as_loss(loss).name not in LOSS_REGISTRY:  # the live registry: user-registered losses count
            raise self.fail(key, f"unknown loss {as_loss(loss).name!r}; valid: {tuple(LOSS_REGISTRY)}")
        try:
            as_loss(loss).build()
        except (ValueError, TypeError) as e:
            raise self.fail(key, str(e)) from None

    def _reparameterize(self, s: Reparameterize) -> None:
        if not self.acts_calibrated:
            raise self.fail("stage order", "reparameterization before calibration; put a Calibrate stage first")
        if not self.channel_post_ln:
            raise self.fail("post_ln", "Reparameterize folds channel-wise post-LN quantizers, but the method's post_ln "
                                       "and reduction_post_ln are both 'layer'")  # fmt: skip
        if s.zero_point not in ZERO_POINTS:
            raise self.fail("zero_point", f"must be one of {ZERO_POINTS}, got {s.zero_point!r}")
        self.weights_calibrated = False  # the folded weights changed: their quantizers are stale

    def _requantize(self, s: Requantize) -> None:
        if self.hessian:
            raise self.fail("stage order", "Requantize after HessianCalibrate would overwrite the searched weight steps")
        self.weights_calibrated = True


def check_stages(stages: Any, channel_post_ln: bool, relu_mlp: bool = False) -> tuple[Stage, ...]:
    """Validate a stage list (order, every field) before any work; return it as a tuple.

    ``channel_post_ln``: whether the method places any channel-wise post-LN quantizer (what
    :class:`Reparameterize` folds); ``relu_mlp``: whether its MLPs compute with a ReLU (what
    :class:`ReluMLP` retrains).

    Raises:
        ValueError: naming the stage (``stages[i] (Type 'name')``) and the field, for an empty list,
            a reconstruction (with quantized activations) or reparameterization before calibration, a
            recalibration after :class:`HessianCalibrate`, ``Reparameterize`` with
            layer-wise post-LN quantizers, unknown input / weight / loss / rounding names, negative
            iterations, ``Mix(p)`` outside (0, 1), quantized weights without calibrated weight
            quantizers, or two stages repeating one setting key (same name and field).
    """
    if isinstance(stages, (str, bytes, Stage)) or not hasattr(stages, "__iter__"):
        raise ValueError(f"stages must be a list or tuple of stages, got {type(stages).__name__}")
    stages = tuple(stages)
    if not stages:
        raise ValueError("stages: the stage list is empty; a method needs at least a Calibrate stage")
    checker = _StageChecker(channel_post_ln, relu_mlp)
    seen: dict[str, int] = {}
    for i, stage in enumerate(stages):
        checker.check(i, stage)
        for key in stage.settings():
            full = f"{stage.name}.{key}"
            if full in seen:
                raise checker.fail("name", f"setting {full!r} repeats stages[{seen[full]}]; give the stage another name")
            seen[full] = i
    return stages
