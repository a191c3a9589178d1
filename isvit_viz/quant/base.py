"""The common quantizer interface: fake-quant ``forward``, integer ``encode``/``decode`` and ``levels``.

Every quantizer maps an input to an integer-valued *code* (a float tensor of whole numbers during
training so gradients can pass straight through, by the rule in :mod:`isvit_viz.quant.ste`) and
de-quantizes codes with one formula. ``forward``, ``encode`` and ``decode`` share both halves, so
``forward(x) == decode(encode(x))`` holds bit for bit.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import nn

from .ste import clamp_ste, rnd, round_ste  # noqa: F401  (re-exported: the STE rule lives in ste.py)

MIN_BITS, MAX_BITS = 2, 16


def check_bits(bits: Any) -> int:
    """Validate a bit-width: a Python ``int`` in ``[2, 16]``."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r} ({type(bits).__name__})")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return bits


def check_positive_finite(name: str, value: Any) -> float:
    """Validate a strictly positive finite float parameter (e.g. the SULQ shift eta)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_calibration_input(x: Any, *, non_negative: bool = False, who: str = "quantizer") -> torch.Tensor:
    """Validate calibration data: a non-empty, finite tensor (non-negative for log-type quantizers)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{who}: calibration input must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{who}: cannot calibrate on an empty tensor (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        x = x.float()
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{who}: calibration input contains {n_bad} NaN/inf values")
    if non_negative and bool((x < 0).any()):
        raise ValueError(
            f"{who}: calibration input has negative values (min {float(x.min()):.4g}); "
            "log-type quantizers expect post-softmax input in [0, 1]"
        )
    return x.detach()


class Quantizer(nn.Module, abc.ABC):
    """Base class of all fake quantizers.

    Subclasses implement :meth:`_calibrate`, :meth:`_codes` (input -> integer-valued float codes) and
    :meth:`_dequant` (codes -> values), and set :attr:`n_codes`. State lives in registered buffers so
    ``state_dict`` round-trips; buffers whose shape is only known after calibration are resized on load.

    Attributes:
        bits: bit-width b.
        n_codes: number of distinct integer codes the quantizer can emit (usually ``2**bits``; some
            reference implementations use one more, which is recorded honestly here).
    """

    name: str = "base"
    non_negative_input: bool = False

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.register_buffer("initialized", torch.tensor(False))
        # When True, the next forward calibrates on its input first (used for whole-model calibration
        # passes, where each quantizer must see the already-quantized output of the layers before it).
        self.calibrate_on_next_forward = False

    # ------------------------------------------------------------------ interface
    @property
    def n_codes(self) -> int:
        return 2**self.bits

    @property
    def is_calibrated(self) -> bool:
        return bool(self.initialized)

    def calibrate(self, x: torch.Tensor) -> Quantizer:
        """Fit the quantizer's parameters to ``x`` and return ``self``."""
        x = check_calibration_input(x, non_negative=self.non_negative_input, who=type(self).__name__)
        with torch.no_grad():
            self._calibrate(x.float())
        self.initialized.fill_(True)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrate_on_next_forward:
            self.calibrate(x)
            self.calibrate_on_next_forward = False
        self._check_ready()
        return self._dequant(self._codes(x, ste=True)).to(x.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (LongTensor, same shape)."""
        self._check_ready()
        with torch.no_grad():
            return self._codes(x.float(), ste=False).long()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """De-quantized values (float32) of integer ``codes``."""
        self._check_ready()
        return self._dequant(codes.to(self._code_dtype()))

    def levels(self) -> torch.Tensor:
        """Sorted 1-D tensor of the distinct values the quantizer can output (per-tensor quantizers).

        Per-channel quantizers return the levels of every channel concatenated and de-duplicated; use
        :meth:`channel_levels` for one channel.
        """
        self._check_ready()
        codes = torch.arange(self.n_codes, device=self.initialized.device)
        vals = self._dequant_all_codes(codes.to(self._code_dtype()))
        return torch.unique(vals.flatten())

    # ------------------------------------------------------------------ helpers
    def _code_dtype(self) -> torch.dtype:
        return torch.float32

    def _dequant_all_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self._dequant(codes)

    def _check_ready(self) -> None:
        if torch.compiler.is_compiling():  # a data-dependent check would break the compiled graph
            return
        if not self.is_calibrated:
            raise RuntimeError(
                f"{type(self).__name__} is not calibrated: call .calibrate(x) on representative data "
                "(or run a calibration pass) before forward/encode/decode/levels"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Buffers such as per-channel scales get their shape at calibration time; adopt the saved shape.
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, calibrated={self.is_calibrated}"

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def _calibrate(self, x: torch.Tensor) -> None:
        """Subclass hook (see :class:`Quantizer`)."""

    @abc.abstractmethod
    def _codes(self, x: torch.Tensor, ste: bool) -> torch.Tensor:
        """Subclass hook (see :class:`Quantizer`)."""

    @abc.abstractmethod
    def _dequant(self, codes: torch.Tensor) -> torch.Tensor:
        """Subclass hook (see :class:`Quantizer`)."""
