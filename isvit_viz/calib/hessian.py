"""PTQ4ViT's Hessian-guided scale search (hahnyuan/PTQ4ViT), as one calibration stage.

The metric (code: ``_get_similarity(metric="hessian")`` in ``quant_layers/*.py``) scores a candidate
quantization of one layer by its output error weighted with the gradient ``g = dL/dO`` of the task
loss with respect to that layer's output ``O``, collected beforehand on the FP model:

    err = sum over samples n of mean over the elements i of sample n of (g_ni * (O^_ni - O_ni))^2

(the code maximises the negative; per-group variants take the mean within each group). As in the
code's default ("parallel") calibration, every layer is searched on its own FP input and compared
with its own FP output, so the search order does not matter. Per layer kind (config ``PTQ4ViT.py``):

* Linear (qkv, proj, fc1, head, Swin reduction): symmetric signed weights ``clamp(round(w/d), -q, q-1) d``
  with one step per tensor (qkv: one per q/k/v row block) and a symmetric per-tensor input step;
  ``rounds`` alternations of a weight search then an input search over ``factor * initial step``,
  initial steps ``max|.| / (q - 0.5)``, ``q = 2^(b-1)``, factors :func:`~isvit_viz.quant.ptq4vit.interval_factors`.
* fc2 (post-GELU): the same with :class:`~isvit_viz.quant.ptq4vit.PTQ4ViTGeluQuantizer` on the input
  (only its positive step is searched; initial step ``max(x)/(q - 0.5)``).
* patch-embedding conv: one weight step per output channel, the image stays FP.
* matmuls (Q @ K^T, P @ V): symmetric steps per head for both operands, alternating searches.
* post-softmax operand: :class:`~isvit_viz.quant.ptq4vit.PTQ4ViTSoftmaxQuantizer`'s split over
  ``2^-i``, scored with V unquantized (as the code), then V's per-head steps.

The task loss: the code backpropagates ``KL(softmax(FP logits) || softmax(logits))`` through the FP
model, which is zero with zero gradient at the FP point (its gradients are float round-off between a
32-image and a 4-image forward; PTQ4ViT issue #23). Here ``L`` is the cross-entropy of the FP logits
with ``labels`` (the paper's task loss), by default the FP model's own top-1 predictions, so the
weights are deterministic and not zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models.support import block_types
from ..quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from ..quant.ptq4vit import PTQ4ViTGeluQuantizer, PTQ4ViTSoftmaxQuantizer, interval_factors, split_candidates
from ..quant.uniform import UniformQuantizer
from ..quant.wrap import quant_state

_LAYERS = (QuantLinear, QuantConv2d, QuantMatMul)


@dataclass(frozen=True)
class HessianConfig:
    """Search settings; defaults are PTQ4ViT's (``configs/PTQ4ViT.py``, ``example/test_vit.py``).

    Attributes:
        alpha / beta / n_candidates: candidate factors ``alpha + i (beta - alpha) / n``, ``i < n``.
        rounds: alternations of the two operand searches (``search_round``).
        n_splits: post-softmax split candidates ``2^-i``, ``i < n_splits``.
        grad_batch_size: images per forward/backward pass when collecting gradients (code: 4).
        chunk: samples per step when scoring candidates (memory only; results do not depend on it).
    """

    alpha: float = 0.01
    beta: float = 1.2
    n_candidates: int = 100
    rounds: int = 3
    n_splits: int = 20
    grad_batch_size: int = 4
    chunk: int = 8


@dataclass
class LayerRecord:
    """FP inputs (one tensor, or two for a matmul), FP output and ``dL/d output`` of one layer, all [N, ...]."""

    inputs: list[torch.Tensor]
    output: torch.Tensor
    grad: torch.Tensor

    def to(self, device: torch.device | str) -> LayerRecord:
        return LayerRecord([t.to(device) for t in self.inputs], self.output.to(device), self.grad.to(device))


def hessian_error(out_fp: torch.Tensor, out_q: torch.Tensor, grad: torch.Tensor, group_dim: int | None = None) -> torch.Tensor:
    """PTQ4ViT's Hessian-guided error of a quantized output ``out_q`` against ``out_fp`` (same shape [N, ...]).

    ``sum_n mean_i (grad_ni (out_q_ni - out_fp_ni))^2`` over the elements ``i`` of sample ``n``, in
    float64. With ``group_dim`` the mean runs within each index of that dimension and the result has one
    entry per group ([G]); otherwise it is a 1-element tensor.
    """
    d = (grad * (out_q - out_fp)).double().square()
    if group_dim is None:
        return d.flatten(1).mean(1).sum().reshape(1)
    d = d.movedim(group_dim, 1)
    return d.reshape(d.shape[0], d.shape[1], -1).mean(2).sum(0)


def _fq_sym(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """The code's symmetric fake quantization ``clamp(round(x/step), -q, q-1) * step``, ``q = 2^(bits-1)``."""
    q = 2 ** (bits - 1)
    return torch.round(x / step).clamp_(-q, q - 1) * step


