"""Percentile-MSE per-channel initialisation: vectorised vs a per-channel Python loop, side by side.

python -m benchmarks.quantizer_init            # [64, 197, 1536] activation, 1 thread
"""

from __future__ import annotations

import time

import torch

from isvit_viz.quant.uniform import ACT_PERCENTILES, percentile_mse_search

from ._common import parser, write


def loop_reference(x2d: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One search per channel in a Python loop, with our quantile routine: bit-identical results."""
    s, z = zip(*(percentile_mse_search(x2d[c : c + 1], bits, ACT_PERCENTILES) for c in range(x2d.shape[0])))
    return torch.cat(s), torch.cat(z)


def official_loop(x2d: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's per-channel loop: torch.quantile per channel and candidate, one fake-quant
    per candidate (method.md 2.1). torch.quantile's rank arithmetic differs from ours in the last
    float32 bits, so its scales match to ~1e-5 relative, not bit for bit."""
    qmax = 2**bits - 1
    out_s, out_z = [], []
    for c in range(x2d.shape[0]):
        xc = x2d[c]
        best = None
        for p in ACT_PERCENTILES:
            hi, lo = torch.quantile(xc, p), torch.quantile(xc, 1 - p)
            s = ((hi - lo) / qmax).clamp_min(1e-8)
            z = torch.round(-lo / s)
            xq = (torch.clamp(torch.round(xc / s) + z, 0, qmax) - z) * s
            err = (xc - xq).pow(2).mean()
            if best is None or err < best[0]:
                best = (err, s, z)
        out_s.append(best[1])
        out_z.append(best[2])
    return torch.stack(out_s), torch.stack(out_z)


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
    s_off, z_off = official_loop(x2d, 4)
    t_off = time.perf_counter() - t0
    off_rel = float(((s_off - s_vec).abs() / s_vec).max())
    off_z_same = float((z_off == z_vec).double().mean())
    t0 = time.perf_counter()
    from isvit_viz.quant import UniformQuantizer

    UniformQuantizer(4, channel_axis=-1).calibrate(x)  # the public path, including the channel move
    t_api = time.perf_counter() - t0
    rows = [{"shape": str(list(shape)), "vectorised_s": t_vec, "quantizer_calibrate_s": t_api, "own_loop_s": t_loop, "equal": equal,
             "official_loop_s": t_off, "speedup_vs_official_loop": t_off / t_vec, "official_scale_max_rel_diff": off_rel,
             "official_zero_point_match": off_z_same}]  # fmt: skip
    write("quantizer_init", args.out, {"target": "<= 2 s and >= 20x on [64, 197, 1536], 1 thread"}, rows, list(rows[0]))


if __name__ == "__main__":
    main()
