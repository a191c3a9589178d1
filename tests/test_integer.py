"""Integer SULQ attention (isvit_viz.integer): bit-exactness where the roundings are matched, properties
of the shift-accumulate and the int8 GEMM, accuracy of the integer path, export round trip.

What is bit-exact and what is not:

* matched, bit for bit: the Q/K/V integer codes (== the fake-quant quantizers' ``encode``); the integer
  logits ``Qz Kz^T`` (== int64 product); the SULQ exponent table on every F-bit probability (== the
  fake-quant SULQ on ``P / 2^F``, checked exhaustively); ``P V`` + ``eta * colsum`` correction + the
  integer rescale (== the fake-quant formula in exact arithmetic, eta on the G-bit grid, rounded once,
  half up, to the output's fixed point); the int8 GEMM (== its shift-and-accumulate expression) and the
  wide GEMM (== the shift path's exact integer).
* differs (measured with bounds below): the integer softmax (exp table with F bits, truncating
  division) against the float32 softmax, eta rounded to G bits, float32 rounding of the fake path.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import isvit_viz as iv
from isvit_viz import integer
from isvit_viz.integer.attention import eta_correction, integer_logits, shift_pv
from isvit_viz.integer.compare import block_qkv, capture_block_inputs, exponent_agreement, pv_bit_exact
from isvit_viz.integer.export import OutputRescale, attention_blocks
from isvit_viz.integer.fixed_point import (
    fixed_to_float32_output,
    rescale,
    round_half_even_shift,
    round_half_up_shift,
    rounding_right_shift,
    to_multiplier_shift,
    uniform_codes,
)
from isvit_viz.integer.gemm import eta_at, fixed_point_p, int8_gemm, shift_relation
from isvit_viz.integer.ops import multiplies_replaced
from isvit_viz.integer.shift import accumulator_dtype, shift_accumulate
from isvit_viz.integer.softmax import exceeds_thresholds, exp_table, integer_softmax
from isvit_viz.integer.sulq_codes import ExponentTable, code_exponents, count_mismatches, exponent_table
from isvit_viz.quant import SULQ, UniformQuantizer


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def embedded():
    """The embedded ViT and a W4/A4 I&S-ViT model: 64 calibration images, no reconstruction (iters=0)."""
    model, splits = iv.load_embedded("vit")
    calib, _ = splits.calib_tensors(64)
    res = iv.quantize(model, "isvit", 4, 4, calib, iters=0, progress=False)
    x, _ = splits.test_tensors(32)
    return model, splits, res, integer.export_model(res.model), capture_block_inputs(res.model, x)


def _softmax_samples(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(16, 50, 50, generator=g) * 2.5).softmax(-1)


# ----------------------------------------------------------------------------- fixed point
def test_scales_as_multiplier_and_shift_are_exact():
    g = torch.Generator().manual_seed(0)
    for s in (torch.rand(200, generator=g) * 10 + 1e-6).tolist() + [1.0, 0.125, 2.0**-30]:
        s32 = float(torch.tensor(s, dtype=torch.float32))
        m, sh = to_multiplier_shift(s32)
        assert 0 < m < 2**24 and m % 2 == 1 and math.ldexp(m, -sh) == s32
    assert to_multiplier_shift(0.75) == (3, 2)
    with pytest.raises(ValueError, match="float32"):
        to_multiplier_shift(0.1)  # the float64 0.1 is not a float32 value
    with pytest.raises(ValueError, match="positive"):
        to_multiplier_shift(-1.0)


def test_round_half_even_shift_by_hand():
    assert [round_half_even_shift(x, 1) for x in (1, 3, 5, -1, -3)] == [0, 2, 2, 0, -2]
    assert round_half_even_shift(7, 2) == 2 and round_half_even_shift(3, -2) == 12


def test_uniform_codes_equal_the_quantizer_encode():
    x = torch.randn(4, 3, 50, 64) * 3
    q = UniformQuantizer(4).calibrate(x)
    p = integer.UniformParams.from_quantizer(q, "x")
    assert torch.equal(p.scale, q.scale)  # exported multiplier + shift give the same float32 bits
    assert torch.equal(uniform_codes(x, p.scale, p.zero_point, p.qmax).long(), q.encode(x))


def test_integer_rescale_by_hand():
    # scale 0.75 = 3 * 2^-2: multiplier 3, shift 2; acc * 0.75 rounded half up (ties toward +inf)
    m, sh = to_multiplier_shift(0.75)
    assert (m, sh) == (3, 2)
    acc = torch.tensor([5, -5, 2, -2, 6, -6, 7, -7, 0], dtype=torch.int32)
    # acc * 3 = 15, -15, 6, -6, 18, -18, 21, -21, 0; / 4 = 3.75, -3.75, 1.5, -1.5, 4.5, -4.5, 5.25, -5.25, 0
    out = rescale(acc, m, sh)
    assert out.dtype == torch.int64 and out.tolist() == [4, -4, 2, -1, 5, -4, 5, -5, 0]  # halves: 2, -1, 5, -4
    # one output fraction bit (K = 1): shift 2 - 1, so 15/2 = 7.5 -> 8, -15/2 = -7.5 -> -7, 6/2 = 3
    assert rescale(acc[:3], m, sh - 1).tolist() == [8, -7, 3]
    # a correction in the product's units: (10 * 3 - c) / 4 for c = 1, 2, 4: 7.25 -> 7, 7.0, 6.5 -> 7
    assert rescale(torch.tensor([10, 10, 10]), 3, 2, correction=torch.tensor([1, 2, 4])).tolist() == [7, 7, 7]
    # the int32 extreme times a 24-bit multiplier stays exact in int64 (Python ints as the reference)
    big = torch.tensor([2**31 - 1, -(2**31)], dtype=torch.int32)
    assert rescale(big, 2**24 - 1, 24).tolist() == [round_half_up_shift(int(x) * (2**24 - 1), 24) for x in big]
    with pytest.raises(ValueError, match="int64 would wrap"):
        rescale(torch.tensor([2**40]), 2**23, 1)
    with pytest.raises(ValueError, match="int32/int64"):
        rescale(torch.tensor([1.0]), 1, 0)


def test_rounding_right_shift_is_round_half_up():
    assert [round_half_up_shift(x, 1) for x in (3, -3, 5, -5, 1, -1)] == [2, -1, 3, -2, 1, 0]  # x.5 -> up
    assert [round_half_up_shift(x, 2) for x in (7, -7, 6, -6, 5, -5)] == [2, -2, 2, -1, 1, -1]  # 1.75, 1.5, 1.25
    assert round_half_up_shift(3, -2) == 12
    x = torch.arange(-40, 41)
    for s in range(-2, 5):
        assert rounding_right_shift(x, s).tolist() == [round_half_up_shift(v, s) for v in x.tolist()]
    assert rounding_right_shift(x, 3).tolist() == [math.floor(v / 8 + 0.5) for v in x.tolist()]  # the definition
    # the float32 hand-off: exact in float64, then one round to nearest even (2^24 + 1 -> 2^24, + 3 -> + 4)
    out = fixed_to_float32_output(torch.tensor([2**24, -3, 2**24 + 1, 2**24 + 3, 2**40 + 2**16]), 2)
    assert out.dtype == torch.float32 and out.tolist() == [2.0**22, -0.75, 2.0**22, 2.0**22 + 1, 2.0**38]
    with pytest.raises(ValueError, match="2\\^53"):
        fixed_to_float32_output(torch.tensor([2**53 + 1]), 0)


def _rescale_constants(m: int, eta_fixed: int, g: int, s: int) -> OutputRescale:
    return OutputRescale(m, eta_fixed * m, g, s, frac_bits=0, acc_bound=0, correction_bound=0, product_bound=0)


def test_eta_correction_by_hand_needs_the_ceiling():
    # R = (acc << G) - eta_fixed * colsum with acc = 0, colsum = 1, eta_fixed = 3, M = 1, G = 1, S = 1:
    # R M / 2^(G+S) = -3/4 rounds (half up) to -1. The fold: ceil(3 / 2) = 2, (0 - 2 + 1) >> 1 = -1;
    # with a floor (1) it would give (0 - 1 + 1) >> 1 = 0: the ceiling is what makes it exact.
    rs = _rescale_constants(1, 3, 1, 1)
    corr = eta_correction(torch.tensor([1]), rs)
    assert corr.tolist() == [2] and rescale(torch.tensor([0]), 1, 1, correction=corr).tolist() == [-1]
    assert round_half_up_shift(-3, 2) == -1
    assert eta_correction(torch.tensor([-1]), rs).tolist() == [-1]  # ceil(-3/2) = -1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=4),
    st.integers(-(2**12), 2**12),
    st.integers(0, 2**20),
    st.integers(1, 2**24 - 1),
    st.integers(0, 20),
    st.integers(1, 40),
)
def test_folded_correction_equals_one_rounding_of_the_exact_product(acc, colsum, eta_fixed, m, g, s):
    # the int64 fold round((acc M - ceil(eta_fixed M colsum / 2^G)) / 2^S) == round(R M / 2^(G+S)), R M in
    # Python ints (up to ~2^87 here: beyond int64, which is why R M is never formed)
    corr = eta_correction(torch.tensor([colsum]), _rescale_constants(m, eta_fixed, g, s))
    out = rescale(torch.tensor(acc, dtype=torch.int32), m, s, correction=corr)
    ref = [round_half_up_shift(((a << g) - eta_fixed * colsum) * m, g + s) for a in acc]
    assert out.tolist() == ref


# ----------------------------------------------------------------------------- integer softmax
def test_exp_table_by_hand():
    # alpha = ln 2: entries round(16 * 2^-D) = 16, 8, 4, 2, 1, round(0.5) = 0 (ties to even)
    assert exp_table(math.log(2), 4).tolist() == [16, 8, 4, 2, 1, 0]
    with pytest.raises(ValueError, match="frac_bits"):
        exp_table(0.1, 0)


def test_integer_softmax_by_hand_and_division_free_form():
    s = torch.tensor([[3, 2, 0]], dtype=torch.int32)
    # D = 0, 1, 3 -> E = 16, 8, 2, sum 26; P = floor(2^4 E / 26) = floor(256/26, 128/26, 32/26) = 9, 4, 1
    p = integer_softmax(s, exp_table(math.log(2), 4), 4)
    assert p.tolist() == [[256 // 26, 128 // 26, 32 // 26]]
    g = torch.Generator().manual_seed(1)
    s = torch.randint(-300, 300, (4, 7, 50), generator=g, dtype=torch.int32)
    table, f = exp_table(0.02, 20), 20
    p = integer_softmax(s, table, f)
    ref = torch.softmax(0.02 * s.double(), -1)
    assert float((p.double() / 2**f - ref).abs().max()) < 3 * 2.0**-f  # table rounding + truncation
    e = table[(s.amax(-1, keepdim=True) - s).clamp_max(len(table) - 1).long()]
    thr = torch.tensor([5, 100, 4000, 70000, 900000])
    assert torch.equal(exceeds_thresholds(e, e.sum(-1, keepdim=True), thr, f), torch.searchsorted(thr, p, right=True))


# ----------------------------------------------------------------------------- SULQ exponent table
@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("bits", [3, 4])
def test_exponent_table_reproduces_fake_quant_sulq_on_every_probability(mode, bits):
    q = SULQ(bits, mode=mode).calibrate(_softmax_samples())
    ce = code_exponents(q)
    assert torch.equal(torch.exp2(ce.float()) - q.eta, q.decode(torch.arange(q.n_codes)))
    table = exponent_table(q, frac_bits=16)
    assert len(table.exponents) <= len(torch.unique(ce)) and bool((table.thresholds.diff() > 0).all())
    assert count_mismatches(q, table) == 0  # all 2^16 + 1 fixed-point probabilities, bit for bit
    broken = ExponentTable(table.thresholds - 1, table.exponents, table.frac_bits)
    assert count_mismatches(q, broken) == len(table.thresholds)  # the check can fail: one P per threshold


def test_default_export_uses_24_fraction_bits_and_a_small_table(embedded):
    *_, params, _ = embedded
    for p in params.values():
        assert p.frac_bits == 24 and len(p.exponents) <= 17 and p.exp_table[0] == 2**24 and p.exp_table[-1] == 0
        assert bool((p.exp_table.diff() <= 0).all()) and p.exp_table.numel() < 3000


# ----------------------------------------------------------------------------- shift-accumulate (properties)
def _int_arrays(draw, shape, lo, hi):
    return torch.from_numpy(draw(hnp.arrays(np.int64, shape, elements=st.integers(lo, hi))))


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.integers(0, 24), st.integers(1, 255))
def test_shift_accumulate_equals_int64_matmul(data, m, n, d, max_shift, vmax):
    sh = _int_arrays(data.draw, (2, m, n), 0, max_shift)
    v = _int_arrays(data.draw, (2, n, d), -vmax, vmax)
    ref = (torch.ones_like(sh) << sh) @ v  # int64 matrix product
    acc = shift_accumulate(sh.int(), v.int())
    assert acc.dtype == accumulator_dtype(n, int(v.abs().max()), int(sh.max()))
    assert torch.equal(acc.long(), ref)
    keep = torch.from_numpy(data.draw(hnp.arrays(np.bool_, (2, m, n))))
    assert torch.equal(shift_accumulate(sh, v, keep=keep), (torch.where(keep, torch.ones_like(sh) << sh, 0)) @ v)


def test_int32_accumulator_worst_case_does_not_wrap():
    # 50 keys x |V| 15 x 2^21 = 1.57e9 < 2^31: int32 is chosen and the all-maximal case is exact
    n, vmax, smax = 50, 15, 21
    assert accumulator_dtype(n, vmax, smax) == torch.int32 and accumulator_dtype(n, vmax, smax + 1) == torch.int64
    sh = torch.full((1, n), smax, dtype=torch.int32)
    v = torch.full((n, 1), -vmax, dtype=torch.int32)
    assert int(shift_accumulate(sh, v)) == -n * vmax * 2**smax


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 5), st.integers(1, 6), st.integers(-20, 0), st.integers(0, 12), st.integers(0, 100))
def test_fixed_point_gemm_equals_its_shift_expression(data, n, d, e_lo, f, eta_f):
    e = _int_arrays(data.draw, (3, n, n), e_lo, 0)
    vz = _int_arrays(data.draw, (3, n, d), -15, 15)
    assert torch.equal(fixed_point_p(e, f, eta_f) @ vz, shift_relation(e, vz, f, eta_f))


@settings(max_examples=40, deadline=None)
@given(st.data(), st.integers(1, 6), st.integers(1, 6), st.integers(0, 255))
def test_int8_gemm_equals_int64_product_including_8bit_v(data, n, d, zp):
    p8 = _int_arrays(data.draw, (2, n, n), -128, 127).to(torch.int8)
    vz = _int_arrays(data.draw, (2, n, d), 0, 255) - zp  # 8-bit codes minus a zero-point: beyond int8
    assert torch.equal(int8_gemm(p8, vz).long(), p8.long() @ vz)


# ----------------------------------------------------------------------------- the attention block
def test_codes_and_logits_are_the_fake_quant_ones(embedded):
    _, _, res, params, inputs = embedded
    name, attn = attention_blocks(res.model)[2]
    q, k, v = block_qkv(attn, inputs[name])
    parts = integer.integer_attention_core(q, k, v, params[name], return_parts=True)
    mm1, mm2 = attn.matmul1, attn.matmul2
    assert torch.equal(parts.qz.long(), mm1.quantizer_a.encode(q) - int(mm1.quantizer_a.zero_point))
    assert torch.equal(parts.kz.long(), mm1.quantizer_b.encode(k) - int(mm1.quantizer_b.zero_point))
    assert torch.equal(parts.vz.long(), mm2.quantizer_b.encode(v) - int(mm2.quantizer_b.zero_point))
    assert parts.logits.dtype == torch.int32 and torch.equal(
        parts.logits.long(), parts.qz.long() @ parts.kz.long().transpose(-2, -1)
    )
    fake_logits = mm1(q, k.transpose(-2, -1)) * attn.scale
    assert torch.allclose(parts.logits.double() * params[name].alpha, fake_logits.double(), rtol=0, atol=1e-4)


@torch.no_grad()
def test_pv_is_bit_exact_against_the_fake_quant_formula_with_matched_rounding(embedded):
    _, _, res, params, inputs = embedded
    for name, attn in attention_blocks(res.model):
        p = params[name]
        q, k, v = block_qkv(attn, inputs[name])
        parts = integer.integer_attention_core(q, k, v, p, softmax="float", sulq=attn.matmul2.quantizer_a, return_parts=True)
        rs = parts.rescale
        # widths: 50 keys x 8 x 2^15 fits the int32 accumulator (and colsum); the rescale product is int64
        # with its documented worst case, and the output fixed point stays within 2^53 (exact in float64)
        assert parts.acc.dtype == parts.colsum.dtype == torch.int32 and rs.acc_bound < 2**31
        assert rs.shift >= 1 and rs.product_bound < 2**62 and int(parts.out_fixed.abs().max()) <= 2**53
        assert int(parts.correction.abs().max()) <= rs.correction_bound
        # the exact R, formed here only as the reference (int64 holds R, but not R * M_v in general)
        r = (parts.acc.long() << p.eta_bits) - p.eta_fixed * parts.colsum.long()
        # (2^e - eta_q) @ Vz in float64 is exact here (multiples of 2^(e_lo - G), < 2^53 of them)
        y = (torch.exp2(parts.exponents.double()) - p.eta_quantized) @ parts.vz.double()
        assert torch.equal(y * 2.0 ** (p.eta_bits - p.e_lo), r.double())
        # the integer rescale == one round-half-up of the exact R M_v 2^-(G + S), in Python ints (image 0)
        ref = [round_half_up_shift(x * rs.multiplier, p.eta_bits + rs.shift) for x in r[0].flatten().tolist()]
        assert parts.out_fixed[0].flatten().tolist() == ref
        assert torch.equal(parts.out, (parts.out_fixed.double() * 2.0**-rs.frac_bits).float())
        assert pv_bit_exact(attn, p, inputs[name])  # the same on all images
        # float32 of the exact formula: rounding first to the fixed grid 2^-K (K = 32-39 here) and then to
        # float32 differs from one rounding near float32 ties and below 2^(24-K), where the grid is
        # coarser than float32: at most one float32 ulp plus half a grid step, on 0.03-1.7 % of entries
        ref32 = (y * float(p.v.scale)).float()
        err = (parts.out.double() - ref32.double()).abs()
        mag = torch.maximum(parts.out.abs(), ref32.abs()).double()
        assert bool((err <= torch.finfo(torch.float32).eps * mag + 2.0 ** -(rs.frac_bits + 1)).all())
        assert float((parts.out != ref32).double().mean()) <= 0.03
        # the wide fixed-point GEMM (F = G - e_lo) is the same integer R
        wide = fixed_point_p(parts.exponents, p.eta_bits - p.e_lo, eta_at(p, p.eta_bits - p.e_lo))
        assert torch.equal(wide @ parts.vz.long(), r)
        # against the float32 fake-quant block: only eta's G-bit rounding and float32 rounding differ
        fake = attn.matmul2((attn.matmul1(q, k.transpose(-2, -1)) * attn.scale).softmax(-1), v)
        assert float((parts.out - fake).abs().max()) <= 1e-5 * float(fake.abs().max())


@torch.no_grad()
def test_gemm_core_is_bit_exact_to_its_shift_expression(embedded):
    # the whole int8-GEMM core (integer softmax, int8 P, int8 GEMM, integer rescale) == one round-half-up
    # of its exact shift-and-accumulate expression times s_v on the shift path's output grid, to float32
    _, _, res, params, inputs = embedded
    for name, attn in attention_blocks(res.model)[:2]:
        p = params[name]
        q, k, v = block_qkv(attn, inputs[name][:4])
        parts = integer.integer_attention_core(q, k, v, p, return_parts=True)
        f = integer.int8_frac_bits(p)
        rel = shift_relation(parts.exponents, parts.vz.long(), f, eta_at(p, f))  # == P8 @ Vz, exactly
        out = integer.gemm_attention_core(q, k, v, p)
        k_out = parts.rescale.frac_bits
        ref = [round_half_up_shift(x * p.v.multiplier, p.v.shift + f - k_out) for x in rel.flatten().tolist()]
        assert torch.equal(out.flatten(), (torch.tensor(ref, dtype=torch.float64) * 2.0**-k_out).float())


def test_integer_softmax_exponents_rarely_differ_from_fake_quant(embedded):
    _, _, res, params, inputs = embedded
    for name, attn in attention_blocks(res.model):
        agree = exponent_agreement(attn, params[name], inputs[name])
        assert agree["exp_mismatch"] < 1e-3 and agree["exp_max_diff"] <= 1  # measured <= 1.4e-4, one step


def test_sqnr_of_integer_attention_against_fp(embedded):
    # Bound: integer within 0.05 dB of fake-quant against FP, >= 12 dB (W4/A4; measured 14.5-16.5 dB),
    # and >= 60 dB against fake-quant (measured 69-95 dB); the int8 GEMM is worse (>= 12 dB vs FP,
    # measured 13.9-15.4 dB).
    _, _, res, params, inputs = embedded
    for name, attn in attention_blocks(res.model):
        out = integer.compare.attention_cores(attn, params[name], inputs[name])
        s_fake, s_int = integer.sqnr_db(out["fp"], out["fake"]), integer.sqnr_db(out["fp"], out["int"])
        assert s_int >= 12.0 and s_int >= s_fake - 0.05, (name, s_fake, s_int)
        assert integer.sqnr_db(out["fake"], out["int"]) >= 60.0
        assert integer.sqnr_db(out["fp"], out["gemm"]) >= 12.0
    assert integer.sqnr_db(torch.ones(3), torch.ones(3)) == float("inf")


@pytest.fixture(scope="module")
def end_to_end_200(embedded):
    """:func:`integer.end_to_end` on 200 test images, W4/A4, both variants (FP and fake-quant run once)."""
    model, splits, res, _, _ = embedded
    return integer.end_to_end(model, res.model, splits.test(200), variants=("shift", "gemm"))


def test_end_to_end_integer_attention_in_every_block(embedded, end_to_end_200):
    # 200 test images, W4/A4: integer attention in all 6 blocks keeps the fake-quant top-1 and FP
    # agreement within 1 point, and its top-1 decisions equal fake-quant's on >= 99 % of images
    # (measured: identical top-1 88.0 %, agreement 100 %; on all 10,000 images 99.9 %, benchmark).
    r = end_to_end_200
    fake, shift = r["fake"], r["int_shift"]
    assert r["n"] == 200 and abs(shift["q_top1"] - fake["q_top1"]) <= 0.01
    assert abs(shift["agree_top1"] - fake["agree_top1"]) <= 0.01 and shift["agree_with_fake"] >= 0.99
    assert all(type(m).__name__ == "QuantAttention" for _, m in attention_blocks(embedded[2].model))  # restored


def test_end_to_end_int8_gemm_variant(end_to_end_200):
    # The int8 GEMM drops the levels below 2^-F (F = 6-7 here) and rounds eta to F bits, so it is looser
    # than the shift path. Measured on these 200 images (64-image calibration): top-1 86.5 % vs 88.0 %
    # fake-quant, agreement with fake-quant 94.5 %, KL to FP 1.18x fake-quant's; on all 10,000 images
    # with the benchmark's 1024-image model 96.35 % and +0.02 points top-1. Bounds: agreement with
    # fake-quant >= 92 %, top-1 and FP agreement within 3 points, KL within 1.5x. A rescale off by one
    # bit (output x2) gives 90 % and 4.4x the KL; the bit level is pinned by test_gemm_core_is_bit_exact.
    r = end_to_end_200
    fake, gemm = r["fake"], r["int_gemm"]
    assert gemm["agree_with_fake"] >= 0.92, gemm
    assert abs(gemm["q_top1"] - fake["q_top1"]) <= 0.03 and abs(gemm["agree_top1"] - fake["agree_top1"]) <= 0.03
    assert gemm["kl_to_fp"] <= 1.5 * fake["kl_to_fp"]


def test_swap_and_restore_and_gemm_variant(embedded):
    _, splits, res, params, _ = embedded
    x, _ = splits.test_tensors(8)
    with torch.no_grad():
        before = res.model(x)
        swap = integer.use_integer_attention(res.model, params=params, variant="gemm")
        assert len(swap.layers) == 6 and all(isinstance(m, integer.IntegerAttention) for m in swap.layers.values())
        gemm_out = res.model(x)
        swap.restore()
        assert torch.equal(res.model(x), before)
    assert torch.isfinite(gemm_out).all()  # its accuracy: test_end_to_end_int8_gemm_variant


def test_export_round_trip_through_save_quantized(embedded, tmp_path):
    _, splits, res, params, _ = embedded
    x, _ = splits.test_tensors(8)
    path = integer.save_integer_quantized(res, tmp_path / "m.pt", params=params)
    loaded_params = integer.load_integer_params(path)
    assert set(loaded_params) == set(params) and all(loaded_params[n].equals(params[n]) for n in params)
    assert integer.IntegerAttentionParams.from_dict(params["blocks.0.attn"].to_dict()).equals(params["blocks.0.attn"])
    loaded = iv.load_quantized(path)
    with torch.no_grad():
        with integer.use_integer_attention(res.model, params=params) as m:
            ref = m(x)
        with integer.use_integer_attention(loaded.model, params=loaded_params) as m:
            assert torch.equal(m(x), ref)
    iv.save_quantized(res, tmp_path / "plain.pt")  # files without the optional field stay loadable
    assert iv.load_quantized(tmp_path / "plain.pt").config == res.config
    with pytest.raises(ValueError, match="no integer attention"):
        integer.load_integer_params(tmp_path / "plain.pt")


def test_clear_errors():
    from isvit_viz.quant.config import QuantConfig
    from isvit_viz.quant.wrap import quantize_model

    swin, _ = iv.load_embedded("swin")
    with pytest.raises(ValueError, match="Swin"):
        integer.export_model(quantize_model(swin, QuantConfig()))
    vit, _ = iv.load_embedded("vit")
    qvit = quantize_model(vit, QuantConfig(softmax="log2"))
    with pytest.raises(ValueError, match="needs SULQ"):
        integer.export_attention(qvit.blocks[0].attn)
    with pytest.raises(ValueError, match="no quantized attention"):
        integer.use_integer_attention(iv.load_embedded("vit")[0])
    with pytest.raises(ValueError, match="shifts must lie"):
        shift_accumulate(torch.tensor([[-1]]), torch.tensor([[1]]))


# ----------------------------------------------------------------------------- op counts, timing, results
def test_op_counts_by_hand():
    c = integer.attention_op_counts(2, 3, 3)  # N=2, d=3: N^2 d = 12, N d = 6; search = ceil(log2 4) = 2
    # shift path: P V shifts 12, correction ceil(. / 2^G) d = 3, rounding shift of the rescale N d = 6
    assert c["fp32"]["mul"] == 24 and c["int_shift"]["mul"] == 12 + 3 + 6 and c["int_shift"]["shift"] == 12 + 3 + 6
    assert c["int8_gemm"]["mul"] == 24 + 6 and c["int8_gemm"]["shift"] == 6 and c["int_shift"]["compare"] == 4 * 2 + 4
    assert multiplies_replaced(c) == 24 - 21


def test_timing_and_shift_pv_shapes(embedded):
    _, _, res, params, inputs = embedded
    name, attn = attention_blocks(res.model)[0]
    t = integer.time_attention(attn, params[name], inputs[name][:2], repeats=1)
    assert set(t) >= {"core_fp32", "core_int_shift", "core_int8_gemm", "pv_shift"}
    assert all(0 < v["min_s"] <= v["median_s"] for v in t.values())
    q, k, v = block_qkv(attn, inputs[name][:2])
    parts = integer.integer_attention_core(q, k, v, params[name], return_parts=True)
    acc, colsum = shift_pv(parts.exponents, parts.vz, params[name])
    assert acc.shape == (2, 3, 50, 64) and colsum.shape == (2, 3, 1, 64)
    assert torch.equal(integer_logits(parts.qz, parts.kz), parts.logits)


def test_load_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmarks.integer_attention"):
        integer.load_results(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks keys"):
        integer.load_results(tmp_path / "bad.json")
    data = integer.load_results()
    assert data["rows"] and data["settings"]["calib_images"] == 1024 and "w4a4" in data["models"]


def test_benchmark_smoke(tmp_path):
    import json

    from benchmarks import integer_attention

    integer_attention.main(["--smoke", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "integer_attention.json").read_text())
    assert all(r["pv_bit_exact"] and r["table_mismatches"] == 0 for r in payload["rows"])
    assert integer.load_results(tmp_path / "integer_attention.json")["timing"]["seconds"]["core_int_shift"]["min_s"] > 0
    md = (tmp_path / "integer_attention.md").read_text()
    for section in ("## Per attention layer", "## End to end", "## Operations per image", "## CPU time"):
        assert md.count(section) == 1, section
    assert "| W4/A4 | integer, int8 GEMM |" in md and "| core_int8_gemm |" in md and "| int_shift |" in md
    (tmp_path / "integer_attention.md").unlink()
    integer_attention.main(["--render-only", "--out", str(tmp_path)])  # the .md again, from the JSON alone
    assert (tmp_path / "integer_attention.md").read_text() == md
