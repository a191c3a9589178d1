"""Asymmetric (or symmetric) uniform quantizer with the official percentile-MSE initialisation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import Quantizer
from .ste import clamp_ste, rnd

#: Percentile candidates of the official code (method.md 2.1).
ACT_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
WEIGHT_PERCENTILES: tuple[float, ...] = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999)
_MIN_SCALE = 1e-8


def rowwise_quantiles(x2d: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Quantiles of each row of ``x2d`` ([C, M]) with torch.quantile's linear interpolation.

    Uses ``topk`` on both tails instead of a full sort or ``torch.quantile``: only the extreme
    ``(1 - q) * M`` values are needed for high quantiles, so cost and memory stay near O(C * M) and
    there is no input-size limit. Returns [len(qs), C].
    """
    c, m = x2d.shape
    out = torch.empty(len(qs), c, dtype=x2d.dtype, device=x2d.device)
    hi_qs = [(i, q) for i, q in enumerate(qs) if q >= 0.5]
    lo_qs = [(i, q) for i, q in enumerate(qs) if q < 0.5]
    for group, largest in ((hi_qs, True), (lo_qs, False)):
        if not group:
            continue
        # ascending positions pos = q (M - 1); from the top, the needed depth is M - floor(pos)
        # positions computed in the input dtype, exactly as torch.quantile does (bit-identical results)
        pos_t = torch.tensor([q for _, q in group], dtype=x2d.dtype) * (m - 1)
        los = [int(v) for v in torch.floor(pos_t)]
        depths = [m - lo if largest else lo + 2 for lo in los]
        k = min(m, max(depths))
        vals = torch.topk(x2d, k, dim=1, largest=largest, sorted=True).values  # [C, k]
        for (i, _), pos, lo in zip(group, pos_t, los):
            hi = min(lo + 1, m - 1)
            frac = float(pos - lo)
            if largest:
                v_lo, v_hi = vals[:, m - 1 - lo], vals[:, m - 1 - hi]
            else:
                v_lo, v_hi = vals[:, lo], vals[:, min(hi, k - 1)]
            out[i] = torch.lerp(v_lo, v_hi, torch.full_like(v_lo, frac))
    return out