def _set_sym(qz: UniformQuantizer, step: torch.Tensor, channel_axis: int | None) -> None:
    # zero-point 2^(b-1): codes clamp(round(x/s) + q, 0, 2q-1) - q equal the code's clamp(round(x/s), -q, q-1)
    qz.set_params(step, torch.full_like(step, 2 ** (qz.bits - 1)), channel_axis=channel_axis)
    qz.symmetric = True


def _module_groups(model: nn.Module) -> list[list[str]]:
    """Quantized layers in forward order, grouped per transformer block (one gradient pass per group)."""
    groups: list[list[str]] = []
    blocks: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(b + ".") for b in blocks):
            continue
        if type(mod) in block_types():
            blocks.append(name)
            groups.append([f"{name}.{n}" for n, m in mod.named_modules() if isinstance(m, _LAYERS)])
        elif isinstance(mod, _LAYERS):
            groups.append([name])
    return [g for g in groups if g]


def collect_output_grads(
    model: nn.Module,
    names: list[str],
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch_size: int = 4,
    store: torch.device | str = "cpu",
) -> dict[str, LayerRecord]:
    """FP inputs, outputs and task-loss output gradients of the layers ``names`` of a wrapped model.

    Runs the model with quantization switched off (it then computes its FP function exactly), in
    mini-batches of ``batch_size`` images on the model's device, with loss ``sum_n CE(logits_n, label_n)``
    (labels: ``labels`` [N] or the FP top-1 predictions). Summing keeps each sample's gradient
    independent of the batching. Returns ``{name: LayerRecord}`` with tensors on ``store``.
    """
    dev = next(model.parameters()).device
    saved: dict[str, tuple[list[list[torch.Tensor]], list[torch.Tensor], list[torch.Tensor]]] = {n: ([], [], []) for n in names}
    live: list[tuple[str, torch.Tensor]] = []

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            ins, outs, _ = saved[name]
            ins.append([a.detach().to(store) for a in args[: 2 if isinstance(mod, QuantMatMul) else 1]])
            outs.append(out.detach().to(store))
            live.append((name, out))

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with quant_state(model, weight=False, act=False), torch.enable_grad():
            for i in range(0, len(images), batch_size):
                live.clear()
                xb = images[i : i + batch_size].to(dev).detach().requires_grad_(True)  # a graph even with frozen weights
                logits = model(xb)
                y = logits.argmax(-1) if labels is None else labels[i : i + batch_size].to(dev)
                loss = F.cross_entropy(logits, y, reduction="sum")
                grads = torch.autograd.grad(loss, [o for _, o in live], allow_unused=True)
                for (name, out), g in zip(live, grads):
                    saved[name][2].append((torch.zeros_like(out) if g is None else g).detach().to(store))
    finally:
        for h in handles:
            h.remove()
    return {
        n: LayerRecord([torch.cat([b[k] for b in ins]) for k in range(len(ins[0]))], torch.cat(outs), torch.cat(gs))
        for n, (ins, outs, gs) in saved.items()
    }


def _best(score: Callable[[torch.Tensor], torch.Tensor], cands: torch.Tensor) -> torch.Tensor:
    """Per group, the candidate with the lowest ``score``; the first wins ties (as the code's ``argmax``).

    ``cands`` [n, G] (one column per group); ``score(c)`` of a candidate row [G] returns errors [G] (or [1]).
    """
    errs = torch.stack([score(c).expand(cands.shape[1]) for c in cands])  # [n, G]
    return cands.gather(0, errs.argmin(0)[None]).squeeze(0)


