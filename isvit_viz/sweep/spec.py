"""A sweep's grid: models x methods x bit-widths x seeds at fixed settings, expanded to cells.

A spec comes from Python (:class:`SweepSpec`), from CLI lists, or from a YAML/JSON file
(:func:`load_spec`) whose keys are the dataclass fields::

    models: [vit, swin]            # embedded models, or timm names with `data` and `weights`
    methods: [isvit, qdrop, repq-vit]
    bits: [3, 4, 6]                # W = A bits
    seeds: [0, 1, 2]
    calib: 1024                    # calibration images per cell (each seed draws its own)
    iters: null                    # Adam steps per unit and stage (null: the method's default)
    test: null                     # first N test images (null: all)
    data: /shared/imagenet         # ImageNet root with train/ and val/ (timm models only)
    weights: {deit_small_patch16_224: /shared/weights/deit_small.safetensors}
    device: cuda                   # each cell asks Ray for 1 GPU (and `threads` CPUs)
    threads: 4
    matmul_dtype: float32
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

#: timm models take their weights from ``weights[model]``: a local file, ``"timm"`` (download) or ``"random"``
WEIGHT_KEYWORDS = ("timm", "random")
#: Settings that change what a cell computes: a folder's finished cells are reused only when these match
#: (``matmul_dtype`` too: bf16 and fp32 cells of one method and bit-width would be averaged into one row).
RESULT_SETTINGS = ("calib", "iters", "test", "data", "weights", "matmul_dtype", "softmax_quantizer", "sos")


@dataclass(frozen=True, order=True)
class Cell:
    """One run of the grid; ``model`` is ``vit`` / ``swin`` for the embedded models (as the
    accuracy records name them) or a timm name."""

    model: str
    method: str
    w_bits: int
    a_bits: int
    seed: int

    @property
    def key(self) -> str:
        """File stem of the cell's result: ``vit_isvit_w4a4_s0``."""
        return f"{self.model}_{self.method}_w{self.w_bits}a{self.a_bits}_s{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.model} {self.method} W{self.w_bits}/A{self.a_bits} seed {self.seed}"


def _embedded_names() -> dict[str, str]:
    """Accepted spellings of the embedded models -> the record name (``embedded-vit`` -> ``vit``)."""
    from ..models import EMBEDDED_MODELS

    short = {name.split("-", 1)[1]: name.split("-", 1)[1] for name in EMBEDDED_MODELS}
    return short | {name: name.split("-", 1)[1] for name in EMBEDDED_MODELS}


def _default_methods() -> list[str]:
    from ..calib.methods import METHODS

    return sorted(METHODS)


def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


