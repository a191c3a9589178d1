"""RepQ-ViT and PTQ4ViT as their authors' code runs them (issue #16 item 3), on small random-init models."""

import copy

import pytest
import torch
import torch.nn.functional as F

from isvit_viz.calib.hessian import (
    HessianConfig,
    LayerRecord,
    collect_output_grads,
    hessian_calibrate,
    hessian_error,
    search_linear,
    search_matmul,
)
from isvit_viz.calib.reparam import patch_merging_pairs, reparameterize, repq_vit_calibrate
from isvit_viz.models import build_from_spec
from isvit_viz.quant import LogSqrt2Quantizer, UniformQuantizer
from isvit_viz.quant.config import QuantConfig
from isvit_viz.quant.modules import QuantLinear, QuantMatMul
from isvit_viz.quant.ptq4vit import GELU_MIN_ABS, PTQ4ViTGeluQuantizer, PTQ4ViTSoftmaxQuantizer, interval_factors
from isvit_viz.quant.uniform import ACT_PERCENTILES
from isvit_viz.quant.wrap import activation_quantizers, calibrate_activations, quantize_model, set_quant_state

REPQ = dict(
    softmax="logsqrt2",
    softmax_kwargs={"include_max": False},
    post_ln="channel",
    reduction_post_ln="channel",
    input_bits=8,
    weight_percentiles=ACT_PERCENTILES,
)
PTQ4VIT = dict(softmax="twin_uniform_ptq4vit", post_ln="layer", post_gelu="twin_uniform_ptq4vit")


def small(name):
    torch.manual_seed(0)
    return build_from_spec({"kind": "embedded", "name": name})


@pytest.fixture(scope="module")
def images():
    return torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- RepQ-ViT
def test_patch_merging_reparameterization_keeps_fp_output(images):
    q = quantize_model(small("swin"), QuantConfig(a_bits=4, **REPQ))
    (name, ln, red), *rest = list(patch_merging_pairs(q))
    assert name == "layers.1.downsample" and not rest
    qz = red.input_quantizer
    assert isinstance(qz, UniformQuantizer) and qz.channel_axis == -1
    set_quant_state(q, weight=False, act=True)
    calibrate_activations(q, images)
    g, d = torch.Generator().manual_seed(1), red.in_features  # random channel-wise (scale, integer zero-point)
    qz.set_params(0.05 * (torch.rand(d, generator=g) + 0.5), torch.randint(0, 16, (d,), generator=g).float(), -1)
    s_mean, z_mean = qz.scale.mean(), qz.zero_point.mean()
    set_quant_state(q, weight=False, act=False)
    w0, g0 = red.weight.detach().clone(), ln.weight.detach().clone()
    with torch.no_grad():
        before = q(images)
        assert reparameterize(q, round_zero_point=False) == 12 + 1  # 6 blocks x (qkv, fc1) + the patch merging
        after = q(images)
    assert ((after - before).abs().max() / before.abs().max()) <= 1e-5
    assert not torch.equal(red.weight, w0) and not torch.equal(ln.weight, g0) and red.bias is not None
    assert qz.scale.numel() == 1 and float(qz.scale) == pytest.approx(float(s_mean), rel=1e-6)
    assert float(qz.zero_point) == pytest.approx(float(z_mean), rel=1e-6)  # RepQ-ViT: fractional mean


def test_patch_merging_left_alone_by_default(images):
    q = quantize_model(small("swin"), QuantConfig(a_bits=4))
    red = q.get_submodule("layers.1.downsample.reduction")
    assert red.input_quantizer.channel_axis is None and q.patch_embed.proj.input_quantizer is None
    set_quant_state(q, weight=False, act=True)
    calibrate_activations(q, images)
    w0 = red.weight.detach().clone()
    assert reparameterize(q) == 12
    assert torch.equal(red.weight, w0)


