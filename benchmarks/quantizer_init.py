"""Percentile-MSE per-channel initialisation: vectorised vs a per-channel Python loop, side by side.

python -m benchmarks.quantizer_init            # [64, 197, 1536] activation, 1 thread
"""

from __future__ import annotations

import time

import torch

from isvit_viz.quant.uniform import ACT_PERCENTILES, percentile_mse_search

from ._common import parser, write


def loop_reference(x2d: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official structure: one search per channel in a Python loop (same arithmetic per row)."""
    s, z = zip(*(percentile_mse_search(x2d[c : c + 1], bits, ACT_PERCENTILES) for c in range(x2d.shape[0])))
    return torch.cat(s), torch.cat(z)


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (4, 197, 96) if args.smoke else (64, 197, 1536)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 5, shape[-1])
    x2d = x.reshape(-1, shape[-1]).t().contiguous()  # channels of the last axis as rows
    t0 = time.perf_counter()
    s_vec, z_vec = percentile_mse_search(x2d, 4, ACT_PERCENTILES)
    t_vec = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_loop, z_loop = loop_reference(x2d, 4)
    t_loop = time.perf_counter() - t0
    equal = bool(torch.equal(s_vec, s_loop) and torch.equal(z_vec, z_loop))
    assert equal, "vectorised and loop searches disagree"
    t0 = time.perf_counter()
    from isvit_viz.quant import UniformQuantizer

    UniformQuantizer(4, channel_axis=-1).calibrate(x)  # the public path, including the channel move
    t_api = time.perf_counter() - t0
    rows = [
        {
            "shape": str(list(shape)),
            "vectorised_s": t_vec,
            "quantizer_calibrate_s": t_api,
            "loop_s": t_loop,
            "speedup": t_loop / t_vec,
            "equal": equal,
        }
    ]
    write("quantizer_init", args.out, {"target": "<= 2 s and >= 20x on [64, 197, 1536], 1 thread"}, rows, list(rows[0]))


if __name__ == "__main__":
    main()
