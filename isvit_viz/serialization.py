"""Save and load quantized models with every quantizer's state (bit-identical logits after reload)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calib.pipeline import QuantResult
from .quant.config import QuantConfig
from .quant.wrap import quant_modules, quantize_model
from .utils import atomic_write_bytes

FORMAT = "isvit_viz.quantized"
FORMAT_VERSION = 1


def save_quantized(result: QuantResult, path: str | Path, integer_attention: dict[str, Any] | None = None) -> Path:
    """Write ``result`` (model state incl. quantizer buffers, switches, config) atomically to ``path``.

    ``integer_attention``: optional exported integer attention parameters (``isvit_viz.integer``),
    stored under that key; files without it are unchanged.
    """
    if not isinstance(result, QuantResult):
        raise ValueError(f"save_quantized expects a QuantResult, got {type(result).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {path} is a directory; give a file name such as {path / 'model.pt'}")
    flags = {name: [bool(m.weight_quant), bool(m.act_quant)] for name, m in quant_modules(result.model)}
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": result.config,
        "timings": result.timings,
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "quant_flags": flags,
    }
    if integer_attention is not None:
        payload["integer_attention"] = integer_attention
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_quantized(path: str | Path, model: nn.Module | None = None, device: str | torch.device = "cpu") -> QuantResult:
    """Load a file written by :func:`save_quantized`.

    The FP architecture is rebuilt from the saved build spec (embedded models and ``models.create``
    names); for other models pass an FP ``model`` of the same architecture to fill.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantized model file not found: {path}")
    try:
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files fail in zip/unpickling
        raise ValueError(f"cannot read quantized model {path}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an isvit_viz quantized model file")
    cfg = payload["config"]
    if model is None:
        spec = cfg.get("build_spec")
        if not spec:
            raise ValueError(
                f"{path} does not record how to rebuild its architecture; pass model=<FP model of the same architecture>"
            )
        from .models import build_from_spec

        model = build_from_spec(spec)
    from .models.embedded import disable_fused_attention

    qmodel = quantize_model(disable_fused_attention(model), QuantConfig.from_dict(cfg["quant_config"]))
    try:
        qmodel.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the given model architecture: {e}") from e
    mods = dict(quant_modules(qmodel))
    for name, (w, a) in payload["quant_flags"].items():
        mods[name].weight_quant, mods[name].act_quant = w, a
    return QuantResult(model=qmodel.to(device).eval(), config=cfg, timings=payload.get("timings", {}))