def test_input_image_quantizer_is_placed_and_8_bit(images):
    q = quantize_model(small("vit"), QuantConfig(w_bits=4, a_bits=4, **REPQ))
    conv = q.patch_embed.proj
    iq = conv.input_quantizer
    assert isinstance(iq, UniformQuantizer) and iq.bits == 8 and iq.channel_axis is None
    assert "patch_embed.proj.input_quantizer" in dict(activation_quantizers(q))
    set_quant_state(q, weight=False, act=True)
    calibrate_activations(q, images)
    x_hat = iq(images)
    assert len(torch.unique(x_hat)) <= 256 and not torch.equal(x_hat, images)
    with torch.no_grad():
        torch.testing.assert_close(conv(images), F.conv2d(x_hat, conv.weight, conv.bias, conv.stride), rtol=0, atol=0)


def test_logsqrt2_repq_candidates_exclude_max():
    # 999 values 0.5 and one 1.0: d = max = 1 codes both exactly (MSE 0); all three quantiles are below 1
    x = torch.cat([torch.full((999,), 0.5), torch.tensor([1.0])])
    ours = LogSqrt2Quantizer(4).calibrate(x)
    assert float(ours.scale) == 1.0  # max is scored and wins (our earlier behaviour, still the default)
    repq = LogSqrt2Quantizer(4, include_max=False)
    cands = repq.scale_candidates(x)
    ref = torch.stack([torch.quantile(x, p) for p in ACT_PERCENTILES])  # RepQ-ViT's candidates
    torch.testing.assert_close(torch.stack(cands), ref, rtol=1e-4, atol=0)  # rowwise_quantiles: float32 ranks
    assert all(float(c) < 1.0 for c in cands)
    repq.calibrate(x)
    errs = []
    for c in cands:
        one = LogSqrt2Quantizer(4, include_max=False)
        one.scale.fill_(float(c))
        one.initialized.fill_(True)
        errs.append(float((one(x) - x).pow(2).mean()))
    assert float(repq.scale) == float(cands[errs.index(min(errs))]) != 1.0


def test_repq_vit_calibrates_activations_with_quantized_weights(images):
    q = quantize_model(small("vit"), QuantConfig(w_bits=4, a_bits=4, **REPQ))
    ref = copy.deepcopy(q)
    seen = {}
    proj_q = q.blocks[1].attn.proj.input_quantizer
    orig = proj_q.calibrate
    proj_q.calibrate = lambda x: (seen.setdefault("x", x.detach().clone()), orig(x))[1]
    assert repq_vit_calibrate(q, images) == 12
    assert all(qz.is_calibrated for _, qz in activation_quantizers(q))
    assert q.blocks[0].attn.qkv.input_quantizer.scale.numel() == 1
    assert q.blocks[0].attn.qkv.weight_quant and q.blocks[0].attn.qkv.act_quant

    def proj_input(model, weight):  # what blocks.1.attn.proj reads with activations quantized
        from isvit_viz.quant.wrap import calibrate_weights

        m = copy.deepcopy(model)
        calibrate_weights(m)
        set_quant_state(m, weight=weight, act=True)
        calibrate_activations(m, images)
        out = {}
        h = m.blocks[1].attn.proj.register_forward_pre_hook(lambda mod, a: out.setdefault("x", a[0].detach()))
        with torch.no_grad():
            m(images)
        h.remove()
        return out["x"]

    torch.testing.assert_close(seen["x"], proj_input(ref, weight=True), rtol=0, atol=0)
    assert not torch.equal(seen["x"], proj_input(ref, weight=False))


# ----------------------------------------------------------------------------- PTQ4ViT quantizers
def test_ptq4vit_softmax_quantizer_hand_values():
    q = PTQ4ViTSoftmaxQuantizer(3)  # q - 1 = 3
    q.set_split(0.125)  # low step 0.125/3 on [0, 0.125], high step 1/3 on [0.125, 1]
    x = torch.tensor([0.0, 0.1, 0.6, 1.0])
    exp = torch.tensor([0.0, 2 * 0.125 / 3, 0.125 + 2 / 3, 0.125 + 1.0])  # high ranges carry the code's +split
    torch.testing.assert_close(q(x), exp, rtol=1e-6, atol=0)
    assert torch.equal(q.decode(q.encode(x)), q(x))
    q.set_split(0.25)  # round(0.25 * 3) = 1: the code adds 1/3 below the split too
    torch.testing.assert_close(q(torch.tensor([0.1])), torch.tensor([0.25 / 3 + 1 / 3]), rtol=1e-6, atol=0)
    assert q.n_codes == 2 * 3 + 1 - 1


