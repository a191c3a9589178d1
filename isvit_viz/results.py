"""Committed paper-setting results: where they live, how they are read, and their formats.

The notebooks open on these (no heavy computation), the benchmarks write them. Two kinds:

* **run records** (``benchmarks/results/accuracy/*.json``, ``.../ablations/*.json``): the JSON that
  ``python -m benchmarks.accuracy`` writes, one file per run or group of runs, with a ``runs`` list;
* **artifacts** (``benchmarks/results/artifacts/<name>.json``): what a figure needs (attention
  statistics, landscape grids, sensitivity tables...), each a dict with ``"artifact": name``,
  ``"format": <int>``, ``"settings"``, ``"command"``, ``"wall_s"`` and its data.

The results folder is ``$ISVIT_RESULTS_DIR`` if set, else ``benchmarks/results`` of the source
checkout this package was installed from (``pip install -e .``, the supported way to use the notebooks).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .paper import FIG5, TABLE3, TABLE4, paper_top1
from .utils import atomic_write_json

#: Format version of each artifact; bump it when its layout changes (a stale file then fails loudly).
ARTIFACT_FORMATS: dict[str, int] = {
    "attention": 1,
    "landscapes": 1,
    "levels": 1,
    "sensitivity": 1,
}


class ResultsNotFoundError(FileNotFoundError):
    """The committed results are not available (installed without the source checkout)."""


def results_dir() -> Path:
    """The folder holding the committed results (see the module docstring)."""
    env = os.environ.get("ISVIT_RESULTS_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    if not path.is_dir():
        raise ResultsNotFoundError(
            f"committed results not found at {path}: install the package from its source checkout "
            "(pip install -e .) or set ISVIT_RESULTS_DIR to a copy of benchmarks/results"
        )
    return path


#: The command that writes each artifact (``benchmarks.artifacts`` runs them all).
ARTIFACT_COMMANDS: dict[str, str] = {
    "landscapes": "python -m benchmarks.artifacts --parts landscapes",
    "attention": "python -m benchmarks.levels",
    "levels": "python -m benchmarks.levels",
    "sensitivity": "python -m benchmarks.sensitivity",
}


def artifact_path(name: str, root: str | Path | None = None) -> Path:
    if name not in ARTIFACT_FORMATS:
        raise ValueError(f"unknown artifact {name!r}; known: {sorted(ARTIFACT_FORMATS)}")
    return Path(root or results_dir()) / "artifacts" / f"{name}.json"


def load_artifact(name: str, root: str | Path | None = None) -> dict[str, Any]:
    """Read artifact ``name`` and check that its format is the one this code reads."""
    path = artifact_path(name, root)
    if not path.is_file():
        raise ResultsNotFoundError(f"artifact {name!r} missing: {path} (make it with `{ARTIFACT_COMMANDS[name]}`)")
    payload = json.loads(path.read_text())
    got, want = payload.get("format"), ARTIFACT_FORMATS[name]
    if payload.get("artifact") != name or got != want:
        raise ValueError(f"{path}: artifact {payload.get('artifact')!r} format {got!r}, this code reads {name!r} format {want}")
    return payload


def write_artifact(
    name: str,
    data: Mapping[str, Any],
    settings: Mapping[str, Any],
    command: str,
    wall_s: float,
    root: str | Path | None = None,
) -> Path:
    """Write artifact ``name`` atomically (``root`` defaults to the committed results folder)."""
    path = artifact_path(name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "artifact": name,
        "format": ARTIFACT_FORMATS[name],
        "settings": dict(settings),
        "command": command,
        "wall_s": round(float(wall_s), 1),
        "written": time.strftime("%Y-%m-%d"),
        **data,
    }
    atomic_write_json(path, payload)
    return path


def load_runs(*subdirs: str, root: str | Path | None = None, model: str | None = None) -> list[dict[str, Any]]:
    """Every run record in ``<results>/<subdir>/*.json`` (default ``accuracy``), each with the
    ``device`` and ``matmul_dtype`` it ran with, filtered to ``model`` (``vit`` / ``swin``) if given."""
    base = Path(root or results_dir())
    runs = []
    for sub in subdirs or ("accuracy",):
        for path in sorted((base / sub).glob("*.json")):
            payload = json.loads(path.read_text())
            env, settings = payload.get("env", {}), payload.get("settings", {})
            device = env.get("cuda") or "CPU"
            for r in payload.get("runs", []):
                if model is None or r.get("model") == model:
                    runs.append({**r, "device": device, "matmul_dtype": settings.get("matmul_dtype", "float32"),
                                 "source": f"{sub}/{path.name}"})  # fmt: skip
    return runs


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(runs: Iterable[Mapping[str, Any]], keys: Sequence[str] = ("model", "method", "w_bits")) -> list[dict[str, Any]]:
    """Group runs by ``keys`` and give mean / std / n of top-1, agreement, KL and wall time per group."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    rows = []
    for key, rs in groups.items():
        row: dict[str, Any] = dict(zip(keys, key))
        row["n"] = len(rs)
        for m in ("q_top1", "agree_top1", "kl_to_fp", "wall_s"):
            row[m], row[f"{m}_std"] = mean_std([float(r[m]) for r in rs])
        row["fp_top1"] = rs[0]["fp_top1"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the accuracy grid (Table 1)
_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}
#: the paper's Table 1 row order
METHOD_ORDER = [
    "isvit",
    "isvit-official",
    "qdrop",
    "brecq",
    "repq-vit",
    "ptq4vit",
    "qdrop-ste",
    "reparam-logsqrt2",
    "twin-uniform-mse",
    "minmax",
]


def device_label(env: Mapping[str, Any], settings: Mapping[str, Any] | None = None) -> str:
    """``"NVIDIA H100 80GB HBM3 fp32"``, ``"CPU x2 bf16"``: the device and the reconstruction matmul dtype."""
    dtype = (settings or {}).get("matmul_dtype", "float32")
    return f"{env.get('cuda') or 'CPU x' + str(env.get('threads', 1))} {_DTYPE.get(dtype, dtype)}"


def merge(paths: Iterable[str | Path]) -> dict[tuple[str, str, int], list[dict]]:
    """Group the run records of accuracy JSON files by (model, method, bits); each gains its ``device`` label."""
    cells: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for path in paths:
        payload = json.loads(Path(path).read_text())
        dev = device_label(payload.get("env", {}), payload.get("settings"))
        for r in payload["runs"]:
            cells[(r["model"], r["method"], r["w_bits"])].append({**r, "device": dev})
    return cells


def render(cells: Mapping[tuple[str, str, int], list[dict]], bits: tuple[int, ...] = (3, 4, 6)) -> str:
    """Markdown: top-1 % / agreement % / KL per bit-width (mean ± sample std when a cell has several
    seeds), the device(s) and the paper's DeiT-S top-1."""

    def cell(rs: list[dict]) -> str:
        if not rs:
            return "–"

        def fmt(k: str, scale: float, digits: int) -> str:
            v = [scale * r[k] for r in rs]
            s = f"{statistics.mean(v):.{digits}f}"
            return s + (f" ± {statistics.stdev(v):.{digits}f}" if len(v) > 1 else "")

        s = f"{fmt('q_top1', 100, 2)} / {fmt('agree_top1', 100, 1)} / {fmt('kl_to_fp', 1, 4)}"
        return s + (f" (n={len(rs)})" if len(rs) > 1 else "")

    head = (
        ["model", "method"]
        + [f"W{b}/A{b} top-1 / agree / KL" for b in bits]
        + ["run on", "paper DeiT-S " + ", ".join(f"{b}/{b}" for b in bits)]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def key(k: tuple[str, str]) -> tuple:
        return (k[0] != "vit", k[0], METHOD_ORDER.index(k[1]) if k[1] in METHOD_ORDER else len(METHOD_ORDER), k[1])

    for model, method in sorted({(k[0], k[1]) for k in cells}, key=key):
        rows = [cells.get((model, method, b), []) for b in bits]
        devs = sorted({r["device"] for rs in rows for r in rs})
        paper = ", ".join("–" if (v := paper_top1(method, b, b)) is None else f"{v:.2f}" for b in bits)
        label = f"embedded-{model}" if model in ("vit", "swin") else model  # timm names as they are
        lines.append("| " + " | ".join([label, method, *map(cell, rows), "; ".join(devs), paper]) + " |")
    return "\n".join(lines)


def accuracy_cells(root: str | Path | None = None) -> dict[tuple[str, str, int], list[dict]]:
    """The committed accuracy grid (``accuracy/*.json``) grouped by (model, method, bits)."""
    return merge(sorted((Path(root or results_dir()) / "accuracy").glob("*.json")))


def accuracy_table(root: str | Path | None = None, models: Sequence[str] | None = None) -> str:
    """The README's accuracy table (all models, or those named: ``"vit"``, ``"swin"``)."""
    cells = accuracy_cells(root)
    return render({k: v for k, v in cells.items() if models is None or k[0] in models})


def accuracy_summary(model: str, method: str, bits: int, root: str | Path | None = None) -> dict[str, Any]:
    """Mean / std / n over seeds of one grid cell: ``q_top1``, ``agree_top1``, ``kl_to_fp``, ``fp_top1``..."""
    rs = accuracy_cells(root).get((model, method, bits))
    if not rs:
        raise KeyError(f"no committed accuracy runs for {model} {method} W{bits}/A{bits}")
    rows = aggregate([{**r, "model": model} for r in rs])
    return {**rows[0], "iters": rs[0]["iters"], "calib_images": rs[0]["calib_images"], "test_images": rs[0]["n"],
            "devices": sorted({r["device"] for r in rs})}  # fmt: skip


# ----------------------------------------------------------------------------- ablations (Tables 3-4, Figs. 4-5)
#: The SULQ + SOS cell shared by Tables 3, 4 and Fig. 5: the accuracy grid's seed-1 CPU run (same settings).
ABLATION_REFERENCE = "accuracy/cpu_bf16_vit_isvit_w3_s1.json"
#: Fig. 5's 32-image point: the hard-regime run of I&S-ViT (seed 0, 2 threads; otherwise the same settings).
FIG5_32_IMAGES = "hard_regime/cpu_w3a3_calib32_bf16.json"


def _ablation_run(name: str, root: Path) -> dict[str, Any]:
    """The I&S-ViT run of ablation ``name``: ``"reference"``, ``"fig5_calib32"`` or a cell of ``ablations/w3a3``."""
    rel = {"reference": ABLATION_REFERENCE, "fig5_calib32": FIG5_32_IMAGES}.get(name, f"ablations/w3a3/{name}.json")
    path = root / rel
    if not path.is_file():
        raise ResultsNotFoundError(f"ablation cell {name!r} missing: {path} (python -m benchmarks.artifacts --parts ablations)")
    payload = json.loads(path.read_text())
    (run,) = [r for r in payload["runs"] if r["method"] == "isvit"]
    return {**run, "device": device_label(payload.get("env", {}), payload.get("settings")), "file": rel}


def ablation_tables(root: str | Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """Paper Tables 3 and 4 and Fig. 5 on the embedded ViT at W3/A3 from the committed runs.

    Returns ``{"table3": [...], "table4": [...], "fig5": [...], "fig5_missing": [calibration sizes
    whose run is not committed]}``; each row has the measured
    ``q_top1`` / ``agree_top1`` / ``kl_to_fp`` / ``wall_s`` of one run (1000 iterations, bf16
    reconstruction matmuls on the CPU; seed 1, except Fig. 5's 32-image point, the hard-regime run
    with seed 0) beside the paper's DeiT-S top-1 (``paper_deit_s``).
    """
    base = Path(root or results_dir())
    keep = ("q_top1", "agree_top1", "kl_to_fp", "wall_s", "calib_images", "iters", "seed", "device")

    def row(name: str, **extra: Any) -> dict[str, Any]:
        r = _ablation_run(name, base)
        return {**extra, **{k: r[k] for k in keep}}

    t3_cells = {
        (False, False): "t3_log2_nosos",
        (True, False): "t3_sulq_nosos",
        (False, True): "t3_log2_sos",
        (True, True): "reference",
    }
    table3 = [row(c, SULQ=sulq, SOS=sos, paper_deit_s=TABLE3[sulq, sos]) for (sulq, sos), c in t3_cells.items()]
    t4_cells = {"log2": "t3_log2_sos", "uniform": "t4_uniform_sos", "sulq": "reference"}
    table4 = [row(c, softmax=q, paper_deit_s=TABLE4[q]) for q, c in t4_cells.items()]
    f5_cells = {32: "fig5_calib32", 512: "fig5_calib512", 1024: "reference", 2048: "fig5_calib2048"}
    fig5, missing = [], []
    for n, c in f5_cells.items():
        try:
            fig5.append(row(c, paper_deit_s=FIG5.get(n)))
        except ResultsNotFoundError:  # a Fig. 5 point not run yet at paper settings: listed, never invented
            missing.append(n)
    return {"table3": table3, "table4": table4, "fig5": fig5, "fig5_missing": missing}


def runtime_points(model: str = "vit", bits: int = 3, seed: int = 1, root: str | Path | None = None) -> list[dict[str, Any]]:
    """Paper Fig. 4: (calibration wall time, agreement) per method from the committed grid runs of one
    seed on this project's CPU (one thread; reconstruction methods with bf16 matmuls)."""
    rows = []
    for (m, method, b), rs in accuracy_cells(root).items():
        for r in rs:
            if m == model and b == bits and r["seed"] == seed and r["device"].startswith("CPU"):
                rows.append({"method": method, "wall_s": r["wall_s"], "agree_top1": r["agree_top1"], "q_top1": r["q_top1"],
                             "device": r["device"]})  # fmt: skip
    order = {name: i for i, name in enumerate(METHOD_ORDER)}
    return sorted(rows, key=lambda r: order.get(r["method"], len(order)))


# ----------------------------------------------------------------------------- landscapes (Fig. 3)
def landscapes(root: str | Path | None = None) -> tuple[dict[tuple[int, str, str], Any], dict[str, Any], dict[str, Any]]:
    """Notebook 02's committed landscapes: ``(block_landscapes, model_landscapes, artifact_payload)``,
    block landscapes keyed ``(block, stage, config)`` as :func:`isvit_viz.analysis.sos_study` returns them."""
    from .analysis.landscape import Landscape

    payload = load_artifact("landscapes", root)
    block = {}
    for key, d in payload["block"].items():
        b, stage, cfg = key.split("|")
        block[(int(b), stage, cfg)] = Landscape.from_dict(d)
    whole = {k: Landscape.from_dict(d) for k, d in payload["model"].items()}
    return block, whole, payload


def format_summary(s: Mapping[str, Any]) -> str:
    """One line for a grid cell summary from :func:`accuracy_summary` (percent, mean ± std over seeds)."""

    def pm(k: str, scale: float, digits: int) -> str:
        std = s.get(f"{k}_std")
        return f"{scale * s[k]:.{digits}f}" + ("" if std is None else f" ± {scale * std:.{digits}f}")

    return (f"FP top-1 {100 * s['fp_top1']:.2f} %, quantized top-1 {pm('q_top1', 100, 2)} %, agreement with FP "
            f"{pm('agree_top1', 100, 1)} %, KL(FP||Q) {pm('kl_to_fp', 1, 4)} (n={s['n']} seeds)")  # fmt: skip


def full_mode_cost(model: str, method: str, bits: int, root: str | Path | None = None) -> dict[str, Any]:
    """Measured wall time of one paper-setting run from the committed grid: the fastest CPU run and the
    fastest GPU run (seconds, with their device labels; ``None`` where none was run)."""
    out: dict[str, Any] = {"cpu_s": None, "cpu_device": None, "gpu_s": None, "gpu_device": None}
    for r in accuracy_cells(root).get((model, method, bits), []):
        kind = "cpu" if r["device"].startswith("CPU") else "gpu"
        if out[f"{kind}_s"] is None or r["wall_s"] < out[f"{kind}_s"]:
            out[f"{kind}_s"], out[f"{kind}_device"] = float(r["wall_s"]), r["device"]
    return out