def percentile_mse_search(
    x2d: torch.Tensor, bits: int, percentiles: Sequence[float], symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (channel) percentile clipping chosen by MSE, vectorised over rows.

    For each candidate p: clip range [quantile(1-p), quantile(p)], scale = range / (2^b - 1),
    zero-point = round(-min / scale); keep the candidate with the lowest mean squared error per row
    (first candidate wins ties, as in the official code). ``x2d``: [C, M]. Returns (scale, zp), each [C].
    """
    qmax = 2**bits - 1
    qs = list(percentiles) + [1 - p for p in percentiles]
    quant = rowwise_quantiles(x2d, qs)
    n = len(percentiles)
    best_err = best_s = best_z = None
    buf = torch.empty_like(x2d)
    for i in range(n):
        hi, lo = quant[i], quant[n + i]
        s, z = _scale_zp(lo, hi, bits, symmetric)
        sc, zc = s[:, None], z[:, None]
        # in-place fake-quant and squared error in one buffer (the search is memory-bound)
        torch.div(x2d, sc, out=buf).round_().add_(zc).clamp_(0, qmax).sub_(zc).mul_(sc).sub_(x2d)
        err = buf.square_().mean(1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _scale_zp(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2**bits - 1
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        s = (amax / (2 ** (bits - 1) - 1 if bits > 1 else 1)).clamp_min(_MIN_SCALE)
        z = torch.full_like(s, 2 ** (bits - 1))
    else:
        s = ((hi - lo) / qmax).clamp_min(_MIN_SCALE)
        z = torch.round(-lo / s)
    return s, z


class _UniformFakeQuant(torch.autograd.Function):
    """Fused uniform fake-quant with the straight-through gradient of the official code.

    Same values and gradient as ``(clamp_ste(round_ste(x/s) + z, 0, qmax) - z) * s``: the gradient
    passes where the rounded code lies in [0, qmax], edges included (:mod:`isvit_viz.quant.ste`).
    Keeps one bool mask instead of the autograd graph of six element-wise ops.

    When ``scale`` requires a gradient (a learned step size, :meth:`UniformQuantizer.learn_scale`), it
    is the one autograd gives that same expression (LSQ, Esser et al. 2020; QDrop's
    ``fake_quantize_learnable_per_*_affine_training``)::

        d x_hat / d s = round(x/s) - x/s   where the code is inside [0, qmax] (edges included)
                      = -z                 below the range (code < 0)
                      = qmax - z           above the range (code > qmax)

    summed over the elements each scale entry covers and multiplied by ``grad_factor`` (LSQ's gradient
    scale; QDrop's ``grad_scale``, whose value is ``s`` up to one float rounding, is applied exactly here).
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        qmax: int,
        grad_factor: float = 1.0,
        integer_zp: bool = False,
    ) -> torch.Tensor:
        code = torch.round(x / scale)
        if integer_zp:  # clamp(r + z, 0, qmax) - z == clamp(r, -z, qmax - z) for whole-number z
            out = code.clamp(*_shifted_bounds(zero_point, qmax))
        else:
            out = code.add_(zero_point).clamp(0, qmax)
        mask = torch.eq(out, code)  # the code lies in [0, qmax], edges included
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(mask, x, scale, zero_point)
            ctx.qmax, ctx.grad_factor = qmax, grad_factor
        else:
            ctx.save_for_backward(mask)
        return (out if integer_zp else out.sub_(zero_point)).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mask = ctx.saved_tensors[0]
        # where, not grad * mask: one pass, no float copy of the mask (same values up to the sign of 0)
        grad_x = torch.where(mask, grad, 0.0) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            _, x, scale, zp = ctx.saved_tensors
            v = x / scale
            q = torch.round(v).add_(zp).clamp_(0, ctx.qmax).sub_(zp)  # x_hat / s
            ds = torch.where(mask, q - v, q)
            grad_s = (grad * ds).sum_to_size(scale.shape) * ctx.grad_factor
        return grad_x, grad_s, None, None, None, None


def _shifted_bounds(zero_point: torch.Tensor, qmax: int) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """Clamp bounds ``(-z, qmax - z)`` of the rounded input ``x/s`` (Python floats when per-tensor)."""
    if zero_point.dim() == 0 or zero_point.numel() == 1:
        z = float(zero_point)
        return -z, qmax - z
    return -zero_point, qmax - zero_point


def _fake_quant_no_grad(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int, integer_zp: bool
) -> torch.Tensor:
    """``(clamp(round(x/s) + z, 0, qmax) - z) * s`` in one buffer, bit for bit (no autograd).

    With whole-number zero-points, ``clamp(r + z, 0, qmax) - z == clamp(r, -z, qmax - z)`` exactly
    (small integers are exact in floating point), which saves two passes; a fractional zero-point
    (official-mode reparameterization) takes the literal formula.
    """
    out = torch.div(x, scale).round_()
    if integer_zp:
        out.clamp_(*_shifted_bounds(zero_point, qmax))
    else:
        out.add_(zero_point).clamp_(0, qmax).sub_(zero_point)
    return out.mul_(scale).to(x.dtype)


class UniformQuantizer(Quantizer):
    """Uniform affine quantizer: ``x_hat = (clamp(round(x/s) + z, 0, 2^b - 1) - z) * s``.

    Args:
        bits: bit-width b (2..16).
        channel_axis: ``None`` for one (scale, zero-point) per tensor, else the axis whose entries get
            their own parameters (e.g. ``0`` for weight output rows, ``-1`` for activation channels).
        symmetric: zero-point fixed at 2^(b-1) and scale from max |x| (default asymmetric, as the paper).
        init: ``"percentile_mse"`` (the official search) or ``"minmax"``.
        percentiles: candidate list for the search; default the official activation list
            ``ACT_PERCENTILES`` (use ``WEIGHT_PERCENTILES`` for weights).
    """

    name = "uniform"

    def __init__(
        self,
        bits: int,
        channel_axis: int | None = None,
        symmetric: bool = False,
        init: str = "percentile_mse",
        percentiles: Sequence[float] | None = None,
    ) -> None:
        super().__init__(bits)
        if init not in ("percentile_mse", "minmax"):
            raise ValueError(f"init must be 'percentile_mse' or 'minmax', got {init!r}")
        if channel_axis is not None and (isinstance(channel_axis, bool) or not isinstance(channel_axis, int)):
            raise ValueError(f"channel_axis must be None or an int, got {channel_axis!r}")
        pcts = tuple(ACT_PERCENTILES if percentiles is None else percentiles)
        if not pcts or any(not (0.5 < float(p) <= 1.0) for p in pcts):
            raise ValueError(f"percentiles must be a non-empty list of values in (0.5, 1], got {percentiles!r}")
        self.channel_axis = channel_axis
        self.symmetric = bool(symmetric)
        self.init = init
        self.percentiles = tuple(float(p) for p in pcts)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.scale_grad_scale = True  # LSQ gradient scale, used only while learn_scale() is on

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def per_channel(self) -> bool:
        return self.scale.dim() > 0 and self.scale.numel() > 1 or self.channel_axis is not None

    def _calibrate(self, x: torch.Tensor) -> None:
        self._check_scale_fixed()
        pcts = (1.0,) if self.init == "minmax" else self.percentiles
        if self.channel_axis is None:
            s, z = percentile_mse_search(x.reshape(1, -1), self.bits, pcts, self.symmetric)
            self.scale = s.reshape(())
            self.zero_point = z.reshape(())
            return
        axis = self.channel_axis % x.dim() if x.dim() else 0
        x2d = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        s, z = percentile_mse_search(x2d, self.bits, pcts, self.symmetric)
        shape = [1] * x.dim()
        shape[axis] = x.shape[axis]
        self.scale = s.reshape(shape)
        self.zero_point = z.reshape(shape)

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor, channel_axis: int | None = None) -> None:
        """Set (scale, zero-point) directly, e.g. after the channel-wise -> layer-wise transition."""
        self._check_scale_fixed()
        self.channel_axis = channel_axis
        self.scale = scale.detach().clone().to(self.initialized.device, torch.float32)
        self.zero_point = zero_point.detach().clone().to(self.initialized.device, torch.float32)
        self.initialized.fill_(True)

    # ------------------------------------------------------------------ learned step size
    @property
    def learns_scale(self) -> bool:
        """Whether ``scale`` is currently a trainable ``nn.Parameter`` (else a buffer, the default)."""
        return "scale" in self._parameters

    def learn_scale(self, enable: bool = True, grad_scale: bool = True) -> None:
        """Make the step size a trainable parameter (``enable``) or a fixed buffer again (the default).

        The value is kept bit for bit both ways and the ``state_dict`` key stays ``scale`` (at its
        place among the buffers once fixed again), so saving and loading are unaffected. The
        zero-point stays a fixed buffer (QDrop's ``LSQFakeQuantize``). ``grad_scale``: multiply the
        step-size gradient by LSQ's ``1 / sqrt(N * Qp)`` (QDrop's default), with ``N`` the elements per
        scale entry of the current input (batch included, as QDrop) and ``Qp`` the largest positive
        code (``2^b - 1``, or ``2^(b-1) - 1`` when symmetric); ``False`` gives the plain straight-through
        gradient (BRECQ, APHQ-ViT). See :class:`_UniformFakeQuant` for the gradient.
        """
        self.scale_grad_scale = bool(grad_scale)
        if enable == self.learns_scale:
            return
        if enable:
            self._scale_slot = list(self._buffers).index("scale")
            value = self._buffers.pop("scale")
            self.scale = nn.Parameter(value.detach().clone())
            return
        value = self._parameters.pop("scale").detach().clone()
        items = list(self._buffers.items())
        items.insert(getattr(self, "_scale_slot", len(items)), ("scale", value))
        self._buffers.clear()
        self._buffers.update(items)

    def _check_scale_fixed(self) -> None:
        if self.learns_scale:
            raise RuntimeError("the step size is being learned: call learn_scale(False) before re-initialising it")

    def _scale_grad_factor(self, x: torch.Tensor) -> float:
        if not self.scale_grad_scale:
            return 1.0
        qp = 2 ** (self.bits - 1) - 1 if self.symmetric else self.qmax
        return 1.0 / math.sqrt(x.numel() / self.scale.numel() * qp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        learn = self.learns_scale
        if self.calibrate_on_next_forward:
            return super().forward(x)
        self._check_ready()
        if not torch.is_grad_enabled() or not (x.requires_grad or learn):
            return _fake_quant_no_grad(x, self.scale, self.zero_point, self.qmax, self._integer_zero_point())
        factor = self._scale_grad_factor(x) if learn else 1.0
        return _UniformFakeQuant.apply(x, self.scale, self.zero_point, self.qmax, factor, self._integer_zero_point())

    def _integer_zero_point(self) -> bool:
        """Whether every zero-point is a whole number, memoised on the buffer object and its version
        (the memo holds the tensor itself, so a new buffer can never be mistaken for the old one)."""
        if torch.compiler.is_compiling():  # the literal formula: same values, no data-dependent branch
            return False
        z = self.zero_point
        memo = self.__dict__.get("_zp_memo")
        if memo is None or memo[0] is not z or memo[1] != z._version:
            memo = self.__dict__["_zp_memo"] = (z, z._version, bool(torch.equal(z, torch.round(z))))
        return memo[2]

    def _codes(self, x: torch.Tensor, ste: bool) -> torch.Tensor:
        return clamp_ste(rnd(x / self.scale, ste) + self.zero_point, 0, self.qmax)

    def _dequant(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.zero_point) * self.scale

    @property
    def has_integer_zero_point(self) -> bool:
        return bool(torch.all(self.zero_point == torch.round(self.zero_point)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_integer_zero_point:
            # The official reparameterization keeps mean(z) as zero-point; codes are then not integers.
            raise ValueError(
                "encode/decode need an integer zero-point; this quantizer has a fractional one "
                "(official-mode reparameterization). forward() is still exact."
            )
        return super().encode(x)

    def _dequant_all_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if self.scale.dim() == 0:
            return self._dequant(codes)
        # one row of levels per channel: [n_codes, C]
        return (codes[:, None] - self.zero_point.flatten()[None]) * self.scale.flatten()[None]

    def channel_levels(self, channel: int) -> torch.Tensor:
        """Sorted levels of one channel of a per-channel quantizer."""
        self._check_ready()
        s, z = self.scale.flatten(), self.zero_point.flatten()
        if not 0 <= channel < s.numel():
            raise ValueError(f"channel must be in [0, {s.numel() - 1}], got {channel}")
        codes = torch.arange(self.n_codes, dtype=torch.float32, device=s.device)
        return torch.unique((codes - z[channel]) * s[channel])

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channel_axis={self.channel_axis}, symmetric={self.symmetric}, init={self.init!r}"