def test_ptq4vit_gelu_quantizer_hand_values():
    q = PTQ4ViTGeluQuantizer(3)  # q = 4: codes -4..3
    q.set_step(0.5)
    d_neg = GELU_MIN_ABS / 4
    x = torch.tensor([-0.1, -GELU_MIN_ABS, 0.0, 1.2, 5.0])
    exp = torch.tensor([-2 * d_neg, -4 * d_neg, 0.0, 1.0, 1.5])
    torch.testing.assert_close(q(x), exp, rtol=1e-6, atol=0)
    assert torch.equal(q.decode(q.encode(x)), q(x)) and q.n_codes == 8


def test_interval_factors_are_the_codes_first_n():
    f = interval_factors(0.01, 1.2, 100)
    assert f.shape == (100,) and float(f[0]) == pytest.approx(0.01) and float(f[-1]) == pytest.approx(0.01 + 99 * 1.19 / 100)


# ----------------------------------------------------------------------------- Hessian metric and search
def test_hessian_error_hand_computed():
    o = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    oq = torch.tensor([[1.5, 2.0], [3.0, 3.0]])
    g = torch.tensor([[2.0, 1.0], [0.5, 3.0]])
    # sample 0: mean((2*0.5)^2, 0) = 0.5; sample 1: mean(0, (3*-1)^2) = 4.5
    assert hessian_error(o, oq, g).tolist() == [5.0]
    assert hessian_error(o, oq, g, group_dim=1).tolist() == [1.0, 9.0]


def _fq(x, step, bits):
    q = 2 ** (bits - 1)
    return torch.clamp(torch.round(x / step), -q, q - 1) * step


def test_weight_search_minimises_the_weighted_error_per_row_block():
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(4, 6)
    mod = QuantLinear(lin, UniformQuantizer(3, channel_axis=0), None)
    x = torch.randn(5, 3, 4, generator=g)
    with torch.no_grad():
        out = lin(x)
    grad = torch.randn(5, 3, 6, generator=g) * torch.tensor([1.0, 1, 5, 5, 0.1, 0.1])
    cfg = HessianConfig(n_candidates=9, rounds=1, chunk=2)
    search_linear(mod, LayerRecord([x], out, grad), cfg, n_groups=3)
    w = lin.weight.detach()
    f = interval_factors(cfg.alpha, cfg.beta, cfg.n_candidates)
    for grp in range(3):
        rows = slice(2 * grp, 2 * grp + 2)
        init = w[rows].abs().max() / (4 - 0.5)
        errs = []
        for c in f:
            oq = F.linear(x, _fq(w[rows], c * init, 3), lin.bias[rows].detach())
            errs.append(float(((grad[..., rows] * (oq - out[..., rows])) ** 2).mean(dim=(1, 2)).sum()))
        best = f[errs.index(min(errs))] * init
        torch.testing.assert_close(mod.weight_quantizer.scale[rows].flatten(), best.expand(2), rtol=0, atol=0)
    assert torch.equal(mod.weight_quantizer.zero_point, torch.full((6, 1), 4.0))


