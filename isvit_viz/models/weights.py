"""timm models with local pretrained weights, loaded through timm's own mechanism and recorded.

The weights file goes through timm's pretrained-config overlay (``pretrained_cfg_overlay={"file": ...}``),
so timm's checkpoint filters (key remapping, position-embedding resizing) apply exactly as for its own
downloads. The file's sha256 and timm's pretrained tag are kept on the model (:func:`weights_record`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Weight file types timm's loader reads (safetensors, or torch pickles read with ``weights_only=True``).
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_timm_name(name: str) -> None:
    """Raise ``ValueError`` unless timm knows ``name`` (``"arch"`` or ``"arch.tag"``)."""
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: not an embedded model and not a timm model name "
                         "(see timm.list_models('*vit*'))")  # fmt: skip


_SIZE = re.compile(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) from checkpoint, "
                   r"the shape in current model is (torch\.Size\(\[[^\]]*\]\))")  # fmt: skip
_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: ((?:\"[^\"]+\"(?:, )?)+)")


def mismatch_detail(message: str, model_keys: list[str]) -> str | None:
    """From torch's ``load_state_dict`` error text: the first mismatched key in the model's key order
    (missing or wrong shape), else the first key the model does not have; ``None`` if none is named."""
    issues: dict[str, str] = {}
    for kind, keys in _KEYS.findall(message):
        for k in re.findall(r"\"([^\"]+)\"", keys):
            issues[k] = "in the model but not in the file" if kind == "Missing" else "in the file but not in the model"
    for k, file_shape, model_shape in _SIZE.findall(message):
        issues[k] = f"shape {_shape(file_shape)} in the file, {_shape(model_shape)} in the model"
    if not issues:
        return None
    order = {k: i for i, k in enumerate(model_keys)}
    first = min(issues, key=lambda k: (k not in order, order.get(k, 0)))
    more = f" ({len(issues) - 1} more mismatched keys)" if len(issues) > 1 else ""
    return f"first mismatched key {first!r}: {issues[first]}{more}"


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", text))


def create_timm(name: str, weights: str | Path | None, **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model`` with ``weights``: ``None`` (random init), ``"timm"`` (timm's download) or a
    local file (:data:`WEIGHT_SUFFIXES`). Sets ``model.isvit_weights`` (see :func:`weights_record`).

    Raises:
        ValueError: unknown name; a file timm cannot read; a file whose tensors do not match the
            architecture (the message names the first mismatched key).
        FileNotFoundError: missing weights file.
    """
    import timm

    check_timm_name(name)
    record: dict[str, Any] = {"weights": "random", "weights_file": None, "weights_sha256": None}
    if weights is None:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
    elif isinstance(weights, str) and weights == "timm":
        model = timm.create_model(name, pretrained=True, **timm_kwargs)
        record["weights"] = "timm"
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"weights file {path}: expected one of {WEIGHT_SUFFIXES}, got {path.suffix!r}")
        # custom_load=False: some timm configs (augreg ViTs) point at big_vision .npz files with a custom loader
        overlay = {"file": str(path), "custom_load": False}
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs)
        except Exception as e:  # timm/torch/safetensors raise several types for mismatched or damaged files
            try:
                with torch.device("meta"):  # only the key order of the architecture is needed
                    keys = list(timm.create_model(name, pretrained=False, **timm_kwargs).state_dict())
            except Exception:  # noqa: BLE001 - the key order only refines the message
                keys = []
            detail = mismatch_detail(str(e), keys) or f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
            raise ValueError(f"cannot load weights {path} into {name}: {detail}") from e
        record.update(weights="file", weights_file=str(path.resolve()), weights_sha256=sha256_file(path))
    record["timm_pretrained_tag"] = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
    model.isvit_weights = record  # type: ignore[attr-defined]
    return model


def weights_record(model: nn.Module) -> dict[str, Any]:
    """``{"weights": "random"|"timm"|"file"|"embedded", "weights_file", "weights_sha256",
    "timm_pretrained_tag"}`` of a model made by :func:`isvit_viz.models.create`."""
    rec = getattr(model, "isvit_weights", None)
    if rec is None:
        return {"weights": "embedded" if (getattr(model, "isvit_build_spec", None) or {}).get("kind") == "embedded" else None,
                "weights_file": None, "weights_sha256": None, "timm_pretrained_tag": None}  # fmt: skip
    return dict(rec)
