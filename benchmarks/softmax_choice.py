"""Which post-softmax quantizer has the lowest attention-output error, per attention and bit-width.

I&S-ViT's placement (paper-mode SULQ) is calibrated on the calibration images, then a ``ChooseSoftmax``
stage scores SULQ, uniform and log-sqrt2 on every attention's ``P @ V`` (:mod:`isvit_viz.calib.choose`):
``mean((Q(P) @ V_q - P @ V_q) ** 2)``. Reported: how many attentions each quantizer wins, and SULQ's error
over the best one per attention (1.0 where SULQ wins). Calibration only (seconds per cell).

python -m benchmarks.softmax_choice [--models vit swin] [--bits 3 4 6] [--calib 256]
"""

from __future__ import annotations

import collections
from dataclasses import replace

import torch

import isvit_viz as iv
from isvit_viz.calib import METHODS, Calibrate, ChooseSoftmax

from ._common import parser, write


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="*", default=["vit", "swin"])
    p.add_argument("--bits", nargs="*", type=int, default=[3, 4, 6])
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--candidates", nargs="*", default=["sulq", "uniform", "logsqrt2"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.models, args.bits, args.calib = ["vit"], [4], 16
    runs, rows = [], []
    for name in args.models:
        model, splits = iv.load_embedded(name)
        calib, _ = splits.calib_tensors(args.calib, seed=0)
        stages = (Calibrate(images=args.calib), ChooseSoftmax(candidates=tuple(args.candidates), images=args.calib))
        method = replace(METHODS["isvit"], name="isvit-choose", stages=stages, provenance={})
        for bits in args.bits:
            res = iv.quantize(model, method, bits, bits, calib, seed=0, progress=False)
            recs = [u for u in res.unit_losses if "softmax_choice" in u]
            wins = collections.Counter(r["softmax_choice"] for r in recs)
            ratio = [r["errors"]["sulq"] / min(r["errors"].values()) for r in recs]
            runs += [{"model": name, "bits": bits, "attention": r["unit"], "choice": r["softmax_choice"], "errors": r["errors"]}
                     for r in recs]  # fmt: skip
            rows.append({"model": name, "W/A": f"{bits}/{bits}", "attentions": len(recs),
                         **{f"{c} wins": wins.get(c, 0) for c in args.candidates},
                         "SULQ error / best (per attention)": ", ".join(f"{x:.2f}" for x in ratio)})  # fmt: skip
    write("softmax_choice", args.out, {"settings": vars(args), "runs": runs}, rows, list(rows[0]))


if __name__ == "__main__":
    main()
