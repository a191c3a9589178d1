"""Per-quantizer sensitivity of any fake-quantized model from :func:`isvit_viz.quantize`.

Which quantizer costs the accuracy? Every quantizer module the model's forward pass calls is switched
on or off individually (a bypassed quantizer returns its input unchanged; the module switches
``weight_quant`` / ``act_quant`` are left as the model has them) and the model's logits are compared
with the FP model's on streamed evaluation data.

Definitions (all over the same N evaluation images; ``z`` are logits [N, classes]):

* **references**: the FP model's logits ``z_fp`` (``fp_model``; without one, the quantized model with
  every quantizer bypassed), and the *self* reference ``z_off``: the quantized model with every
  quantizer bypassed. A reconstructed model (I&S-ViT, QDrop) has trained weights, so ``z_off`` is not
  the FP function (that floor is ``baseline["all_off"]``) and metrics against ``z_off`` (``*_self``)
  isolate the quantizers' noise; for calibration-only methods (RepQ-ViT: reparameterization is exact)
  both references agree up to float round-off.
* **SQNR** of a configuration: ``10 log10(sum z_fp^2 / sum (z - z_fp)^2)`` in dB over all images and
  classes (``None`` when the error is exactly 0); ``sqnr_self_db`` the same with ``z_off``.
* **KL**: mean over images of ``KL(softmax(z_fp) || softmax(z))`` in nats (``kl_self``: with ``z_off``);
  **agree**: share of images whose top-1 equals the FP top-1; **top1**: accuracy against the labels
  when the data carry them.
* per quantizer q (forward order = the order of first calls in one forward pass):

  - ``*_on`` / **local**: only q on, every other quantizer off; ``sqnr_local_db`` is its logit SQNR
    (``sqnr_local_self_db``, ``kl_on_self``: against ``z_off``);
  - ``*_off``: every quantizer on except q (the task-level effect of switching q alone off);
  - ``*_cum`` / **cumulative**: q and every quantizer before it in forward order on, the rest off;
  - ``tensor_sqnr_local_db``: SQNR of q's own output against its input when everything before it is
    off (the quantizer's noise on clean data); ``tensor_sqnr_cum_db``: SQNR of q's output with every
    quantizer on against q's input with every quantizer off (the error accumulated at that point).
    For a weight quantizer both are the SQNR of the quantized weight.

* grouped views: the same on/off measurements for whole groups (``post_softmax``: the P operand of
  P @ V; ``post_ln``: qkv and fc1 inputs; ``post_gelu``: fc2 inputs; ``other_act``: Q, K, V and the
  inputs of proj, head and Swin reductions; ``weight``: all weights) and for whole blocks
  (reconstruction units: patch embedding, each transformer block, Swin reductions, head).

Bit-width changes (:func:`precision_override`, :func:`bitwidth_sweep`, the mixed-precision search)
recalibrate only the quantizers whose bit-width changes, with the calibration code of
:func:`isvit_viz.quant.wrap.calibrate_activations` (one forward pass of ``calib`` images; each
quantizer fits on the input it sees there) and ``Quantizer.calibrate`` on the weight for weights.

Long runs are resumable: with ``checkpoint=path`` every finished measurement is written to a JSON
file and skipped on rerun (the file is tied to the model state, the quantizer bit-widths and the
evaluation data by a fingerprint; a mismatch raises ``ValueError``). Memory: the FP and all-off logits
[N, classes] plus one batch (the tensor-SQNR pass keeps every quantizer's input of one batch).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..quant.base import Quantizer, check_bits
from ..quant.modules import QuantMatMul
from ..quant.wrap import POST_LN_LINEARS
from ..utils import atomic_write_json, resolve_device

#: Quantizer groups, in display order, with their labels.
GROUPS: dict[str, str] = {
    "post_softmax": "post-softmax (P of P@V)",
    "post_ln": "post-LayerNorm (qkv/fc1 input)",
    "post_gelu": "post-GELU (fc2 input)",
    "other_act": "other activations (Q, K, V, proj/head input)",
    "weight": "weights",
}
#: Per-quantizer metrics where a larger value means a more harmful quantizer (for the others a smaller
#: value does). Switching a harmful quantizer alone *off* lowers KL and raises SQNR and agreement.
HIGHER_IS_WORSE = ("kl_on", "kl_on_self", "kl_cum", "kl_cum_self", "kl_off_recovery", "sqnr_off_db", "agree_off", "top1_off")
_ATTRS = ("input_quantizer", "weight_quantizer", "quantizer_a", "quantizer_b")
_MM_ROLE = {("matmul1", "quantizer_a"): "q", ("matmul1", "quantizer_b"): "k",
            ("matmul2", "quantizer_a"): "softmax", ("matmul2", "quantizer_b"): "v"}  # fmt: skip
CHECKPOINT_FORMAT = 2


# ----------------------------------------------------------------------------- quantizer enumeration
@dataclass(frozen=True)
class QuantizerInfo:
    """One quantizer as the analysis sees it.

    Attributes:
        name: qualified module name, e.g. ``blocks.3.mlp.fc2.input_quantizer``.
        index: position in forward order (0 = first called).
        kind: ``"weight"`` or ``"act"``.
        group: a key of :data:`GROUPS`.
        role: short role inside its block: ``qkv.in``, ``qkv.w``, ``q``, ``k``, ``softmax``, ``v``,
            ``proj.in``, ``fc1.in``, ``fc2.w``, ``head.in``, ``patch_embed.w``...
        block: reconstruction unit holding it (``patch_embed``, ``blocks.3``, ``head``...).
        type: quantizer class name.
        bits: bit-width.
        elements: elements it quantizes per image (activations) or in total (weights).
    """

    name: str
    index: int
    kind: str
    group: str
    role: str
    block: str
    type: str
    bits: int
    elements: int

    @property
    def label(self) -> str:
        return f"{self.block} {self.role}"


def _attached_quantizers(model: nn.Module) -> dict[str, tuple[Quantizer, nn.Module, str]]:
    """Every quantizer held by a quant module: name -> (quantizer, parent module, attribute)."""
    out = {}
    for pname, mod in model.named_modules():
        for attr in _ATTRS:
            q = getattr(mod, attr, None)
            if isinstance(q, Quantizer):
                out[f"{pname}.{attr}" if pname else attr] = (q, mod, attr)
    return out


def _block_of(name: str, units: Sequence[str]) -> str:
    best = ""
    for u in units:
        if (name.startswith(u + ".") or name == u) and len(u) > len(best):
            best = u
    if best.endswith("patch_embed.proj"):
        return best.rpartition(".")[0]
    return best or name.rpartition(".")[0].rpartition(".")[0] or "model"


def _classify(name: str, parent: nn.Module, attr: str) -> tuple[str, str, str]:
    """(kind, group, role) of one quantizer from where it is attached."""
    pname = name.rpartition(".")[0]
    leaf = pname.rpartition(".")[2]
    if attr == "weight_quantizer":
        short = "patch_embed" if pname.endswith("patch_embed.proj") else leaf
        return "weight", "weight", f"{short}.w"
    if isinstance(parent, QuantMatMul):
        role = _MM_ROLE.get((leaf, attr), f"{leaf}.{attr[-1]}")
        return "act", "post_softmax" if role == "softmax" else "other_act", role
    if leaf in POST_LN_LINEARS:
        return "act", "post_ln", f"{leaf}.in"
    if leaf == "fc2":
        return "act", "post_gelu", "fc2.in"
    return "act", "other_act", f"{leaf}.in"


def _first_batch_images(data: Iterable) -> torch.Tensor:
    for batch in data:
        return _split_batch(batch)[0]
    raise ValueError("evaluation data is empty (no batches)")


@torch.no_grad()
def list_quantizers(model: nn.Module, sample: torch.Tensor) -> list[QuantizerInfo]:
    """The quantizers the model's forward pass calls, in forward order.

    ``sample``: a few input images [B, C, H, W] (one forward pass with the model's current switches
    finds the order and each quantizer's element count). Quantizers whose module switch is off are
    not called and therefore not listed.
    """
    from ..calib.pipeline import reconstruction_units

    attached = _attached_quantizers(model)
    if not attached:
        raise ValueError("model has no quantizers: pass a model returned by isvit_viz.quantize(...)")
    order: list[str] = []
    elems: dict[str, int] = {}
    batch = int(sample.shape[0])

    def hook(name: str, kind: str):
        def fn(_mod: nn.Module, args: tuple) -> None:
            if name not in elems:
                order.append(name)
                n = args[0].numel()
                elems[name] = n if kind == "weight" else n // batch

        return fn

    handles = []
    kinds = {}
    for name, (q, parent, attr) in attached.items():
        kinds[name] = _classify(name, parent, attr)
        handles.append(q.register_forward_pre_hook(hook(name, kinds[name][0])))
    was_training = model.training
    model.eval()
    try:
        dev = resolve_device(None, model)
        model(sample.to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not order:
        raise ValueError("no quantizer is switched on in this model (see isvit_viz.quant.wrap.set_quant_state)")
    units = [u for u, _, _ in reconstruction_units(model)]
    infos = []
    for i, name in enumerate(order):
        q, parent, attr = attached[name]
        kind, group, role = kinds[name]
        infos.append(
            QuantizerInfo(name, i, kind, group, role, _block_of(name, units), type(q).__name__, int(q.bits), elems[name])
        )
    return infos


# ----------------------------------------------------------------------------- switching and precision
def _bypass(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


@contextmanager
def quantizers_enabled(model: nn.Module, on: Iterable[str] | None) -> Iterator[None]:
    """Inside the block only the quantizers named in ``on`` quantize; every other one returns its input.

    ``on=None`` leaves every quantizer on (the model as given). Module switches are not touched, so a
    quantizer whose module is switched off stays off. Nests; restores on exit (also on errors).
    """
    if on is None:
        yield
        return
    attached = _attached_quantizers(model)
    on = set(on)
    unknown = sorted(on - set(attached))
    if unknown:
        raise ValueError(
            f"unknown quantizer names {unknown[:5]}{'...' if len(unknown) > 5 else ''}; see list_quantizers(model, x)"
        )
    saved = []
    for name, (q, _, _) in attached.items():
        if name not in on:
            saved.append((q, q.__dict__.get("forward")))
            q.forward = _bypass  # instance attribute: nn.Module.__call__ dispatches to it
    try:
        yield
    finally:
        for q, prev in saved:
            if prev is None:
                q.__dict__.pop("forward", None)
            else:
                q.forward = prev


def _set_bits_and_recalibrate(model: nn.Module, bits: Mapping[str, int], calib: torch.Tensor | None) -> None:
    attached = _attached_quantizers(model)
    unknown = sorted(set(bits) - set(attached))
    if unknown:
        raise ValueError(f"unknown quantizer names {unknown[:5]}; see list_quantizers(model, x)")
    changed = {n: check_bits(int(b)) for n, b in bits.items() if int(b) != attached[n][0].bits}
    acts = [n for n in changed if attached[n][2] != "weight_quantizer"]
    if acts and calib is None:
        raise ValueError(f"changing the bit-width of activation quantizers {acts[:3]} needs calib images to recalibrate them")
    with torch.no_grad():
        for n, b in changed.items():
            q, parent, attr = attached[n]
            q.bits = b
            if attr == "weight_quantizer":
                q.calibrate(parent.weight.detach())
        if acts:
            for n in acts:
                attached[n][0].calibrate_on_next_forward = True
            was_training = model.training
            model.eval()
            try:
                model(calib.to(resolve_device(None, model)))
            finally:
                model.train(was_training)
                missed = [n for n in acts if attached[n][0].calibrate_on_next_forward]
                for n in acts:
                    attached[n][0].calibrate_on_next_forward = False
            if missed:
                raise ValueError(f"quantizers {missed[:3]} were not reached in the calibration pass (switched off or bypassed)")


@contextmanager
def precision_override(model: nn.Module, bits: Mapping[str, int], calib: torch.Tensor | None = None) -> Iterator[None]:
    """Temporarily give quantizers new bit-widths: ``bits`` maps quantizer names to bit-widths.

    Only quantizers whose bit-width changes are recalibrated (see the module docstring); the others
    keep their state (including learned or reconstructed parameters). ``calib``: images [N, C, H, W]
    for the activation quantizers' calibration pass, run with the current on/off state. Restores
    bit-widths and calibrated state exactly on exit.
    """
    attached = _attached_quantizers(model)
    saved = {}
    for n in bits:
        if n in attached:
            q = attached[n][0]
            saved[n] = (q.bits, {k: v.clone() for k, v in q.state_dict().items()})
    try:
        _set_bits_and_recalibrate(model, bits, calib)
        yield
    finally:
        for n, (b, state) in saved.items():
            q = attached[n][0]
            q.bits = b
            q.load_state_dict(state)


def apply_precision(model: nn.Module, bits: Mapping[str, int], calib: torch.Tensor | None = None) -> nn.Module:
    """Permanently set bit-widths (e.g. a mixed-precision proposal) with the same recalibration as
    :func:`precision_override`; returns ``model``. Quantizers not named keep their state."""
    _set_bits_and_recalibrate(model, bits, calib)
    return model


# ----------------------------------------------------------------------------- streaming evaluation
def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    raise ValueError(f"evaluation batches must be image tensors or (images, labels) pairs, got {type(batch).__name__}")


def _as_batches(data: Any, batch_size: int) -> Iterable:
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise ValueError(f"evaluation images must be 4-D [N, C, H, W], got shape {tuple(data.shape)}")
        return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, Path)):
        raise ValueError(f"data must be a DataLoader / list of batches or an image tensor, got {type(data).__name__}")
    if iter(data) is data:
        raise ValueError("data must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator/generator")
    return data


def _sqnr_db(signal: float, noise: float) -> float | None:
    if noise <= 0:
        return None
    if signal <= 0:
        return -math.inf if noise > 0 else None
    return 10.0 * math.log10(signal / noise)


def _kl_sum(ref: torch.Tensor, q: torch.Tensor) -> float:
    """Sum over rows of KL(softmax(ref) || softmax(q)) (float64 logits [B, classes])."""
    p_log, q_log = torch.log_softmax(ref, 1), torch.log_softmax(q, 1)
    return float((p_log.exp() * (p_log - q_log)).sum(1).sum())


class _LogitStats:
    """Streamed logit metrics against the FP reference and against the model with all quantizers off."""

    def __init__(self) -> None:
        self.sig = self.err = self.kl = self.sig_self = self.err_self = self.kl_self = 0.0
        self.agree = self.correct = self.n = 0
        self.labelled = True

    def add(self, fp: torch.Tensor, q: torch.Tensor, y: torch.Tensor | None, off: torch.Tensor) -> None:
        fp, q, off = fp.double(), q.double(), off.double()
        self.sig += float(fp.square().sum())
        self.err += float((q - fp).square().sum())
        self.kl += _kl_sum(fp, q)
        self.sig_self += float(off.square().sum())
        self.err_self += float((q - off).square().sum())
        self.kl_self += _kl_sum(off, q)
        self.agree += int((fp.argmax(1) == q.argmax(1)).sum())
        if y is None:
            self.labelled = False
        else:
            self.correct += int((q.argmax(1) == y).sum())
        self.n += fp.shape[0]

    def result(self) -> dict[str, Any]:
        out = {"sqnr_db": _sqnr_db(self.sig, self.err), "kl": self.kl / self.n, "agree": self.agree / self.n, "n": self.n,
               "sqnr_self_db": _sqnr_db(self.sig_self, self.err_self), "kl_self": self.kl_self / self.n}  # fmt: skip
        if self.labelled:
            out["top1"] = self.correct / self.n
        return out


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())


def tensor_digest(t: torch.Tensor) -> str:
    """Short content hash of a tensor (identifies calibration images in checkpoint keys)."""
    h = hashlib.sha1()
    _hash_tensor(h, t)
    return h.hexdigest()[:12]


def _model_digest(model: nn.Module | None) -> str | None:
    if model is None:
        return None
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        _hash_tensor(h, v)
    return h.hexdigest()[:16]


class _Store:
    """JSON file of finished measurements (``checkpoint``), or an in-memory dict without one."""

    def __init__(self, path: str | Path | None, fingerprint: dict[str, Any]) -> None:
        self.path = None if path is None else Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.results: dict[str, Any] = {}
        if self.path is not None and self.path.is_file():
            try:
                payload = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read sensitivity checkpoint {self.path}: {e}") from e
            if payload.get("format") != CHECKPOINT_FORMAT or payload.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"sensitivity checkpoint {self.path} was written for another model, bit-width setting or evaluation data; "
                    "use another checkpoint path (or delete it)"
                )
            self.results = payload["results"]

    def __contains__(self, key: str) -> bool:
        return key in self.results

    def __getitem__(self, key: str) -> Any:
        return self.results[key]

    def put(self, key: str, value: Any) -> None:
        self.results[key] = value
        if self.path is not None:
            atomic_write_json(self.path, {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "results": self.results})


class StreamingEvaluator:
    """Metrics of quantizer configurations of one model against FP logits computed once.

    Args:
        model: a fake-quantized model (quantization switched on), e.g. ``quantize(...).model``.
        data: evaluation data: a re-iterable of image batches or (images, labels) batches (DataLoader,
            list), or an image tensor [N, C, H, W] (split into batches of ``batch_size``). It is
            streamed once per measurement; only logits are kept.
        fp_model: the FP model (reference logits); ``None`` uses ``model`` with every quantizer off.
        device: where the models run (default: the model's device).
        checkpoint: JSON file of finished measurements (resume; see the module docstring).
        progress: tqdm progress bars.

    Attributes:
        quantizers: :class:`QuantizerInfo` list in forward order; ``fp_logits`` [N, classes] (CPU).
        The all-off logits (the self reference) are computed once too.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        fp_model: nn.Module | None = None,
        device: str | torch.device | None = None,
        checkpoint: str | Path | None = None,
        progress: bool = True,
        batch_size: int = 64,
    ) -> None:
        self.model, self.fp_model, self.progress = model, fp_model, progress
        self.device = resolve_device(device, model)
        self.data = _as_batches(data, batch_size)
        self.quantizers = list_quantizers(model, _first_batch_images(self.data)[:2])
        self.names = [q.name for q in self.quantizers]
        self._memo: dict[Any, dict[str, Any]] = {}
        h = hashlib.sha1()
        fp, labels = [], []
        self._checksums: list[float] = []
        ref = fp_model if fp_model is not None else model
        with torch.no_grad(), quantizers_enabled(model, set() if fp_model is None else None), self._eval_mode(ref):
            for batch in tqdm(self.data, desc="FP logits", disable=not progress, leave=False):
                x, y = _split_batch(batch)
                _hash_tensor(h, x)
                self._checksums.append(float(x.double().sum()))
                fp.append(ref(x.to(self.device)).float().cpu())
                labels.append(None if y is None else y.cpu())
        if not fp:
            raise ValueError("evaluation data is empty (no batches)")
        self.fp_logits = torch.cat(fp)
        self._fp_batches = fp
        self._off_batches = fp  # the model with every quantizer off: the FP model itself without fp_model
        if fp_model is not None:
            with torch.no_grad(), quantizers_enabled(model, set()), self._eval_mode(model):
                it = zip(self.data, fp)
                self._off_batches = [model(_split_batch(b)[0].to(self.device)).float().cpu() for b, _ in it]
        self._labels = labels
        self.n = int(self.fp_logits.shape[0])
        fingerprint = {
            "model": _model_digest(model),
            "fp_model": _model_digest(fp_model),
            "quantizers": [[q.name, q.type, q.bits] for q in self.quantizers],
            "data": h.hexdigest()[:16],
            "n": self.n,
        }
        self.store = _Store(checkpoint, fingerprint)

    @contextmanager
    def _eval_mode(self, *models: nn.Module) -> Iterator[None]:
        flags = [(m, m.training) for m in models]
        for m, _ in flags:
            m.eval()
        try:
            yield
        finally:
            for m, t in flags:
                m.train(t)

    def _iter(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        for batch, fp, y, checksum, off in zip(self.data, self._fp_batches, self._labels, self._checksums, self._off_batches):
            x, _ = _split_batch(batch)
            if x.shape[0] != fp.shape[0] or float(x.double().sum()) != checksum:
                raise ValueError("the evaluation data changed between passes (shuffled?); pass a DataLoader with a fixed order")
            yield x.to(self.device), fp, y, off

    def _canonical_on(self, on: Iterable[str] | None) -> frozenset[str] | None:
        if on is None:
            return None
        on = frozenset(on)
        return None if on == frozenset(self.names) else on

    def done(self, key: str) -> bool:
        return key in self.store

    def measure(
        self, key: str, on: Iterable[str] | None = None, bits: Mapping[str, int] | None = None, calib: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Logit metrics (``sqnr_db``, ``kl``, ``agree``, ``n``, ``top1`` with labels; ``sqnr_self_db``,
        ``kl_self`` against the all-off model) of one configuration.

        ``on``: quantizers on (others bypassed; ``None`` = all); ``bits``: bit-width overrides
        (recalibrated on ``calib`` inside the ``on`` state). Results are stored under ``key`` (plus the
        calibration images' digest when ``bits`` is given) and read back on reruns.
        """
        on_c = self._canonical_on(on)
        bits = {n: int(b) for n, b in (bits or {}).items() if int(b) != self._bits(n)}
        calib_tag = tensor_digest(calib) if bits and calib is not None else None
        full_key = key + (f"|calib={calib_tag}" if calib_tag else "")
        if full_key in self.store:
            return self.store[full_key]
        memo_key = (on_c, tuple(sorted(bits.items())), calib_tag)
        if memo_key not in self._memo:
            stats = _LogitStats()
            with torch.no_grad(), self._eval_mode(self.model), quantizers_enabled(self.model, on_c):
                with precision_override(self.model, bits, calib):
                    for x, fp, y, off in self._iter():
                        stats.add(fp, self.model(x).float().cpu(), y, off)
            self._memo[memo_key] = stats.result()
        self.store.put(full_key, self._memo[memo_key])
        return self._memo[memo_key]

    def _bits(self, name: str) -> int:
        for q in self.quantizers:
            if q.name == name:
                return q.bits
        raise ValueError(f"unknown quantizer {name!r}; see evaluator.quantizers")

    def tensor_sqnr(self, key: str = "tensor") -> dict[str, dict[str, float | None]]:
        """Per quantizer ``{"local_db", "cum_db"}``: tensor-level SQNR (see the module docstring)."""
        if key in self.store:
            return self.store[key]
        attached = _attached_quantizers(self.model)
        names = self.names
        sig = dict.fromkeys(names, 0.0)
        err_local = dict.fromkeys(names, 0.0)
        err_cum = dict.fromkeys(names, 0.0)
        ref: dict[str, torch.Tensor] = {}

        def off_hook(name: str, q: Quantizer):
            def fn(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
                if name in ref:
                    return
                x = args[0].detach()
                ref[name] = x
                xd = x.double()
                sig[name] += float(xd.square().sum())
                err_local[name] += float((type(q).forward(q, x).double() - xd).square().sum())

            return fn

        def on_hook(name: str):
            def fn(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
                if name in ref:
                    err_cum[name] += float((out.detach().double() - ref.pop(name).double()).square().sum())

            return fn

        with torch.no_grad(), self._eval_mode(self.model):
            for x, *_ in tqdm(list(self._iter()), desc="tensor SQNR", disable=not self.progress, leave=False):
                ref.clear()
                hs = [attached[n][0].register_forward_hook(off_hook(n, attached[n][0])) for n in names]
                try:
                    with quantizers_enabled(self.model, set()):
                        self.model(x)
                finally:
                    for h in hs:
                        h.remove()
                hs = [attached[n][0].register_forward_hook(on_hook(n)) for n in names]
                try:
                    self.model(x)
                finally:
                    for h in hs:
                        h.remove()
        out = {n: {"local_db": _sqnr_db(sig[n], err_local[n]), "cum_db": _sqnr_db(sig[n], err_cum[n])} for n in names}
        self.store.put(key, out)
        return out


# ----------------------------------------------------------------------------- the analysis
@dataclass
class SensitivityReport:
    """Result of :func:`analyze_sensitivity` (JSON round-trip via :meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        quantizers: :class:`QuantizerInfo` in forward order.
        rows: one dict per quantizer (same order): ``name``, ``label``, ``group``, ``block``, ``role``,
            ``bits`` and the metrics ``sqnr_local_db``, ``kl_on``, ``agree_on``, ``sqnr_local_self_db``,
            ``kl_on_self``, ``sqnr_off_db``,
            ``kl_off``, ``agree_off``, ``kl_off_recovery`` (KL with all on minus ``kl_off``),
            ``sqnr_cum_db``, ``kl_cum``, ``agree_cum``, ``sqnr_cum_self_db``, ``tensor_sqnr_local_db``,
            ``tensor_sqnr_cum_db`` (and ``top1_on`` / ``top1_off`` with labels); missing
            measurements are absent.
        baseline: logit metrics of ``all_on`` (the quantized model) and ``all_off``.
        groups / blocks: measured views, one dict per group or block: ``n_quantizers`` and the
            metrics with only that group on (``*_on``) and with only that group off (``*_off``).
        settings: n images, reference, measurements done.
    """

    quantizers: list[QuantizerInfo]
    rows: list[dict[str, Any]]
    baseline: dict[str, dict[str, Any]]
    groups: list[dict[str, Any]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def worst(self, k: int = 10, by: str = "kl_on_self") -> list[dict[str, Any]]:
        """The ``k`` most harmful quantizers by metric ``by`` (default: KL of the model with only that
        quantizer on against the same model with every quantizer off), worst first: KL largest first,
        SQNR/agreement smallest first (see :data:`HIGHER_IS_WORSE` for the "alone off" metrics);
        ``None`` SQNR (exact) counts as best. Each row gets its ``rank`` (1 = worst)."""
        rows = [r for r in self.rows if by in r]
        if not rows:
            raise ValueError(
                f"metric {by!r} was not measured; available: {sorted(k for k in self.rows[0] if k not in _INFO_KEYS)}"
            )
        worse_high = by in HIGHER_IS_WORSE

        def score(r: dict[str, Any]) -> float:
            v = r[by]
            v = math.inf if v is None else v
            return -v if worse_high else v

        ranked = sorted(rows, key=lambda r: (score(r), r["index"]))[:k]
        return [{"rank": i + 1, **r} for i, r in enumerate(ranked)]

    def aggregate(self, metric: str = "kl_on", by: str = "group", reduce: str = "sum") -> list[dict[str, Any]]:
        """Per-quantizer ``metric`` aggregated over ``by`` (``group``, ``block`` or ``role``) with
        ``reduce`` (``sum``, ``max``, ``min``, ``mean``); rows in display order."""
        if by not in ("group", "block", "role"):
            raise ValueError(f"by must be 'group', 'block' or 'role', got {by!r}")
        fns = {"sum": sum, "max": max, "min": min, "mean": lambda v: sum(v) / len(v)}
        if reduce not in fns:
            raise ValueError(f"reduce must be one of {sorted(fns)}, got {reduce!r}")
        keys: dict[str, list[float]] = {}
        for r in self.rows:
            if r.get(metric) is not None:
                keys.setdefault(r[by], []).append(r[metric])
        order = list(GROUPS) if by == "group" else list(dict.fromkeys(r[by] for r in self.rows))
        return [{by: k, "n": len(keys[k]), metric: fns[reduce](keys[k])} for k in order if k in keys]

    def block_group_matrix(
        self, metric: str = "kl_on_self", reduce: str = "sum"
    ) -> tuple[list[str], list[str], list[list[float | None]]]:
        """(blocks, groups, Z) with ``Z[i][j]`` = ``reduce`` of ``metric`` over the quantizers of block i
        and group j (``None`` where the cell has no quantizer): the data of the heatmap."""
        blocks = list(dict.fromkeys(r["block"] for r in self.rows))
        groups = [g for g in GROUPS if any(r["group"] == g for r in self.rows)]
        fns = {"sum": sum, "max": max, "min": min, "mean": lambda v: sum(v) / len(v)}
        Z: list[list[float | None]] = []
        for b in blocks:
            row = []
            for g in groups:
                vals = [r[metric] for r in self.rows if r["block"] == b and r["group"] == g and r.get(metric) is not None]
                row.append(fns[reduce](vals) if vals else None)
            Z.append(row)
        return blocks, groups, Z

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantizers": [asdict(q) for q in self.quantizers],
            "rows": self.rows,
            "baseline": self.baseline,
            "groups": self.groups,
            "blocks": self.blocks,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensitivityReport:
        return cls(
            [QuantizerInfo(**q) for q in d["quantizers"]],
            list(d["rows"]),
            dict(d["baseline"]),
            list(d.get("groups", [])),
            list(d.get("blocks", [])),
            dict(d.get("settings", {})),
        )


_INFO_KEYS = ("name", "label", "index", "kind", "group", "role", "block", "type", "bits", "elements")
MEASUREMENTS = ("on", "off", "cum", "tensor", "groups", "blocks")


def _prefixed(m: dict[str, Any], suffix: str) -> dict[str, Any]:
    out = {f"sqnr_{suffix}_db": m["sqnr_db"], f"kl_{suffix}": m["kl"], f"agree_{suffix}": m["agree"],
           f"sqnr_{suffix}_self_db": m["sqnr_self_db"], f"kl_{suffix}_self": m["kl_self"]}  # fmt: skip
    if "top1" in m:
        out[f"top1_{suffix}"] = m["top1"]
    return out


def analyze_sensitivity(
    model: nn.Module | StreamingEvaluator,
    data: Any = None,
    fp_model: nn.Module | None = None,
    measure: Sequence[str] = MEASUREMENTS,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SensitivityReport:
    """Per-quantizer and grouped sensitivity of a quantized model (definitions: module docstring).

    Args:
        model: a quantized model (any method), or a :class:`StreamingEvaluator` built on one (then
            ``data``, ``fp_model``, ``checkpoint`` and ``device`` are taken from it).
        data: evaluation batches (see :class:`StreamingEvaluator`).
        fp_model: FP reference model (strongly recommended; default: the model with all quantizers off).
        measure: any of ``on`` (local), ``off``, ``cum`` (cumulative), ``tensor``, ``groups``,
            ``blocks``. Passes over the data: 2 (FP, all off) + 2 + one per quantizer for each of on/off/cum
            (cum skips its first and last, equal to on / all-on) + 2 for tensor + 2 per group/block.
        checkpoint: JSON file of finished measurements; a rerun skips them.
        progress: one tqdm bar over the measurements.
    """
    bad = sorted(set(measure) - set(MEASUREMENTS))
    if bad:
        raise ValueError(f"unknown measurements {bad}; choose from {MEASUREMENTS}")
    ev = (
        model
        if isinstance(model, StreamingEvaluator)
        else StreamingEvaluator(model, data, fp_model, device, checkpoint, progress)
    )
    infos, names = ev.quantizers, ev.names
    groups = [g for g in GROUPS if any(q.group == g for q in infos)]
    blocks = list(dict.fromkeys(q.block for q in infos))
    plan: list[tuple[str, Any]] = [("all_on", None), ("all_off", set())]
    for i, n in enumerate(names):
        if "on" in measure:
            plan.append((f"on|{n}", {n}))
        if "off" in measure:
            plan.append((f"off|{n}", set(names) - {n}))
        if "cum" in measure:
            plan.append((f"cum|{n}", set(names[: i + 1])))
    for kind, keys, attr in (("groups", groups, "group"), ("blocks", blocks, "block")):
        if kind in measure:
            for k in keys:
                members = {q.name for q in infos if getattr(q, attr) == k}
                plan += [(f"{attr}_on|{k}", members), (f"{attr}_off|{k}", set(names) - members)]
    if "tensor" in measure:
        plan.append(("tensor", "tensor"))
    todo = sum(not ev.done(k) for k, _ in plan)
    results: dict[str, Any] = {}
    with tqdm(total=len(plan), initial=len(plan) - todo, desc="sensitivity", disable=not ev.progress) as bar:
        for key, on in plan:
            bar.set_postfix_str(key[-48:], refresh=False)
            results[key] = ev.tensor_sqnr() if on == "tensor" else ev.measure(key, on)
            bar.update(1)
    all_on = results["all_on"]
    rows = []
    for q in infos:
        row: dict[str, Any] = {**asdict(q), "label": q.label}
        if "on" in measure:
            m = results[f"on|{q.name}"]
            row.update({"sqnr_local_db": m["sqnr_db"], "kl_on": m["kl"], "agree_on": m["agree"],
                        "sqnr_local_self_db": m["sqnr_self_db"], "kl_on_self": m["kl_self"]})  # fmt: skip
            if "top1" in m:
                row["top1_on"] = m["top1"]
        if "off" in measure:
            row.update(_prefixed(results[f"off|{q.name}"], "off"))
            row["kl_off_recovery"] = all_on["kl"] - row["kl_off"]
        if "cum" in measure:
            row.update(_prefixed(results[f"cum|{q.name}"], "cum"))
        if "tensor" in measure:
            t = results["tensor"][q.name]
            row.update({"tensor_sqnr_local_db": t["local_db"], "tensor_sqnr_cum_db": t["cum_db"]})
        rows.append(row)
    views: dict[str, list[dict[str, Any]]] = {"groups": [], "blocks": []}
    for kind, keys, attr in (("groups", groups, "group"), ("blocks", blocks, "block")):
        if kind in measure:
            for k in keys:
                views[kind].append({attr: k, "n_quantizers": sum(getattr(q, attr) == k for q in infos),
                                    **_prefixed(results[f"{attr}_on|{k}"], "on"), **_prefixed(results[f"{attr}_off|{k}"], "off")})  # fmt: skip
    settings = {"n_images": ev.n, "reference": "fp_model" if ev.fp_model is not None else "all quantizers off",
                "measure": list(measure), "n_quantizers": len(infos)}  # fmt: skip
    return SensitivityReport(
        list(infos), rows, {"all_on": all_on, "all_off": results["all_off"]}, views["groups"], views["blocks"], settings
    )


# ----------------------------------------------------------------------------- bit-width sweeps
def bitwidth_sweep(
    model: nn.Module | StreamingEvaluator,
    data: Any = None,
    calib: torch.Tensor | None = None,
    bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    by: str = "group",
    fp_model: nn.Module | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Metrics of the model with one group of quantizers set to ``b`` bits (recalibrated on ``calib``),
    all others as quantized, for every group and every ``b`` in ``bits``.

    ``by``: ``"group"`` (the :data:`GROUPS`), ``"block"`` or ``"cell"`` (block x group). A group whose
    quantizers already have ``b`` bits is the quantized model itself (no recalibration). Returns rows
    ``{"group"/"block", "bits", "n_quantizers", "sqnr_db", "kl", "agree", ("top1")}``.
    """
    if by not in ("group", "block", "cell"):
        raise ValueError(f"by must be 'group', 'block' or 'cell', got {by!r}")
    bits = [check_bits(int(b)) for b in bits]
    ev = (
        model
        if isinstance(model, StreamingEvaluator)
        else StreamingEvaluator(model, data, fp_model, device, checkpoint, progress)
    )
    if calib is None:
        raise ValueError("bitwidth_sweep needs calib images [N, C, H, W] to recalibrate the swept quantizers")
    cells: dict[tuple[str, ...], list[str]] = {}
    for q in ev.quantizers:
        key = (q.group,) if by == "group" else (q.block,) if by == "block" else (q.block, q.group)
        cells.setdefault(key, []).append(q.name)
    if by == "group":
        cells = {(g,): cells[(g,)] for g in GROUPS if (g,) in cells}
    plan = [(c, b) for c in cells for b in bits]
    rows = []
    with tqdm(total=len(plan), desc=f"bit sweep by {by}", disable=not ev.progress) as bar:
        for cell, b in plan:
            tag = "/".join(cell)
            m = ev.measure(f"sweep|{by}|{tag}|{b}", None, dict.fromkeys(cells[cell], b), calib)
            labels = (
                {"group": cell[0]}
                if by == "group"
                else {"block": cell[0]}
                if by == "block"
                else {"block": cell[0], "group": cell[1]}
            )
            rows.append({**labels, "bits": b, "n_quantizers": len(cells[cell]), **m})
            bar.update(1)
    return rows


def sweep_matrix(
    rows: Sequence[Mapping[str, Any]], bits: int, metric: str = "kl"
) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(blocks, groups, Z) from ``bitwidth_sweep(..., by="cell")`` rows at one bit-width: the heatmap of
    the model's ``metric`` when only that cell is set to ``bits``."""
    sel = [r for r in rows if r["bits"] == bits]
    if not sel:
        raise ValueError(f"no sweep rows at {bits} bits; available: {sorted({r['bits'] for r in rows})}")
    blocks = list(dict.fromkeys(r["block"] for r in sel))
    groups = [g for g in GROUPS if any(r["group"] == g for r in sel)]
    look = {(r["block"], r["group"]): r[metric] for r in sel}
    return blocks, groups, [[look.get((b, g)) for g in groups] for b in blocks]
