"""Quantized timm models, reparameterization, the methods end to end (random-init small models)."""

import copy
from dataclasses import replace

import pytest
import torch

import isvit_viz as iv
from isvit_viz.calib import METHODS, Loss, reconstruction_units, reparameterize
from isvit_viz.calib.reparam import post_ln_pairs
from isvit_viz.models import build_from_spec, create
from isvit_viz.quant import SULQ, UniformQuantizer
from isvit_viz.quant.config import QuantConfig
from isvit_viz.quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from isvit_viz.quant.wrap import activation_quantizers, calibrate_activations, quantize_model, set_quant_state


def small(name):
    torch.manual_seed(0)
    return build_from_spec({"kind": "embedded", "name": name})


@pytest.fixture(scope="module")
def images():
    return torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_wrapped_model_reproduces_fp_logits(name, images):
    m = small(name)
    with torch.no_grad():
        ref = m(images)
        q = quantize_model(copy.deepcopy(m), QuantConfig())
        assert (q(images) - ref).abs().max() <= 1e-5


def test_quantizer_placement_vit():
    q = quantize_model(small("vit"), QuantConfig())
    mods = dict(q.named_modules())
    lin = sorted(n for n, m in mods.items() if isinstance(m, QuantLinear))
    expected = sorted([f"blocks.{i}.{s}" for i in range(6) for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")] + ["head"])
    assert lin == expected
    assert [n for n, m in mods.items() if isinstance(m, QuantConv2d)] == ["patch_embed.proj"]
    assert mods["patch_embed.proj"].input_quantizer is None  # the image stays FP
    mm = sorted(n for n, m in mods.items() if isinstance(m, QuantMatMul))
    assert mm == sorted(f"blocks.{i}.attn.matmul{j}" for i in range(6) for j in (1, 2))
    assert all(isinstance(mods[f"blocks.{i}.attn.matmul2"].quantizer_a, SULQ) for i in range(6))
    # post-LN inputs channel-wise, everything else per tensor
    for n in lin:
        qz = mods[n].input_quantizer
        assert isinstance(qz, UniformQuantizer)
        assert qz.channel_axis == (-1 if n.endswith(("qkv", "fc1")) else None), n
    # nothing else: LayerNorm, softmax, GELU, pos-embed are not wrapped; count all quantizers
    n_act = len(list(activation_quantizers(q)))
    assert n_act == len(lin) + 2 * len(mm)


def test_quantizer_placement_swin():
    q = quantize_model(small("swin"), QuantConfig())
    mods = dict(q.named_modules())
    lin = sorted(n for n, m in mods.items() if isinstance(m, QuantLinear))
    blocks = [f"layers.0.blocks.{i}" for i in range(2)] + [f"layers.1.blocks.{i}" for i in range(4)]
    expected = sorted(
        [f"{b}.{s}" for b in blocks for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
        + ["layers.1.downsample.reduction", "head.fc"]
    )
    assert lin == expected
    assert mods["layers.1.downsample.reduction"].input_quantizer.channel_axis is None  # layer-wise, as the official code
    assert len([m for m in mods.values() if isinstance(m, QuantMatMul)]) == 12


def test_reconstruction_units_in_forward_order():
    q = quantize_model(small("swin"), QuantConfig())
    names = [n for n, _, _ in reconstruction_units(q)]
    assert names == ["patch_embed.proj", "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample.reduction",
                     "layers.1.blocks.0", "layers.1.blocks.1", "layers.1.blocks.2", "layers.1.blocks.3", "head.fc"]  # fmt: skip


def _block_out(model, x, idx):
    out = {}
    blk = model.blocks[idx]
    h = blk.register_forward_hook(lambda m, a, o: out.setdefault("y", o))
    with torch.no_grad():
        model(x)
    h.remove()
    return out["y"]


@pytest.mark.parametrize("round_zp", [True, False])
def test_reparameterization_exact_in_float(images, round_zp):
    q = quantize_model(small("vit"), QuantConfig(a_bits=4))
    set_quant_state(q, weight=False, act=True)
    calibrate_activations(q, images[:64])
    set_quant_state(q, weight=False, act=False)
    before = [_block_out(q, images, i) for i in range(6)]
    assert reparameterize(q, round_zero_point=round_zp) == 12
    after = [_block_out(q, images, i) for i in range(6)]
    for b, a in zip(before, after):
        assert ((a - b).abs().max() / b.abs().max()) <= 1e-5


def _qkv0_out(q, x):
    out = {}
    h = q.blocks[0].attn.qkv.register_forward_hook(lambda m, a, o: out.setdefault("y", o))
    with torch.no_grad():
        q(x)
    h.remove()
    return out["y"]


def _changed_fraction(round_zp, images):
    q = quantize_model(small("vit"), QuantConfig(a_bits=4))
    set_quant_state(q, weight=False, act=True)
    calibrate_activations(q, images[:64])
    before = _qkv0_out(q, images)
    reparameterize(q, round_zero_point=round_zp)
    after = _qkv0_out(q, images)
    tok_err = (after - before).abs().amax(-1) / before.abs().amax(-1)
    return float((tok_err > 1e-4).double().mean())


def test_integer_zero_point_makes_the_transition_lossless_when_quantized(images):
    # With an integer mean zero-point only float round-off at exact .5 ties can flip a code; the
    # official fractional zero-point shifts the rounding grid of every channel.
    exact = _changed_fraction(True, images)
    official = _changed_fraction(False, images)
    assert exact < 0.01
    assert official > 0.5


def test_reparameterization_exact_on_deit_tiny():
    torch.manual_seed(0)
    m = create("deit_tiny_patch16_224")
    x = torch.randn(4, 3, 224, 224)
    q = quantize_model(m, QuantConfig(a_bits=4))
    set_quant_state(q, weight=False, act=True)
    calibrate_activations(q, x)
    set_quant_state(q, weight=False, act=False)
    before = [_block_out(q, x, i) for i in (0, 5, 11)]
    reparameterize(q)
    after = [_block_out(q, x, i) for i in (0, 5, 11)]
    for b, a in zip(before, after):
        assert ((a - b).abs().max() / b.abs().max()) <= 1e-5
    assert len(list(post_ln_pairs(q))) == 24


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_small_patch16_224", "swin_tiny_patch4_window7_224"])
def test_structure_on_timm_224(name):
    torch.manual_seed(0)
    m = create(name)
    x = torch.randn(8, 3, 224, 224)
    res = iv.quantize(m, "isvit", 4, 4, x, iters=1, batch_size=4, progress=False)
    with torch.no_grad():
        out = res.model(x[:2])
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert res.timings["stage3"] > 0


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", ["vit", "swin"])
def test_every_method_runs(method, name, images):
    m = small(name)
    spec = METHODS[method]
    if method == "ptq4vit":  # the full Hessian search takes minutes; a small one exercises the same code
        spec = replace(spec, stages=(replace(spec.stages[0], images=16, candidates=10, rounds=1),))
    if method == "fima-q":  # k = 5 Fisher refreshes need >= 5 steps; two refreshes in two steps exercise the same code
        spec = replace(
            spec, stages=(*spec.stages[:-1], replace(spec.stages[-1], loss=Loss("fisher_dplr", k=2, temperature=20.0)))
        )
    res = iv.quantize(m, spec, 4, 4, images[:64], iters=2, batch_size=32, progress=False)
    with torch.no_grad():
        out = res.model(images[:8])
        assert torch.isfinite(out).all()
        # quantization is on and changes the output
        assert not torch.equal(out, m(images[:8]))
    assert res.config["method"] == method


@pytest.mark.parametrize("kw", [{"softmax_quantizer": "log2"}, {"softmax_quantizer": "uniform"}, {"sos": False}])
def test_ablation_switches(kw, images):
    res = iv.quantize(small("vit"), "isvit", 3, 3, images[:64], iters=2, batch_size=32, progress=False, **kw)
    if "softmax_quantizer" in kw:
        assert res.config["softmax_quantizer"] == kw["softmax_quantizer"]
    else:
        assert res.config["schedule"] == "single"
        assert "stage1" not in res.timings


def test_stage_callbacks_and_snapshots(images):
    seen = []
    iv.quantize(small("vit"), "isvit", 4, 4, images[:64], iters=1, batch_size=32, progress=False,
                callbacks=lambda stage, m: seen.append((stage, copy.deepcopy(m))))  # fmt: skip
    assert [s for s, _ in seen] == ["calibrated", "stage1", "stage2", "stage3"]
    # stage 1 keeps FP weights; stage 3 quantizes them
    assert not seen[1][1].blocks[0].attn.qkv.weight_quant and seen[3][1].blocks[0].attn.qkv.weight_quant
    # after stage 2 the post-LN quantizers are layer-wise
    assert seen[2][1].blocks[0].attn.qkv.input_quantizer.scale.numel() == 1


def test_save_load_round_trip_bit_identical(images, tmp_path):
    res = iv.quantize(small("vit"), "isvit", 4, 4, images[:64], iters=2, batch_size=32, progress=False)
    path = iv.save_quantized(res, tmp_path / "q.pt")
    back = iv.load_quantized(path)
    with torch.no_grad():
        assert torch.equal(back.model(images), res.model(images))
    assert back.config == res.config


def test_seeded_run_is_deterministic(images):
    outs = []
    for _ in range(2):
        res = iv.quantize(small("vit"), "isvit", 3, 3, images[:64], iters=3, batch_size=32, seed=7, progress=False)
        with torch.no_grad():
            outs.append(res.model(images))
    assert torch.equal(outs[0], outs[1])


def test_fp_model_left_unchanged(images):
    m = small("vit")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    iv.quantize(m, "isvit", 4, 4, images[:64], iters=2, batch_size=32, progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_bf16_matmul_reconstruction_option(images):
    ref = iv.quantize(small("vit"), "isvit", 4, 4, images[:64], iters=3, batch_size=32, progress=False)
    res = iv.quantize(small("vit"), "isvit", 4, 4, images[:64], iters=3, batch_size=32, progress=False, matmul_dtype="bfloat16")
    assert res.config["matmul_dtype"] == "bfloat16"
    # the returned model evaluates in fp32 again
    assert all(getattr(m, "matmul_dtype", None) is None for m in res.model.modules())
    with torch.no_grad():
        a, b = ref.model(images), res.model(images)
    assert torch.isfinite(b).all()
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.8
    with pytest.raises(ValueError, match="matmul_dtype"):
        iv.quantize(small("vit"), "isvit", 4, 4, images[:64], iters=1, batch_size=32, progress=False, matmul_dtype="fp8")
