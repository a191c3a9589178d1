"""Time of a 21x21 block-local landscape and a 21x21 whole-model landscape on the embedded ViT.

python -m benchmarks.landscape
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from loss_landscapes.metrics import Loss

import isvit_viz as iv
from isvit_viz import analysis

from ._common import parser, write


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, n = (5, 32) if args.smoke else (21, 256)
    model, splits = iv.load_embedded("vit")
    calib, _ = splits.calib_tensors(max(n, 64))
    q = analysis.fig3_models(model, calib, bits=4)["fp_w_a_channel"]
    t0 = time.perf_counter()
    analysis.block_landscape(q, model, 4, calib[:n], steps=steps)
    t_block = time.perf_counter() - t0
    x, y = splits.test_tensors(n)
    t0 = time.perf_counter()
    analysis.model_landscape(model, Loss(F.cross_entropy, x, y), steps=steps)
    t_model = time.perf_counter() - t0
    rows = [{"landscape": f"block-local {steps}x{steps}, {n} images", "seconds": t_block},
            {"landscape": f"whole-model {steps}x{steps}, {n} images", "seconds": t_model}]  # fmt: skip
    write("landscape", args.out, {}, rows, ["landscape", "seconds"])


if __name__ == "__main__":
    main()