def test_weight_then_input_search_alternate():
    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(4, 3)
    mod = QuantLinear(lin, UniformQuantizer(3, channel_axis=0), UniformQuantizer(3))
    x = torch.randn(6, 4, generator=g) * 2
    with torch.no_grad():
        out = lin(x)
    grad = torch.randn(6, 3, generator=g)
    cfg = HessianConfig(n_candidates=6, rounds=1)
    search_linear(mod, LayerRecord([x], out, grad), cfg)
    w, b = lin.weight.detach(), lin.bias.detach()
    f = interval_factors(cfg.alpha, cfg.beta, cfg.n_candidates)
    w0, a0 = w.abs().max() / 3.5, x.abs().max() / 3.5
    err = lambda wq, xq: float(((grad * (F.linear(xq, wq, b) - out)) ** 2).mean(1).sum())  # noqa: E731
    ew = [err(_fq(w, c * w0, 3), _fq(x, a0, 3)) for c in f]  # weights first, input at its initial step
    ws = f[ew.index(min(ew))] * w0
    ea = [err(_fq(w, ws, 3), _fq(x, c * a0, 3)) for c in f]  # then the input, weights at the chosen step
    torch.testing.assert_close(mod.weight_quantizer.scale, ws, rtol=0, atol=0)
    torch.testing.assert_close(mod.input_quantizer.scale, f[ea.index(min(ea))] * a0, rtol=0, atol=0)


def test_softmax_split_is_scored_with_v_unquantized():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 2, 16, 16, generator=g) * 4, -1)
    b = torch.randn(3, 2, 16, 4, generator=g)
    out = a @ b
    grad = torch.randn(3, 2, 16, 4, generator=g) * torch.rand(3, 2, 16, 1, generator=g) * 3
    mod = QuantMatMul(PTQ4ViTSoftmaxQuantizer(3), UniformQuantizer(3))
    search_matmul(mod, LayerRecord([a, b], out, grad), HessianConfig(n_candidates=5, rounds=1, n_splits=12))
    b_q = _fq(b, b.transpose(0, 1).reshape(2, -1).abs().amax(1).reshape(1, 2, 1, 1) / 3.5, 3)

    def best(v, w):
        errs = []
        for i in range(12):
            qa = PTQ4ViTSoftmaxQuantizer(3)
            qa.set_split(2.0**-i)
            errs.append(float(hessian_error(out, qa(a) @ v, w)))
        return errs.index(min(errs))

    chosen = best(b, grad)
    assert float(mod.quantizer_a.split) == 2.0**-chosen
    assert chosen not in (best(b_q, grad), best(b, torch.ones_like(grad)))  # this case tells the variants apart
    assert mod.quantizer_b.scale.shape == (1, 2, 1, 1)  # per head


def test_collected_gradient_of_the_head_is_softmax_minus_onehot(images):
    q = quantize_model(small("vit"), QuantConfig(**PTQ4VIT))
    rec = collect_output_grads(q, ["head"], images, batch_size=3)["head"]
    with torch.no_grad():
        logits = q(images)
    torch.testing.assert_close(rec.output, logits, rtol=0, atol=0)
    exp = torch.softmax(logits, -1) - F.one_hot(logits.argmax(-1), 10)
    torch.testing.assert_close(rec.grad, exp, rtol=1e-5, atol=1e-7)
    assert rec.inputs[0].shape == (8, 192)


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_hessian_calibrate_end_to_end(name, images):
    m = small(name)
    q = quantize_model(copy.deepcopy(m), QuantConfig(w_bits=4, a_bits=4, **PTQ4VIT))
    done = hessian_calibrate(q, images[:4], cfg=HessianConfig(n_candidates=3, rounds=1, n_splits=3))
    layers = [n for n, mod in q.named_modules() if hasattr(mod, "weight_quant") and hasattr(mod, "act_quant")]
    assert sorted(done) == sorted(layers)
    assert all(qz.is_calibrated for _, qz in activation_quantizers(q))
    set_quant_state(q, True, True)
    with torch.no_grad():
        y = q(images)
    assert torch.isfinite(y).all() and not torch.equal(y, m(images))
    if name == "swin":
        assert q.get_submodule("layers.1.downsample.reduction").weight_quantizer.scale.numel() == 1
    else:
        assert q.blocks[0].attn.qkv.weight_quantizer.scale.unique().numel() <= 3  # one step per q/k/v block
