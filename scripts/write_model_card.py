#!/usr/bin/env python
"""Install trained embedded models into ``isvit_viz/assets`` and write MODEL_CARD.md.

Usage: ``python scripts/write_model_card.py [--train-dir runs/train] [vit swin]``

For each model: copies the fp16 safetensors written by ``train_embedded.py``, evaluates it with
``isvit_viz.evaluate`` on the full 10k test set, measures per-layer post-softmax statistics, and
records everything in ``assets/embedded_metrics.json`` (tests assert these numbers) and the model card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from isvit_viz._assets import ASSETS_DIR, MANIFEST, sha256  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=["vit", "swin"])
    ap.add_argument("--train-dir", type=Path, default=ROOT / "runs" / "train")
    ap.add_argument("--stat-images", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(2)

    metrics_path = ASSETS_DIR / "embedded_metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    for name in args.names:
        src = args.train_dir / name
        shutil.copyfile(src / f"embedded_{name}.safetensors", ASSETS_DIR / f"embedded_{name}.safetensors")
        train = json.loads((src / "train_result.json").read_text())
        _write_manifest()
        import isvit_viz as iv
        from isvit_viz import analysis

        model, splits = iv.load_embedded(name)
        res = iv.evaluate(model, splits.test(), progress=False)
        stats = analysis.capture_attention(model, splits.test_tensors(args.stat_images)[0], sample_per_layer=0)
        metrics[name] = {
            "top1": res["top1"], "top5": res["top5"], "n": res["n"],
            "train": {k: v for k, v in train.items() if k != "log"}, "train_log": train["log"],
            "attention": {"images": args.stat_images, "layers": stats.layer_names,
                          "row_max_mean": [round(float(v), 4) for v in stats.row_max_mean],
                          "frac_below_1e-3": [round(float(v), 4) for v in stats.frac_below_1e3]},
            "weights_bytes": (ASSETS_DIR / f"embedded_{name}.safetensors").stat().st_size,
        }  # fmt: skip
        print(name, res)
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    _write_manifest()
    (ASSETS_DIR / "MODEL_CARD.md").write_text(render_card(metrics))


def _write_manifest() -> None:
    files = sorted(p for p in ASSETS_DIR.iterdir() if p.suffix in (".safetensors", ".npz"))
    MANIFEST.write_text(json.dumps({p.name: sha256(p) for p in files}, indent=1) + "\n")


def render_card(metrics: dict) -> str:
    lines = [
        "# Embedded default models (Fashion-MNIST)",
        "",
        "Two small timm vision transformers trained by `scripts/train_embedded.py` on the full Fashion-MNIST",
        "train split (60,000 images, Debian package `dataset-fashion-mnist`), so that every analysis in",
        "isvit_viz runs on a *trained* transformer with peaked attention without ImageNet or network access.",
        "",
        "Data licence: Fashion-MNIST is MIT-licensed (Copyright (c) 2017 Zalando SE). The package ships the",
        "10k test split and a 2,048-image seeded subset of the train split (`fashion_mnist_*.npz`).",
        "",
        "Weights are stored as fp16 safetensors and evaluated in fp32. Accuracy below is measured by",
        "`isvit_viz.evaluate` on the full 10,000-image test set with the shipped fp16 weights (the tests",
        "assert these exact numbers).",
        "",
    ]
    for name, m in metrics.items():
        t = m["train"]
        arch = dict(t["arch"])
        fam = arch.pop("family")
        cls = (
            "timm.models.vision_transformer.VisionTransformer" if fam == "vit" else "timm.models.swin_transformer.SwinTransformer"
        )
        lines += [
            f"## `{name}`",
            "",
            f"- Architecture: `{cls}({', '.join(f'{k}={v}' for k, v in arch.items())})`, {t['params_M']} M parameters.",
            f"- Recipe: AdamW (lr {t['lr']}, weight decay {t['weight_decay']}), batch {t['batch_size']}, {t['warmup']:.0%} linear warm-up then "
            f"cosine decay over {t['epochs']} epochs ({t['steps']} steps), label smoothing 0.1, random +-2 px shift and horizontal flip, "
            f"drop-path 0.05, bf16 autocast on the CPU, {t['threads']} thread(s), seed {t['seed']}, torch {t['torch']}.",
            f"- Training wall time: {t['train_wall_min']:.1f} min on a shared 2-core CPU (excluding per-epoch evaluation).",
            f"- **Test top-1: {m['top1']:.4f}** (top-5 {m['top5']:.4f}, n = {m['n']}).",
            f"- Weights file: `embedded_{name}.safetensors`, {m['weights_bytes'] / 1e6:.2f} MB.",
            "",
            f"Per-layer post-softmax statistics on the first {m['attention']['images']} test images (uniform attention would give a",
            "row maximum of 1/N):",
            "",
            "| layer | mean of row max | share of probabilities < 1e-3 |",
            "|---|---|---|",
        ]
        for ln, rm, fb in zip(m["attention"]["layers"], m["attention"]["row_max_mean"], m["attention"]["frac_below_1e-3"]):
            lines.append(f"| `{ln}` | {rm:.3f} | {fb:.1%} |")
        lines += ["", "Training curve (accuracy on the first 2,000 test images after each epoch):", ""]
        lines.append("| epoch | " + " | ".join(str(e["epoch"]) for e in m["train_log"]) + " |")
        lines.append("|---|" + "---|" * len(m["train_log"]))
        lines.append("| top-1 | " + " | ".join(f"{e['acc_test2k']:.3f}" for e in m["train_log"]) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
