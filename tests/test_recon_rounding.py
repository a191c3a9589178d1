"""Reconstruction engine: AdaRound, QDrop dropping / input mixing, and the Swin NHWC loss (issue #16)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from isvit_viz.calib.cache import MemoryBudget
from isvit_viz.calib.capture import capture_unit_io
from isvit_viz.calib.recon import ReconConfig, channels_last_output, recon_loss, reconstruct_unit
from isvit_viz.models import build_from_spec
from isvit_viz.quant import UniformQuantizer
from isvit_viz.quant.adaround import AdaRound, alpha_for, beta_at, harden_adaround, rectified_sigmoid, round_regularizer
from isvit_viz.quant.config import QuantConfig
from isvit_viz.quant.modules import QuantConv2d, QuantLinear, QuantModule, maybe_drop
from isvit_viz.quant.wrap import calibrate_activations, calibrate_weights, quantize_model, set_quant_state

CPU = torch.device("cpu")
REDUCTION, BLOCK = "layers.1.downsample.reduction", "layers.0.blocks.1"


@pytest.fixture(scope="module")
def swin():
    """(FP teacher, calibrated W3/A4 quantized copy, 16 images) of the small embedded Swin."""
    torch.manual_seed(0)
    fp = build_from_spec({"kind": "embedded", "name": "swin"}).eval()
    q = quantize_model(copy.deepcopy(fp), QuantConfig(w_bits=3, a_bits=4)).eval()
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    calibrate_weights(q)
    set_quant_state(q, weight=True, act=True)
    calibrate_activations(q, images)
    return fp, q, images


def _unit_data(swin, name):
    """A fresh copy of the quantized model, its unit ``name``, the unit's quantized inputs, FP inputs and FP targets."""
    fp, q, images = swin
    q = copy.deepcopy(q)
    unit, budget = q.get_submodule(name), MemoryBudget(1 << 30)
    x_q, _ = capture_unit_io(q, unit, images, budget, CPU, want_output=False)
    x_fp, y = capture_unit_io(fp, fp.get_submodule(name), images, budget, CPU)
    return q, unit, x_q, x_fp, y


def _loss(unit, xs, ys):
    idx = torch.arange(xs.n)
    with torch.no_grad():
        return float(recon_loss(unit(xs.gather(idx, CPU)), ys.gather(idx, CPU), tokens_last=True))