@dataclass
class SweepSpec:
    """The grid and the settings every cell shares (see the module docstring for the fields)."""

    models: list[str] = field(default_factory=lambda: ["vit", "swin"])
    methods: list[str] = field(default_factory=_default_methods)
    bits: list[int] = field(default_factory=lambda: [3, 4, 6])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    calib: int = 1024
    iters: int | None = None
    test: int | None = None
    data: str | None = None
    weights: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    threads: int = 1
    matmul_dtype: str = "float32"
    softmax_quantizer: str | None = None
    sos: bool = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpec:
        """Build a spec from a mapping (a parsed spec file); unknown keys are an error. A single
        value where a list is expected is taken as a one-element list."""
        if not isinstance(d, dict):
            raise ValueError(f"a sweep spec must be a mapping of fields, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown spec key(s) {unknown}; valid keys: {names}")
        kw = dict(d)
        for k in ("models", "methods", "bits", "seeds"):
            if k in kw and not isinstance(kw[k], list | tuple):
                kw[k] = [kw[k]]
            if k in kw:
                kw[k] = list(kw[k])
        if kw.get("weights") is None:
            kw["weights"] = {}
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------ validation
    def normalized(self) -> SweepSpec:
        """Check every field and return a copy with canonical model names and duplicates removed.

        Raises ``ValueError`` naming the bad value (empty grid, unknown model or method, bits out of
        2..16, missing ImageNet folder or weights for a timm model, ...), before any cell runs."""
        import timm

        from ..calib.methods import resolve_method
        from ..models import PAPER_MODELS

        for name in ("models", "methods", "bits", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"empty grid: no {name} given")
        embedded = _embedded_names()
        models = []
        for m in self.models:
            if not isinstance(m, str) or not (m in embedded or timm.is_model(m)):
                raise ValueError(f"unknown model {m!r}: use {sorted(embedded)} or a timm model name "
                                 f"(the paper's: {list(PAPER_MODELS)})")  # fmt: skip
            models.append(embedded.get(m, m))
        for m in self.methods:
            if not isinstance(m, str):
                raise ValueError(f"unknown method {m!r}")
            resolve_method(m, self.softmax_quantizer, self.sos)  # unknown names and bad ablation switches
        for b in self.bits:
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16:
                raise ValueError(f"bits must be integers in 2..16, got {b!r}")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int):
                raise ValueError(f"seeds must be integers, got {s!r}")
        for name, lo in (("calib", 1), ("iters", 0), ("test", 1), ("threads", 1)):
            v = getattr(self, name)
            if v is None and name in ("iters", "test"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.device not in ("cpu", "cuda"):  # Ray hands each cell its own GPU: no cuda:N
            raise ValueError(f"device must be 'cpu' or 'cuda' (choose GPUs with CUDA_VISIBLE_DEVICES), got {self.device!r}")
        if self.matmul_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"matmul_dtype must be 'float32' or 'bfloat16', got {self.matmul_dtype!r}")
        if not isinstance(self.weights, dict):
            raise ValueError(f"weights must map a timm model name to a file, 'timm' or 'random', got {self.weights!r}")
        timm_models = [m for m in models if m not in embedded.values()]
        for m in timm_models:
            if not self.data:
                raise ValueError(f"{m} needs `data` (an ImageNet root with train/ and val/)")
            if m not in self.weights:
                raise ValueError(f"{m} needs weights: give {m}=FILE, {m}=timm (download) or {m}=random")
        extra = sorted(set(self.weights) - set(timm_models))
        if extra:
            raise ValueError(f"weights given for model(s) not in the grid or not timm models: {extra}")
        if models != timm_models:  # the packaged data bounds calib and test
            from ..data import EmbeddedSplits

            splits = EmbeddedSplits()
            splits.calib_tensors(self.calib)
            splits.test_tensors(self.test)
        d = self.to_dict() | {
            "models": _unique(models),
            "methods": _unique(self.methods),
            "bits": _unique(self.bits),
            "seeds": _unique(self.seeds),
        }
        return SweepSpec(**d)

    def check_paths(self) -> None:
        """Check that the ImageNet folders and weight files exist here (the driver's view of the
        shared storage); ``FileNotFoundError`` names the missing path."""
        if self.data:
            for sub in ("train", "val"):
                if not (Path(self.data) / sub).is_dir():
                    raise FileNotFoundError(f"data {self.data}: missing folder {Path(self.data) / sub}")
        for model, w in self.weights.items():
            if w not in WEIGHT_KEYWORDS and not Path(w).is_file():
                raise FileNotFoundError(f"weights for {model}: file not found: {w}")

    # ------------------------------------------------------------------ cells
    def cells(self) -> list[Cell]:
        """The grid in model, method, bits, seed order."""
        return [Cell(m, meth, b, b, s) for m, meth, b, s in itertools.product(self.models, self.methods, self.bits, self.seeds)]

    def result_settings(self) -> dict[str, Any]:
        """The settings that change what a cell computes (see ``RESULT_SETTINGS``)."""
        return {k: getattr(self, k) for k in RESULT_SETTINGS}

    def cell_settings(self, cell: Cell) -> dict[str, Any]:
        """``settings`` of a cell's result file, with the keys ``benchmarks.accuracy`` writes."""
        return {
            "models": [cell.model], "methods": [cell.method], "bits": [cell.w_bits], "seeds": [cell.seed],
            "iters": self.iters, "calib": self.calib, "test": self.test, "device": self.device,
            "matmul_dtype": self.matmul_dtype, "softmax_quantizer": self.softmax_quantizer, "no_sos": not self.sos,
            "threads": self.threads, "data": self.data, "weights": self.weights.get(cell.model), "cell": cell.key,
        }  # fmt: skip


def load_spec(path: str | Path) -> SweepSpec:
    """Read a YAML or JSON spec file (see the module docstring); ``ValueError`` if it does not parse."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        parse, errors = json.loads, (ValueError,)
    else:
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs pyyaml (pip install pyyaml), or write the spec as JSON") from None
        parse, errors = yaml.safe_load, (yaml.YAMLError, ValueError)
    try:
        data = parse(text)
    except errors as e:
        msg = " ".join(str(e).split())
        raise ValueError(f"{path}: not a valid spec file: {msg}") from None
    try:
        return SweepSpec.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
