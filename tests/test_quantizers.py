"""Quantizer library: the paper's worked examples, the official-code tables, properties, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from isvit_viz.quant import (
    OFFICIAL_ETA_GRID,
    QUANTIZERS,
    SULQ,
    AdaLogQuantizer,
    Log2Quantizer,
    LogSqrt2Quantizer,
    TwinUniformQuantizer,
    UniformQuantizer,
    coverage,
    make_quantizer,
)
from isvit_viz.quant.uniform import rowwise_quantiles

PAPER_RANGE = torch.tensor([1.08e-8, 0.868])


# ----------------------------------------------------------------------------- paper example (1.6a)
def test_paper_example_log2_3bit_collapses_to_2_pow_minus_7():
    lq = Log2Quantizer(3, scale=1.0).calibrate(PAPER_RANGE)
    out = lq(torch.tensor([2.38e-5]))
    assert out.item() == 2.0**-7 == 7.8125e-3


def test_paper_example_log2_4bit():
    lq = Log2Quantizer(4, scale=1.0).calibrate(PAPER_RANGE)
    assert lq(torch.tensor([2.38e-5])).item() == 2.0**-15


def test_paper_example_sulq_3bit_eta_1e6():
    q = SULQ(3, mode="paper", eta=1e-6).calibrate(PAPER_RANGE)
    assert q.exponents().tolist() == [0, -3, -6, -8, -11, -14, -17, -20]  # the grid {0,3,6,8,11,14,17,20}
    out = q(torch.tensor([2.38e-5])).item()
    assert out == pytest.approx(2.0**-14 - 1e-6, rel=1e-6)
    assert f"{out:.2e}" == "6.00e-05"
    assert q.encode(torch.tensor([2.38e-5])).item() == 5
    # the log-domain range the paper draws as [19, 0]
    assert float(q.minv) == pytest.approx(-math.log2(0.868 + 1e-6), rel=1e-5)
    assert float(q.maxv) == pytest.approx(-math.log2(1.08e-8 + 1e-6), rel=1e-5)


def test_paper_mode_default_grid_reaches_1e_minus_6():
    assert min(SULQ(4).eta_grid) == 1e-6


# ----------------------------------------------------------------------------- official table (1.6b)
OFFICIAL_ROWS = [  # x, code, exponent, x_hat
    (0.0, 0, -7, -0.00219),
    (0.002, 0, -7, -0.00219),
    (0.004, 1, -6, 0.00562),
    (0.02, 2, -5, 0.02125),
    (0.1, 4, -3, 0.11500),
    (0.3, 6, -2, 0.24000),
    (0.9, 8, 0, 0.99000),
]


@pytest.fixture
def official_b3():
    return SULQ(3, mode="official", eta=0.01).calibrate(torch.tensor([0.0, 0.9]))


@pytest.mark.parametrize("x,code,exp,xhat", OFFICIAL_ROWS)
def test_official_mode_table(official_b3, x, code, exp, xhat):
    q = official_b3
    assert float(q.minv) == pytest.approx(math.log2(0.01), abs=1e-4)
    assert float(q.maxv) == pytest.approx(math.log2(0.91), abs=1e-4)
    assert q.encode(torch.tensor([x])).item() == code
    assert q.exponents()[code].item() == exp
    assert q(torch.tensor([x])).item() == pytest.approx(2.0**exp - 0.01, abs=1e-7)
    assert q(torch.tensor([x])).item() == pytest.approx(xhat, rel=1.5e-3)  # table is rounded


def test_official_mode_9_codes_8_levels(official_b3):
    q = official_b3
    assert q.n_codes == 9
    assert q.exponents().tolist() == [-7, -6, -5, -4, -3, -3, -2, -1, 0]
    lv = q.levels()
    assert len(lv) == 8
    expected = torch.tensor([2.0**e - 0.01 for e in (-7, -6, -5, -4, -3, -2, -1, 0)])
    torch.testing.assert_close(lv, expected, rtol=0, atol=1e-7)
    assert lv[0] < 0  # the negative lowest level of the official code


# eta -> max distinct levels (method.md 1.4), official mode, data spanning [0, 1)
@pytest.mark.parametrize(
    "eta,n_levels",
    [(1.0, 2), (0.5, 3), (0.1, 4), (0.05, 5), (0.02, 7), (0.01, 8), (0.005, 9), (0.001, 11)],
)
def test_official_eta_distinct_levels(eta, n_levels):
    x = torch.linspace(0, 0.999, 20001)
    q = SULQ(8, mode="official", eta=eta).calibrate(x)  # many codes: the exponent range is the cap
    assert len(q.levels()) == n_levels


def test_official_grid_is_the_11_values():
    assert SULQ(3, mode="official").eta_grid == OFFICIAL_ETA_GRID
    assert len(OFFICIAL_ETA_GRID) == 11


def test_eta_search_picks_min_mse_candidate():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(8, 50, 50) * 2.5, -1)
    q = SULQ(3, mode="official").calibrate(x)
    errs = {}
    for eta in OFFICIAL_ETA_GRID:
        errs[eta] = SULQ(3, mode="official", eta=eta)._calib_error(x)
    assert float(q.eta) == pytest.approx(min(errs, key=errs.get))


# ----------------------------------------------------------------------------- uniform quantizer
def test_uniform_minmax_exact_levels():
    q = UniformQuantizer(2, init="minmax").calibrate(torch.tensor([0.0, 3.0]))
    assert q.levels().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert q(torch.tensor([0.4, 0.6, 2.5, 9.0, -4.0])).tolist() == [0.0, 1.0, 2.0, 3.0, 0.0]


def test_rowwise_quantiles_match_torch_quantile():
    torch.manual_seed(0)
    x = torch.randn(7, 3001)
    qs = [0.97, 0.999, 0.9999, 0.99999, 0.03, 0.001, 1e-5]
    ours = rowwise_quantiles(x, qs)
    ref = torch.quantile(x, torch.tensor(qs), dim=1)
    # same interpolation rule; torch's rank arithmetic differs from ours in the last float32 bits
    torch.testing.assert_close(ours, ref, rtol=2e-5, atol=1e-6)


def test_percentile_mse_per_tensor_matches_official_loop():
    torch.manual_seed(1)
    x = torch.randn(4, 50, 16) * 3
    q = UniformQuantizer(4).calibrate(x)
    best = None
    for p in (0.999, 0.9999, 0.99999):  # the official search, written out
        hi, lo = torch.quantile(x.flatten(), p), torch.quantile(x.flatten(), 1 - p)
        s = (hi - lo) / 15
        z = torch.round(-lo / s)
        xq = (torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s
        err = (x - xq).pow(2).mean()
        if best is None or err < best[0]:
            best = (err, s, z)
    torch.testing.assert_close(q.scale, best[1], rtol=1e-6, atol=0)
    assert float(q.zero_point) == float(best[2])


def test_per_channel_large_tensor_above_quantile_limit():
    x = torch.randn(2, 4096, 2100)  # 17.2M elements > torch.quantile's 16.7M limit
    q = UniformQuantizer(4, channel_axis=-1).calibrate(x)
    assert q.scale.shape == (1, 1, 2100)


# ----------------------------------------------------------------------------- properties
def _make(name, bits):
    if name == "uniform":
        return UniformQuantizer(bits)
    if name == "twin_uniform":
        return TwinUniformQuantizer(bits, kind="softmax")
    return make_quantizer(name, bits)


softmax_rows = st.integers(min_value=0, max_value=2**31 - 1).map(
    lambda s: torch.softmax(torch.randn(6, 30, generator=torch.Generator().manual_seed(s)) * 3.0, -1)
)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(QUANTIZERS)), bits=st.integers(2, 8), x=softmax_rows)
def test_properties_all_quantizers(name, bits, x):
    q = _make(name, bits).calibrate(x)
    y = q(x)
    lv = q.levels()
    # outputs lie in levels()
    assert torch.isin(y, lv).all()
    # quantizing twice changes nothing
    torch.testing.assert_close(q(y), y, rtol=0, atol=0)
    # forward == decode(encode(.)) bit for bit
    assert torch.equal(q.decode(q.encode(x)), y)
    assert len(lv) <= q.n_codes
    assert q.encode(x).dtype == torch.long


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 10_000), axis=st.sampled_from([0, 1, -1]))
def test_per_channel_equals_per_tensor_channel_by_channel(bits, seed, axis):
    x = torch.randn(5, 6, 7, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3
    pc = UniformQuantizer(bits, channel_axis=axis).calibrate(x)
    out = pc(x)
    ax = axis % 3
    for c in range(x.shape[ax]):
        xc = x.select(ax, c)
        pt = UniformQuantizer(bits).calibrate(xc)
        torch.testing.assert_close(out.select(ax, c), pt(xc), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(4, 3, 20, 20) * 2, -1)
    q = _make(name, 4).calibrate(x)
    fresh = _make(name, 4)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))


def test_per_channel_state_dict_round_trip():
    x = torch.randn(16, 8)
    q = UniformQuantizer(3, channel_axis=0).calibrate(x)
    fresh = UniformQuantizer(3, channel_axis=0)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))


def test_ste_gradient_passes_through():
    x = torch.rand(100, requires_grad=True)
    q = SULQ(4).calibrate(x.detach())
    q(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad != 0).any()


def test_log2_zero_underflow_flushes():
    q = Log2Quantizer(2, underflow="zero", scale=1.0).calibrate(torch.tensor([0.0, 1.0]))
    assert q.n_codes == 5
    assert q(torch.tensor([2.0**-10])).item() == 0.0
    assert q.levels().tolist() == [0.0, 0.125, 0.25, 0.5, 1.0]
    qc = Log2Quantizer(2, underflow="clamp", scale=1.0).calibrate(torch.tensor([0.0, 1.0]))
    assert qc(torch.tensor([2.0**-10])).item() == 0.125


def test_logsqrt2_levels_are_half_octaves():
    q = LogSqrt2Quantizer(3).calibrate(torch.tensor([0.0, 0.5, 1.0]))
    lv = q.levels()
    nz = lv[lv > 0]
    ratios = nz[1:] / nz[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, math.sqrt(2)), rtol=1e-5, atol=0)


def test_adalog_searches_a_base():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(16, 50, 50) * 3, -1)
    q = AdaLogQuantizer(3).calibrate(x)
    assert float(q.log2_base) in q.log2_bases
    errs = []
    for t in q.log2_bases:
        qq = AdaLogQuantizer(3, log2_bases=[t]).calibrate(x)
        errs.append(float((qq(x) - x).pow(2).mean()))
    assert float((q(x) - x).pow(2).mean()) == pytest.approx(min(errs))


def test_twin_uniform_gelu_has_negative_levels():
    x = torch.nn.functional.gelu(torch.randn(2000) * 2)
    q = TwinUniformQuantizer(4, kind="gelu").calibrate(x)
    lv = q.levels()
    assert lv.min() < 0 < lv.max()
    assert float(q.step2 / q.step1) == 2 ** round(math.log2(float(q.step2 / q.step1)))


# ----------------------------------------------------------------------------- coverage
def test_coverage_log2_collapse_on_paper_range():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(64, 197) * 2.5, -1)
    lq = Log2Quantizer(3, scale=1.0).calibrate(x)
    cov = coverage(lq, x)
    assert int(cov.counts.sum()) == x.numel() == cov.n
    assert cov.distinct_levels == 8
    assert cov.frac_collapsed > 0.5  # most near-zero probabilities pile onto 2^-7
    assert cov.frac_clipped_low == pytest.approx(float((x < 2.0**-7).double().mean()))
    sulq = SULQ(3).calibrate(x)
    assert coverage(sulq, x).entropy_bits > cov.entropy_bits
    assert 0 <= cov.entropy_bits <= math.log2(cov.distinct_levels)


def test_coverage_counts_match_manual():
    q = UniformQuantizer(2, init="minmax").calibrate(torch.tensor([0.0, 3.0]))
    cov = coverage(q, torch.tensor([0.1, 0.2, 1.1, 2.9, 5.0]))
    assert cov.counts.tolist() == [2, 1, 0, 2]
    assert cov.used_levels == 3
    assert cov.frac_clipped_high == pytest.approx(0.2)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bits", [1, 17, 3.0, "4", None, True])
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_bad_bits(name, bits):
    with pytest.raises(ValueError, match="bits"):
        make_quantizer(name, bits)


@pytest.mark.parametrize("eta", [0, -1e-3, float("nan"), float("inf")])
def test_bad_eta(eta):
    with pytest.raises(ValueError, match="eta"):
        SULQ(4, eta=eta)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("bad", [torch.empty(0), torch.tensor([0.1, float("nan")]), torch.tensor([float("inf"), 0.2])])
def test_bad_calibration_data(name, bad):
    with pytest.raises(ValueError):
        _make(name, 4).calibrate(bad)


@pytest.mark.parametrize("name", ["log2", "logsqrt2", "adalog", "sulq"])
def test_log_quantizers_reject_negative(name):
    with pytest.raises(ValueError, match="post-softmax"):
        make_quantizer(name, 4).calibrate(torch.tensor([-0.1, 0.5]))


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_forward_before_calibrate(name):
    with pytest.raises(RuntimeError, match="not calibrated"):
        _make(name, 4)(torch.rand(3))


def test_unknown_quantizer_name():
    with pytest.raises(ValueError, match="valid names"):
        make_quantizer("nope", 4)


@pytest.mark.parametrize("axis", [None, 0, -1])
def test_fused_uniform_fake_quant_matches_autograd_reference(axis):
    from isvit_viz.quant.base import Quantizer

    torch.manual_seed(0)
    x = torch.randn(8, 20, 16) * 2
    q = UniformQuantizer(3, channel_axis=axis).calibrate(x)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = q(xa), Quantizer.forward(q, xb)  # fused path vs generic STE expression
    g = torch.randn_like(x)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb)
    assert torch.equal(xa.grad == 0, xb.grad == 0)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)


def test_a_quantizer_missing_a_hook_cannot_be_built():
    from isvit_viz.quant.base import Quantizer

    class NoDequant(Quantizer):
        def _calibrate(self, x):
            pass

        def _codes(self, x, ste):
            return x

    with pytest.raises(TypeError, match="_dequant"):
        NoDequant(4)
