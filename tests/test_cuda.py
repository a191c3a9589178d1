"""CUDA-only checks, run on a GPU machine (``pytest tests/test_cuda.py``); skipped without CUDA.

The CPU suite covers the same code paths on CPU (device-resident caches via an explicit budget,
``tests/test_reliability.py``); these confirm them on a real GPU.
"""

from __future__ import annotations

import pytest
import torch

import isvit_viz as iv
from isvit_viz.calib.cache import MemoryBudget, TensorCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cache_lives_on_the_gpu_and_gathers_the_same_rows():
    dev = torch.device("cuda")
    x = torch.randn(100, 5, 7)
    gpu, host = TensorCache(100, (5, 7), MemoryBudget(1 << 30, device=dev)), TensorCache(100, (5, 7), MemoryBudget(1 << 30))
    assert (gpu.storage, host.storage) == ("device", "host")
    gpu.write(0, x.to(dev))
    host.write(0, x)
    idx = torch.tensor([3, 1, 99, 50])
    assert torch.equal(gpu.gather(idx, dev).cpu(), host.gather(idx, dev).cpu())


def test_quantize_on_cuda_matches_cpu_closely():
    model, splits = iv.load_embedded("vit")
    calib, _ = splits.calib_tensors(128)
    x, _ = splits.test_tensors(256)
    kw = dict(iters=20, batch_size=64, seed=0, progress=False)
    on_cpu = iv.quantize(model, "isvit", 4, 4, calib, device="cpu", **kw).model
    on_gpu = iv.quantize(model, "isvit", 4, 4, calib, device="cuda", **kw).model
    assert all(p.is_cuda for p in on_gpu.parameters())
    with torch.no_grad():
        a, b = on_cpu(x).argmax(1), on_gpu(x.cuda()).argmax(1).cpu()
    # rounding ties flip differently in different float kernels, so not bit-identical: near-identical
    assert (a == b).float().mean() >= 0.95
