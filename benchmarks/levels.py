"""Post-softmax statistics and quantizer levels of the embedded ViT: writes the committed artifacts
``attention`` and ``levels`` (notebook 01 opens on them).

python -m benchmarks.levels [--smoke] [--root DIR]

* ``attention``: post-softmax statistics of the embedded ViT on the first 1000 test images: per-layer
  row-max mean and share below 1e-3, per layer x head histograms on log-spaced edges, and a fixed-seed
  sample of 6000 probabilities per layer (6 significant digits), the values every ``levels`` number
  is measured on.
* ``levels``: codes / distinct / used levels, MSE and the share on the lowest level vs bits (2-8) for
  LQ, UQ, log-sqrt2, AdaLog, SULQ paper and official mode on that sample; the same at 3/4/6 bits on
  synthetic softmax (logits ~ N(0, 2.5^2), seed 0); SULQ's eta trade-off (share on the lowest level,
  MSE, and agreement / KL of the ViT with only its post-softmax maps quantized, calibrated on 256
  calibration images, evaluated on the 1000 test images) at 3, 4, 6 bits (paper) and 3 bits (official).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import isvit_viz as iv
from isvit_viz import analysis, results
from isvit_viz.experiments import markdown_table

from ._common import parser

FULL = {"test_images": 1000, "capture_sample_per_layer": 200_000, "artifact_sample_per_layer": 6000, "calib_images": 256,
        "bits": list(range(2, 9)), "tradeoff": [[3, "paper"], [4, "paper"], [6, "paper"], [3, "official"]],
        "etas": list(analysis.ETA_GRID), "synthetic_shape": [8, 6, 197, 197], "synthetic_bits": [3, 4, 6], "seed": 0}  # fmt: skip
SMOKE = {**FULL, "test_images": 16, "capture_sample_per_layer": 2000, "artifact_sample_per_layer": 300, "calib_images": 16,
         "bits": [3, 4], "tradeoff": [[3, "paper"]], "etas": [1e-3, 1e-2], "synthetic_shape": [1, 2, 50, 50], "synthetic_bits": [6]}  # fmt: skip


#: The other post-softmax quantizers, measured in the same softmax-only model at each trade-off's bits.
BASELINES = {k: v for k, v in analysis.LEVEL_QUANTIZERS.items() if not k.startswith("SULQ")}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--root", type=Path, default=None, help="results folder to write artifacts/ into (default: the committed one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = SMOKE if args.smoke else FULL
    command = "python -m benchmarks.levels" + (" --smoke" if args.smoke else "")
    model, splits = iv.load_embedded("vit")
    x_test, y_test = splits.test_tensors(cfg["test_images"])

    t0 = time.perf_counter()
    stats = analysis.capture_attention(model, x_test, sample_per_layer=cfg["capture_sample_per_layer"], seed=cfg["seed"])
    att = analysis.attention_to_artifact(stats, cfg["artifact_sample_per_layer"], seed=cfg["seed"])
    att_settings = {k: cfg[k] for k in ("test_images", "capture_sample_per_layer", "artifact_sample_per_layer", "seed")}
    att_settings["threads"] = args.threads
    path = results.write_artifact("attention", att, att_settings, command, time.perf_counter() - t0, root=args.root)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")

    t1 = time.perf_counter()
    values = analysis.attention_from_artifact(att).sample()  # the stored values, so the numbers are reproducible from them
    by_bits = analysis.levels_vs_bits(values, cfg["bits"], progress=True)
    synthetic = analysis.levels_vs_bits(
        analysis.synthetic_softmax(cfg["seed"], cfg["synthetic_shape"]), cfg["synthetic_bits"], progress=True
    )
    calib = splits.calib_tensors(cfg["calib_images"], seed=cfg["seed"])[0]
    tradeoffs = [
        analysis.eta_tradeoff(
            values,
            b,
            mode,
            cfg["etas"],
            model=model,
            calib_images=calib,
            eval_images=x_test,
            eval_labels=y_test,
            baselines=BASELINES,
        )
        for b, mode in cfg["tradeoff"]
    ]
    data = {"n_values": int(values.numel()), "levels_vs_bits": by_bits, "synthetic": synthetic, "eta_tradeoff": tradeoffs}
    settings = {**cfg, "threads": args.threads, "values": "the attention artifact's samples (all layers)"}
    path = results.write_artifact("levels", data, settings, command, time.perf_counter() - t1, root=args.root)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    cols = ["label", "bits", "n_codes", "distinct_levels", "used_levels", "mse", "collapsed", "next"]
    print(markdown_table(by_bits, cols))
    for t in tradeoffs:
        print(f"\n{t['bits']}-bit SULQ {t['mode']}: searched eta {t['searched_eta']:.3g}, per layer {t['searched']}")
        print(f"same bits, softmax-only baselines: {t['baselines']}")
        print(
            markdown_table(
                t["rows"], ["eta", "lowest_level", "collapsed", "next", "distinct_levels", "mse", "agree_top1", "kl_to_fp"]
            )
        )


if __name__ == "__main__":
    main()
