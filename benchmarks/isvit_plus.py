"""``isvit+`` ablation: switch its ingredients one at a time (issue #17) on the embedded models.

Every cell is one run at I&S-ViT's paper settings (1024 calibration images of the seed, the run's
default iterations, all 10,000 test images), written to ``<out>/<model>_<variant>_w<b>_s<seed>.json``;
a cell whose file exists is skipped, so the command resumes a stopped grid.

python -m benchmarks.isvit_plus --models vit --variants isvit+ no-drop no-choose --bits 4 6 --seeds 0 \\
    --threads 1 --matmul-dtype bfloat16 [--checkpoint-root DIR]
python -m benchmarks.isvit_plus --report      # the ablation table from the committed cells
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

import isvit_viz as iv
from isvit_viz.calib import Method
from isvit_viz.calib.methods import isvit_plus
from isvit_viz.experiments import run_grid
from isvit_viz.utils import atomic_write_json

from ._common import env, parser

RESULTS = Path(__file__).parent / "results" / "isvit_plus"
#: The main accuracy table's cells: ``isvit+`` itself (all switches on) and ``isvit`` (choice and mixing off).
ACCURACY = Path(__file__).parent / "results" / "accuracy"

#: variant -> (what it switches, how to build it). ``isvit+`` is the registered method itself; without the
#: choice it is exactly ``isvit`` (the reference row, from the main table).
VARIANTS: dict[str, tuple[str, Callable[[], Method]]] = {
    "isvit+": ("all ingredients (the registered method)", isvit_plus),
    "drop": ("+ QDrop mixing (p = 0.5) in stage 3", lambda: isvit_plus(act_drop_prob=0.5, name="isvit+_drop")),
    "isvit-drop": (
        "I&S-ViT + QDrop mixing in stage 3 (no choice)",
        lambda: isvit_plus(choose_softmax=False, act_drop_prob=0.5, name="isvit+_isvit-drop"),
    ),
    "no-sos": ("one quantized-weight reconstruction, layer-wise post-LN", lambda: isvit_plus(sos=False, name="isvit+_no-sos")),
    "adaround": ("AdaRound instead of STE weights in stage 3", lambda: isvit_plus(rounding="adaround", name="isvit+_adaround")),
    "fisher-dplr": (
        "FIMA-Q's DPLR Fisher loss (k = 5) instead of MSE",
        lambda: isvit_plus(loss="fisher_dplr", name="isvit+_fisher-dplr"),
    ),
}  # fmt: skip


def cell_path(out: Path, model: str, variant: str, bits: int, seed: int) -> Path:
    return out / f"{model}_{variant}_w{bits}_s{seed}.json"


def run_cell(model_name: str, variant: str, bits: int, seed: int, args) -> dict:
    """One run of ``variant`` at ``bits``/``bits``; the record of :func:`isvit_viz.experiments.run_grid`."""
    model, splits = iv.load_embedded(model_name)
    ckpt = None if args.checkpoint_root is None else args.checkpoint_root / model_name
    (rec,) = run_grid(model, lambda s: splits.calib_tensors(args.calib, seed=s)[0], splits.test(args.test),
                      [VARIANTS[variant][1]()], [(bits, bits)], iters=args.iters, seeds=[seed], checkpoint_root=ckpt,
                      matmul_dtype=args.matmul_dtype)  # fmt: skip
    return {"model": model_name, "variant": variant, "switch": VARIANTS[variant][0], **rec}


#: Rows of the table: the variants, then I&S-ViT itself for reference.
ROWS = {**{v: switch for v, (switch, _) in VARIANTS.items()}, "isvit": "no choice: SULQ everywhere (= isvit, main table)"}


def load_cells(out: Path, accuracy: Path | None = ACCURACY) -> list[dict]:
    """Every ablation cell in ``out``, plus the ``isvit+`` and ``isvit`` runs of the accuracy folder
    (``variant`` = method name there)."""
    cells = [json.loads(p.read_text())["run"] for p in sorted(out.glob("*.json"))]
    for p in sorted(accuracy.glob("*.json")) if accuracy is not None else ():
        runs = json.loads(p.read_text()).get("runs", [])
        cells += [{**r, "variant": r["method"]} for r in runs if r.get("method") in ("isvit+", "isvit")]
    return cells


def report(out: Path, accuracy: Path | None = ACCURACY) -> str:
    """Markdown table: per model, variant and bit-width, agreement % / KL (mean ± std over seeds)."""
    cells = load_cells(out, accuracy)
    lines = ["| model | variant | switch | " + " | ".join(f"W{b}/A{b} agree / KL" for b in (3, 4, 6)) + " |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for model in ("vit", "swin"):
        for variant, switch in ROWS.items():
            row = []
            for b in (3, 4, 6):
                rs = [c for c in cells if (c["model"], c["variant"], c["w_bits"]) == (model, variant, b)]
                row.append(_mean_cell(rs))
            if any(c != "–" for c in row):
                lines.append(f"| {model} | {variant} | {switch} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _mean_cell(rs: list[dict]) -> str:
    if not rs:
        return "–"
    agree, kl = [100 * r["agree_top1"] for r in rs], [r["kl_to_fp"] for r in rs]
    if len(rs) == 1:
        return f"{agree[0]:.1f} / {kl[0]:.4f} (n=1)"
    return f"{statistics.mean(agree):.1f} ± {statistics.stdev(agree):.1f} / {statistics.mean(kl):.4f} (n={len(rs)})"


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.set_defaults(out=RESULTS)
    p.add_argument("--models", nargs="*", default=["vit"], choices=["vit", "swin"])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--bits", nargs="*", type=int, default=[3, 4, 6])
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--test", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--matmul-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--checkpoint-root", type=Path, default=None)
    p.add_argument("--report", action="store_true", help="print the table of the cells in --out (+ the accuracy folder)")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.out))
        return
    if args.smoke:
        args.calib, args.test, args.iters = 64, 200, 1
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        for variant in args.variants:
            for bits in args.bits:
                for seed in args.seeds:
                    path = cell_path(args.out, model, variant, bits, seed)
                    if path.exists():
                        continue
                    rec = run_cell(model, variant, bits, seed, args)
                    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
                    atomic_write_json(path, {"env": env(), "settings": settings, "run": rec})
                    print(f"{path.name}: agreement {100 * rec['agree_top1']:.2f} %, KL {rec['kl_to_fp']:.4f}, "
                          f"{rec['wall_s']:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