def _layer(w_bits=3, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(12, 5)
    layer = QuantLinear(lin, UniformQuantizer(w_bits, channel_axis=0), None)
    layer.weight_quantizer.calibrate(layer.weight.detach())
    layer.weight_quant = True
    return layer


# ----------------------------------------------------------------- AdaRound pieces
def test_alpha_init_makes_h_the_fractional_part():
    layer = _layer()
    v = layer.weight.detach() / layer.weight_quantizer.scale
    rest = v - torch.floor(v)
    ada = AdaRound(layer.weight, layer.weight_quantizer)
    # equal up to float32 rounding of sigmoid (bit equality is not attainable): within 2 ulp of 1.0
    assert (ada.h() - rest).abs().max() <= 2**-22
    soft = ada(layer.weight, layer.weight_quantizer)
    inside = (torch.floor(v) + layer.weight_quantizer.zero_point >= 0) & (
        torch.floor(v) + 1 + layer.weight_quantizer.zero_point <= 7
    )
    err = (soft - layer.weight.detach()).abs()[inside] / layer.weight_quantizer.scale.expand_as(v)[inside]
    assert inside.any() and err.max() <= 2**-20  # the soft weight starts at W (in grid units)


def test_rectified_sigmoid_and_regulariser_hand_values():
    assert rectified_sigmoid(torch.tensor([0.0, 20.0, -20.0])).tolist() == [0.5, 1.0, 0.0]
    h = torch.tensor([0.5, 1.0, 0.0, 0.75])  # 1 - |2h - 1|^beta = 1, 0, 0, 1 - 0.5^beta
    assert float(round_regularizer(h, 2.0)) == 1.75
    assert float(round_regularizer(h, 20.0)) == 2.0 - 0.5**20
    assert abs(float(rectified_sigmoid(alpha_for(torch.tensor(0.75)))) - 0.75) <= 2**-23


def test_beta_schedule_values():
    # 100 iterations, warm-up 20 %: off before step 20, then 20 -> 2 linearly over steps 20..100
    assert beta_at(1, 100) is None and beta_at(19, 100) is None
    assert [beta_at(t, 100) for t in (20, 40, 60, 100)] == [20.0, 15.5, 11.0, 2.0]
    assert beta_at(5, 100, warmup=0.0, b_range=(10.0, 2.0)) == 10.0 - 8.0 * 5 / 100


def test_hardening_bakes_decisions_into_a_plain_quantized_layer():
    layer = _layer()
    wq = layer.weight_quantizer
    w0 = layer.weight.detach().clone()
    layer.adaround = AdaRound(layer.weight, wq)
    with torch.no_grad():
        layer.adaround.alpha.copy_(torch.randn(w0.shape, generator=torch.Generator().manual_seed(3)))
    up = (layer.adaround.alpha >= 0).float()
    expect = (torch.clamp(torch.floor(w0 / wq.scale) + up + wq.zero_point, 0, 7) - wq.zero_point) * wq.scale
    assert harden_adaround(layer) == 1
    assert "adaround" not in layer._modules and [id(p) for p in layer.parameters()] == [id(layer.weight), id(layer.bias)]
    assert torch.equal(layer.weight.detach(), expect)
    assert torch.equal(wq(layer.weight.detach()), expect)  # round-to-nearest reproduces it bit for bit
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), F.linear(x, expect, layer.bias))
    # both directions occur (some weights leave round-to-nearest)
    assert not torch.equal(expect, wq(w0))


def test_hardened_layer_state_dict_round_trip_is_exact():
    layer = _layer()
    layer.adaround = AdaRound(layer.weight, layer.weight_quantizer)
    with torch.no_grad():
        layer.adaround.alpha.neg_()
    harden_adaround(layer)
    fresh = _layer(seed=1)  # other weights, other scales
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 12)
    assert torch.equal(fresh(x), layer(x))


def test_adaround_needs_uniform_integer_zero_point():
    layer = _layer()
    layer.weight_quantizer.zero_point.add_(0.5)
    with pytest.raises(ValueError, match="integer"):
        AdaRound(layer.weight, layer.weight_quantizer)


# ----------------------------------------------------------------- the engine
@pytest.mark.parametrize("rounding", ["ste", "adaround"])
def test_reconstruction_lowers_the_loss(swin, rounding):
    _, unit, x_q, _, y = _unit_data(swin, REDUCTION)
    before = _loss(unit, x_q, y)
    cfg = ReconConfig(iters=30, batch_size=16, lr=1e-3, alpha_lr=1e-2, rounding=rounding)  # full batch: no noise
    out = reconstruct_unit(unit, x_q, y, cfg, CPU, torch.Generator().manual_seed(0), progress=False)
    assert out["rec_last"] < out["rec_first"]
    assert out["round_first"] == 0.0  # no regulariser during the warm-up (always 0 with STE)
    assert out["loss_last"] == pytest.approx(out["rec_last"] + out["round_last"], rel=1e-6)
    assert _loss(unit, x_q, y) < before  # the final (for AdaRound: hardened) unit beats round-to-nearest
    if rounding == "adaround":
        assert out["round_last"] > 0 and 0 < out["flip_frac"] < 0.5
        assert "adaround" not in unit._modules