def _scorer(
    rec: LayerRecord, run: Callable[[torch.Tensor, slice], torch.Tensor], group_dim: int | None, chunk: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``c -> hessian_error`` of ``run(c, rows)`` summed over sample chunks (chunking changes nothing)."""
    n = rec.output.shape[0]

    def score(c: torch.Tensor) -> torch.Tensor:
        return sum(
            hessian_error(rec.output[r], run(c, r), rec.grad[r], group_dim)
            for r in (slice(i, i + chunk) for i in range(0, n, chunk))
        )

    return score


def _uniform_act(
    qz: object,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(fake-quant(x, step), initial step(x)) of a supported input quantizer, as the code computes them."""
    if isinstance(qz, UniformQuantizer):
        b = qz.bits
        return (lambda x, s: _fq_sym(x, s, b)), (lambda x: (x.abs().max() / (2 ** (b - 1) - 0.5)).reshape(1))
    if isinstance(qz, PTQ4ViTGeluQuantizer):

        def gelu(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            qz.set_step(s)
            return qz.decode(qz.encode(x))

        return gelu, lambda x: qz.initial_step(x).reshape(1)
    raise ValueError(f"the Hessian search supports uniform and PTQ4ViT twin-uniform inputs, got {type(qz).__name__}")


@torch.no_grad()
def search_linear(mod: QuantLinear | QuantConv2d, rec: LayerRecord, cfg: HessianConfig, n_groups: int = 1) -> None:
    """Hessian-guided search of a Linear's (or the patch conv's) weight and input steps; sets its quantizers.

    Linear: ``n_groups`` contiguous row blocks of the weight share a step (qkv: 3, else 1), scored on
    their own output features. Conv: one step per output channel. ``cfg.rounds`` alternations of a
    weight search (input quantized with the current step) and an input search (weights quantized);
    the input only if the layer has an input quantizer.
    """
    conv = isinstance(mod, QuantConv2d)
    w, wb = mod.weight.detach(), mod.weight_quantizer.bits
    groups = w.shape[0] if conv else n_groups
    rows = w.shape[0] // groups
    w_init = w.reshape(groups, -1).abs().amax(1) / (2 ** (wb - 1) - 0.5)  # [G]
    x = rec.inputs[0]
    act, a_init = (None, None) if mod.input_quantizer is None else _uniform_act(mod.input_quantizer)
    row_step = lambda ws: ws.repeat_interleave(rows).reshape(-1, *[1] * (w.dim() - 1))  # noqa: E731

    def run(ws: torch.Tensor, a_s: torch.Tensor | None, r: slice) -> torch.Tensor:
        xr = x[r] if act is None else act(x[r], a_s)
        if conv:
            return F.conv2d(xr, _fq_sym(w, row_step(ws), wb), mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
        return F.linear(xr, _fq_sym(w, row_step(ws), wb), mod.bias).unflatten(-1, (groups, rows))

    grec = (
        rec if conv else LayerRecord(rec.inputs, rec.output.unflatten(-1, (groups, rows)), rec.grad.unflatten(-1, (groups, rows)))
    )
    f = interval_factors(cfg.alpha, cfg.beta, cfg.n_candidates).to(w.device)[:, None]
    ws, a_s = w_init, (None if act is None else a_init(x))
    for _ in range(cfg.rounds):
        ws = _best(_scorer(grec, lambda c, r, a_s=a_s: run(c, a_s, r), 1 if conv else -2, cfg.chunk), f * w_init)
        if act is not None:
            a_s = _best(_scorer(grec, lambda c, r, ws=ws: run(ws, c, r), None, cfg.chunk), f * a_init(x))
    if groups == 1:
        _set_sym(mod.weight_quantizer, ws.reshape(()), None)
    else:
        _set_sym(mod.weight_quantizer, row_step(ws), 0)
    if isinstance(mod.input_quantizer, UniformQuantizer):
        _set_sym(mod.input_quantizer, a_s.reshape(()), None)
    elif isinstance(mod.input_quantizer, PTQ4ViTGeluQuantizer):
        mod.input_quantizer.set_step(a_s)


@torch.no_grad()
def search_matmul(mod: QuantMatMul, rec: LayerRecord, cfg: HessianConfig) -> None:
    """Hessian-guided search of a matmul's operand steps (per head, dim 1 of [N, H, ...]); sets both quantizers.

    ``cfg.rounds`` alternations of the first-operand search (second quantized) and the second-operand
    search. A post-softmax :class:`PTQ4ViTSoftmaxQuantizer` first operand gets the split search instead,
    scored with the second operand unquantized (the code's ``SoSPTQSLBatchingQuantMatMul``).
    """
    a, b = rec.inputs
    qa, qb = mod.quantizer_a, mod.quantizer_b
    if not isinstance(qb, UniformQuantizer):
        raise ValueError(f"the Hessian search needs a uniform second matmul operand, got {type(qb).__name__}")
    heads, bb = a.shape[1], qb.bits
    hv = lambda s: s.reshape(1, -1, 1, 1)  # noqa: E731  per-head step over [N, H, rows, cols]
    head_init = lambda t, bits: t.transpose(0, 1).reshape(heads, -1).abs().amax(1) / (2 ** (bits - 1) - 0.5)  # noqa: E731
    f = interval_factors(cfg.alpha, cfg.beta, cfg.n_candidates).to(a.device)[:, None]
    b_init, b_s = head_init(b, bb), head_init(b, bb)
    if isinstance(qa, PTQ4ViTSoftmaxQuantizer):

        def sos(r: slice, s: torch.Tensor) -> torch.Tensor:
            qa.set_split(s)
            return qa.decode(qa.encode(a[r]))

        splits = split_candidates(cfg.n_splits).to(a.device)[:, None]
        for _ in range(cfg.rounds):
            s = _best(_scorer(rec, lambda c, r: sos(r, c) @ b[r], None, cfg.chunk), splits)
            b_s = _best(_scorer(rec, lambda c, r, s=s: sos(r, s) @ _fq_sym(b[r], hv(c), bb), 1, cfg.chunk), f * b_init)
        qa.set_split(s)
        _set_sym(qb, hv(b_s), 1)
        return
    if not isinstance(qa, UniformQuantizer):
        raise ValueError(f"the Hessian search supports uniform or PTQ4ViT twin-uniform matmul operands, got {type(qa).__name__}")
    ab = qa.bits
    a_init = a_s = head_init(a, ab)
    for _ in range(cfg.rounds):
        a_s = _best(
            _scorer(rec, lambda c, r, b_s=b_s: _fq_sym(a[r], hv(c), ab) @ _fq_sym(b[r], hv(b_s), bb), 1, cfg.chunk), f * a_init
        )
        b_s = _best(
            _scorer(rec, lambda c, r, a_s=a_s: _fq_sym(a[r], hv(a_s), ab) @ _fq_sym(b[r], hv(c), bb), 1, cfg.chunk), f * b_init
        )
    _set_sym(qa, hv(a_s), 1)
    _set_sym(qb, hv(b_s), 1)


def hessian_calibrate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    cfg: HessianConfig | None = None,
    progress: bool = False,
) -> list[str]:
    """PTQ4ViT's calibration of a wrapped model, in place: every weight and activation quantizer.

    For each transformer block (and each layer outside blocks) one gradient pass
    (:func:`collect_output_grads`) over ``images`` collects FP inputs, outputs and output gradients of
    its layers; then each layer is searched on them (:func:`search_linear`, :func:`search_matmul`).
    The model should be wrapped with PTQ4ViT's placement (``post_ln="layer"``, ``softmax`` and
    ``post_gelu`` ``"twin_uniform_ptq4vit"``); it needs no prior calibration, and must not be
    re-calibrated afterwards (``calibrate_weights`` would overwrite the searched steps). Quantization
    switches are left as they were; switch both on to evaluate.

    Args:
        images: calibration images [N, C, H, W] (PTQ4ViT: 32).
        labels: optional class labels [N] for the task loss; default the FP top-1 predictions.
        cfg: search settings (default PTQ4ViT's).

    Returns:
        the names of the layers searched, in order.
    """
    cfg = cfg or HessianConfig()
    done: list[str] = []
    groups = _module_groups(model)
    for names in tqdm(groups, desc="hessian", disable=not progress):
        recs = collect_output_grads(model, names, images, labels, cfg.grad_batch_size)
        dev = next(model.parameters()).device
        for name in names:
            mod, rec = model.get_submodule(name), recs.pop(name).to(dev)
            if isinstance(mod, QuantMatMul):
                search_matmul(mod, rec, cfg)
            else:
                search_linear(mod, rec, cfg, n_groups=3 if name.endswith(".qkv") else 1)
            done.append(name)
    return done
