"""The straight-through rule (isvit_viz.quant.ste): hand-derived gradients at and beyond the edge codes.

Rule: the gradient passes where the rounded code lies in [lo, hi], edges included (the clamp backward
of the PyTorch 1.x the official code ran on), and is zero outside; log-domain quantizers add their
chain rule (log2: x_hat / x; SULQ: (x_hat + eta) / (x + eta)).
"""

import math

import pytest
import torch

from isvit_viz.quant import SULQ, AdaLogQuantizer, Log2Quantizer, LogSqrt2Quantizer, TwinUniformQuantizer, UniformQuantizer
from isvit_viz.quant.base import Quantizer
from isvit_viz.quant.ste import clamp_ste


def _grad(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


def _ready(q: Quantizer, **buffers: float) -> Quantizer:
    for name, v in buffers.items():
        getattr(q, name).fill_(v)
    q.initialized.fill_(True)
    return q


def test_clamp_ste_values_and_inclusive_edges():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0, 4.0, 5.0])
    y = clamp_ste(x.clone().requires_grad_(True), 0, 4)
    assert torch.equal(y.detach(), torch.clamp(x, 0, 4))
    assert _grad(lambda t: clamp_ste(t, 0, 4), x).tolist() == [0, 1, 1, 1, 1, 0]
    assert _grad(lambda t: clamp_ste(t, 1.0), x).tolist() == [0, 0, 1, 1, 1, 1]  # one-sided
    assert _grad(lambda t: clamp_ste(t, None, 3.0), x).tolist() == [1, 1, 1, 1, 0, 0]


# x/s with fractional part 0.3 or 0.7 so round() is unambiguous; z = 2, qmax = 7 (3 bits), s = 0.5.
# rounded code:   -1 (out)  0 (edge)  3 (in)  7 (edge)  8 (out)
_U_XS = [-2.7, -1.7, 1.3, 5.3, 5.7]
_U_CODES = [-1, 0, 3, 7, 8]
_U_GRAD = [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("fused", [True, False])
def test_uniform_per_tensor_edges(fused):
    q = UniformQuantizer(3)
    q.set_params(torch.tensor(0.5), torch.tensor(2.0))
    x = torch.tensor(_U_XS) * 0.5
    assert (torch.round(x / 0.5) + 2).tolist() == _U_CODES
    fwd = q if fused else (lambda t: Quantizer.forward(q, t))
    assert _grad(fwd, x).tolist() == _U_GRAD
    assert list(q.parameters()) == [] and not q.scale.requires_grad  # scale / zero-point are frozen buffers


@pytest.mark.parametrize("fused", [True, False])
def test_uniform_per_channel_weight_edges(fused):
    scale, zp = torch.tensor([[0.5], [0.25]]), torch.tensor([[2.0], [2.0]])
    q = UniformQuantizer(3, channel_axis=0)
    q.set_params(scale, zp, channel_axis=0)
    w = torch.tensor(_U_XS).repeat(2, 1) * scale  # same codes in both rows
    fwd = q if fused else (lambda t: Quantizer.forward(q, t))
    assert _grad(fwd, w).tolist() == [_U_GRAD, _U_GRAD]


def test_log2_edges():
    q = Log2Quantizer(2, scale=1.0).calibrate(torch.ones(4))  # codes 0..3, levels 2^-k
    # -log2 x:   -0.7 (k=-1 out)  -0.3 (k=0 edge)  1.2 (k=1)  3.3 (k=3 edge)  3.7 (k=4 out)
    e = torch.tensor([-0.7, -0.3, 1.2, 3.3, 3.7])
    expect = [0.0, 2**-0.3, 2**0.2, 2**0.3, 0.0]  # x_hat / x = 2^-k / 2^-e inside
    torch.testing.assert_close(_grad(q, torch.exp2(-e)), torch.tensor(expect), rtol=1e-6, atol=0)


def test_log2_flush_to_zero_code_has_no_gradient():
    q = Log2Quantizer(2, underflow="zero", scale=1.0).calibrate(torch.ones(4))  # code 4 -> 0
    g = _grad(q, torch.exp2(-torch.tensor([3.3, 3.7, 9.0])))
    torch.testing.assert_close(g, torch.tensor([2**0.3, 0.0, 0.0]), rtol=1e-6, atol=0)


def test_logsqrt2_and_adalog_edges():
    q = _ready(LogSqrt2Quantizer(2), scale=1.0)  # k = round(-2 log2 x), levels 2^(-k/2), k = 4 -> 0
    x = torch.exp2(-torch.tensor([0.15, 1.6, 1.85]))  # -2 log2 x = 0.3 (k=0), 3.2 (k=3 edge), 3.7 (k=4 -> 0)
    torch.testing.assert_close(_grad(q, x), torch.tensor([2**0.15, 2**0.1, 0.0]), rtol=1e-6, atol=0)
    a = _ready(AdaLogQuantizer(2), scale=1.0, log2_base=0.5)  # k = round(-2 log2 x), k = 3 -> 0
    x = torch.exp2(-torch.tensor([0.15, 1.1, 1.35]))  # k = 0 (edge), 2 (last nonzero code), 3 (zero)
    torch.testing.assert_close(_grad(a, x), torch.tensor([2**0.15, 2**0.1, 0.0]), rtol=1e-6, atol=0)


def test_twin_uniform_edges():
    q = _ready(TwinUniformQuantizer(3, kind="softmax"), step1=1 / 64, step2=0.25)  # h = 4: codes 0..3 per range
    # R1 (c1 <= 3): x = 0.3/64 (c1 = 0 edge), 3.3/64 (c1 = 3 edge); R2: 0.8 (c2 = 3 edge), 0.95 (c2 = 4 -> out)
    x = torch.tensor([0.3 / 64, 3.3 / 64, 0.8, 0.95])
    assert _grad(q, x).tolist() == [1.0, 1.0, 1.0, 0.0]


def test_sulq_official_gradient_is_shifted_ratio():
    eta = 0.01
    q = _ready(SULQ(2, mode="official", eta=eta), eta=eta, minv=math.log2(eta), maxv=math.log2(1 + eta))
    # codes round((log2(x + eta) - minv) / d), d = (maxv - minv) / 4: x = 0 -> 0 (edge), x = 1 -> 4 (edge),
    # x = 3 -> 4.95 -> 5 (out). Exponents round(minv) = -7 and round(maxv) = 0.
    x = torch.tensor([0.0, 1.0, 3.0])
    g = _grad(q, x)
    expect = [2**-7 / eta, 1 / (1 + eta), 0.0]  # (x_hat + eta) / (x + eta) = 2^e / (x + eta)
    torch.testing.assert_close(g, torch.tensor(expect), rtol=1e-6, atol=0)


def test_sulq_paper_gradient_is_shifted_ratio():
    eta = 0.01
    q = SULQ(3, mode="paper", eta=eta).calibrate(torch.tensor([0.0, 0.02, 0.3, 0.9]))
    x = torch.tensor([0.0, 0.05, 0.9, 4.0])  # calibration min (edge code 7), inside, max (edge code 0), beyond
    assert q.encode(x[:3]).tolist()[0] == 7 and q.encode(x[2:3]).item() == 0
    assert float(-torch.log2(x[3] + eta) / q._step(7)) + float(torch.round(-q.minv / q._step(7))) < -0.5  # code < 0
    xr = x.clone().requires_grad_(True)
    xh = q(xr)
    xh.sum().backward()
    expect = (xh.detach() + eta) / (x + eta)
    expect[3] = 0.0
    torch.testing.assert_close(xr.grad, expect, rtol=1e-6, atol=0)