def test_adaround_freezes_every_fp_tensor(swin):
    _, unit, x_q, _, y = _unit_data(swin, BLOCK)
    snap = {n: p.detach().clone() for n, p in unit.named_parameters()}
    w0 = {n: m.weight.detach().clone() for n, m in unit.named_modules() if isinstance(m, QuantLinear)}
    seen = []

    def check(opt, *_):
        params = [p for g in opt.param_groups for p in g["params"]]
        for n, p in unit.named_parameters():
            if n.endswith("alpha"):
                assert any(p is a for a in params)
            else:
                assert not any(p is a for a in params) and torch.equal(p.detach(), snap[n]), n
        seen.append(len(params))

    handle = register_optimizer_step_post_hook(check)
    try:
        cfg = ReconConfig(iters=3, batch_size=8, rounding="adaround")
        reconstruct_unit(unit, x_q, y, cfg, CPU, torch.Generator().manual_seed(0), progress=False)
    finally:
        handle.remove()
    assert seen == [4, 4, 4]  # qkv, proj, fc1, fc2 alphas only
    for n, p in unit.named_parameters():
        if n.rpartition(".")[0] not in w0 or n.endswith("bias"):
            assert torch.equal(p.detach(), snap[n]), n  # biases, norms, relative-position tables untouched
    for n, w in w0.items():  # weights: exactly one of the two neighbouring grid points of the original
        m = unit.get_submodule(n)
        s, z = m.weight_quantizer.scale, m.weight_quantizer.zero_point
        down = (torch.clamp(torch.floor(w / s) + z, 0, 7) - z) * s
        up = (torch.clamp(torch.floor(w / s) + 1 + z, 0, 7) - z) * s
        assert ((m.weight == down) | (m.weight == up)).all(), n


def test_adaround_without_quantized_weights_is_an_error(swin):
    _, unit, x_q, _, y = _unit_data(swin, REDUCTION)
    unit.weight_quant = False
    with pytest.raises(ValueError, match="weight-quantized"):
        reconstruct_unit(
            unit, x_q, y, ReconConfig(iters=1, batch_size=4, rounding="adaround"), CPU, torch.Generator(), progress=False
        )


# ----------------------------------------------------------------- QDrop
def test_maybe_drop_extremes_and_fresh_masks():
    xq, xf = torch.zeros(10000), torch.ones(10000)
    assert maybe_drop(xq, xf, 0.0) is xq and maybe_drop(xq, xf, 1.0) is xf
    m1, m2 = maybe_drop(xq, xf, 0.5), maybe_drop(xq, xf, 0.5)
    assert 0.45 < float(m1.mean()) < 0.55 and not torch.equal(m1, m2)


def test_drop_reaches_every_activation_quantizer_of_a_block(swin):
    """p = 1 gives the block with FP activations (weights still quantized), p = 0 the fully quantized one.

    The Swin block's quantized activations: qkv / fc1 inputs (post-LN), proj input, the post-GELU fc2
    input, Q and K of matmul1, the post-softmax map and V of matmul2.
    """
    _, unit, x_q, _, _ = _unit_data(swin, BLOCK)
    x = x_q.gather(torch.arange(4), CPU)
    mods = [m for m in unit.modules() if isinstance(m, QuantModule)]
    assert sum(hasattr(m, "quantizer_a") for m in mods) == 2
    with torch.no_grad():
        full_q = unit(x)
        set_quant_state(unit, weight=True, act=False)
        act_fp = unit(x)
        set_quant_state(unit, weight=True, act=True)
        for p, ref in ((0.0, full_q), (1.0, act_fp)):
            for m in mods:
                m.act_drop_prob = p
            assert torch.equal(unit(x), ref), p
        for m in mods:
            m.act_drop_prob = 0.5
        a, b = unit(x), unit(x)
    assert not torch.equal(a, b) and not torch.equal(a, full_q) and not torch.equal(a, act_fp)


def test_engine_sets_and_resets_drop_prob_and_mixes_inputs(swin):
    _, unit, x_q, x_fp, y = _unit_data(swin, REDUCTION)
    seen_p, seen_x = [], []

    def record(m, args):
        seen_p.append(m.act_drop_prob)
        seen_x.append(args[0].clone())

    h1 = unit.register_forward_pre_hook(record)
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(16)
    xq_all, xf_all = x_q.gather(idx, CPU), x_fp.gather(idx, CPU)
    assert not torch.equal(xq_all, xf_all)
    try:
        for mix, ref in ((0.0, xq_all), (1.0, xf_all)):
            cfg = ReconConfig(iters=1, batch_size=16, lr=1e-12, act_drop_prob=0.5, input_mix=mix)
            reconstruct_unit(unit, x_q, y, cfg, CPU, gen, progress=False, fp_inputs=x_fp)
            assert torch.equal(seen_x[-1], ref), mix
        cfg = ReconConfig(iters=2, batch_size=16, lr=1e-12, input_mix=0.5)
        reconstruct_unit(unit, x_q, y, cfg, CPU, gen, progress=False, fp_inputs=x_fp)
    finally:
        h1.remove()
    assert seen_p[:2] == [0.5, 0.5] and unit.act_drop_prob == 0.0
    m1, m2 = (x == xf_all for x in seen_x[-2:])
    for x, m in zip(seen_x[-2:], (m1, m2)):
        assert (m | (x == xq_all)).all()  # each element comes from one of the two inputs
    assert not torch.equal(m1, m2) and 0.4 < float(m1.float().mean()) < 0.6  # a fresh mask per step
    with pytest.raises(ValueError, match="fp_inputs"):
        reconstruct_unit(unit, x_q, y, ReconConfig(iters=1, batch_size=4, input_mix=0.5), CPU, gen, progress=False)


# ----------------------------------------------------------------- the NHWC loss (Swin)
def test_recon_loss_sums_over_tokens_for_nhwc():
    pred = torch.zeros(1, 2, 2, 3)  # [B, H, W, C]
    target = torch.arange(12.0).reshape(1, 2, 2, 3)
    # tokens (h, w) hold 3t + c: sum of squares over the 4 tokens, averaged over B = 1 and C = 3
    assert float(recon_loss(pred, target, tokens_last=True)) == pytest.approx(506 / 3, rel=1e-7)  # 506 = sum k^2, k < 12
    assert float(recon_loss(pred, target)) == pytest.approx(506 / 6, rel=1e-7)  # the old sum over H only
    assert channels_last_output(QuantLinear(nn.Linear(2, 2), UniformQuantizer(4), None))
    assert not channels_last_output(QuantConv2d(nn.Conv2d(1, 2, 2), UniformQuantizer(4)))


def test_engine_flattens_patch_merging_output_by_default(swin):
    _, unit, x_q, _, y = _unit_data(swin, REDUCTION)
    idx = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:8].sort().values
    with torch.no_grad():
        err2 = (unit(x_q.gather(idx, CPU)) - y.gather(idx, CPU)).pow(2)  # [8, H, W, C]
    expect = float(err2.sum(dim=(1, 2)).mean())  # sum over the H*W tokens, mean over batch and channels
    out = reconstruct_unit(
        unit, x_q, y, ReconConfig(iters=1, batch_size=8), CPU, torch.Generator().manual_seed(0), progress=False
    )
    assert out["rec_first"] == pytest.approx(expect, rel=1e-6)


def test_engine_sums_the_patch_merging_loss_over_tokens(swin, monkeypatch):
    """Swin PatchMerging outputs are NHWC: the engine must let the loss flatten them to tokens (issue #16)."""
    import isvit_viz as iv
    from isvit_viz.calib import engine

    seen: dict[str, bool] = {}
    real = engine.reconstruct_unit

    def spy(unit, *a, tokens_last=None, desc="", **k):
        seen[desc] = channels_last_output(unit) if tokens_last is None else tokens_last
        return real(unit, *a, tokens_last=tokens_last, desc=desc, **k)

    monkeypatch.setattr(engine, "reconstruct_unit", spy)
    fp, _, images = swin
    iv.quantize(fp, "qdrop", 4, 4, images, iters=1, batch_size=8, progress=False)
    assert seen[REDUCTION] is True and seen[BLOCK] is True
    assert seen["patch_embed.proj"] is False  # the conv unit's output is NCHW: summed over channels, as the official loss
