"""The registered baselines do what their names say (issue #16 item 3): BRECQ's two passes, QDrop's
settings, RepQ-ViT's and PTQ4ViT's calibrations through the engine, and the pieces they need (Lp loss,
fixed-weight step-size pass, 8-bit first and last layers)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import isvit_viz as iv
from isvit_viz.calib import METHODS, engine
from isvit_viz.calib.cache import MemoryBudget, TensorCache
from isvit_viz.calib.hessian import HessianConfig, hessian_calibrate
from isvit_viz.calib.recon import ReconConfig, act_scale_quantizers, recon_loss, reconstruct_unit
from isvit_viz.calib.reparam import repq_vit_calibrate
from isvit_viz.models import load_embedded
from isvit_viz.quant.modules import QuantConv2d, QuantLinear
from isvit_viz.quant.wrap import calibrate_activations, calibrate_weights, quantize_model, set_quant_state

KW = dict(iters=2, batch_size=16, seed=0, progress=False)


@pytest.fixture(scope="module")
def vit():
    model, splits = load_embedded("vit")
    calib, _ = splits.calib_tensors(32, seed=0)
    test, _ = splits.test_tensors(16)
    return model, calib, test


# --------------------------------------------------------------------------- pieces
def test_lp_loss_and_its_gradient_by_hand():
    err = torch.tensor([[[1.0], [-2.0]]], requires_grad=True)  # [B=1, tokens=2, C=1]
    loss = recon_loss(err, torch.zeros(1, 2, 1), p=2.4)
    assert loss.item() == pytest.approx(1 + 2**2.4, rel=1e-6)  # |1|^2.4 + |-2|^2.4, summed over tokens
    loss.backward()  # d|e|^p/de = p |e|^(p-1) sign(e)
    torch.testing.assert_close(err.grad.flatten(), torch.tensor([2.4, -2.4 * 2**1.4]))
    sq = recon_loss(torch.tensor([[[1.0], [-2.0]]]), torch.zeros(1, 2, 1))
    assert sq.item() == 5.0  # p = 2: the official squared error


def test_first_and_last_layers_at_their_own_bit_width(vit):
    model, _, _ = vit
    q = quantize_model(copy.deepcopy(model), METHODS["qdrop"].quant_config(3, 3))
    bits = {n: (m.weight_quantizer.bits, getattr(m.input_quantizer, "bits", None))
            for n, m in q.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}  # fmt: skip
    assert bits.pop("patch_embed.proj") == (8, None)  # the image itself stays unquantized
    assert bits.pop("head") == (8, 8)
    assert set(bits.values()) == {(3, 3)}


def test_fixed_rounding_learns_only_activation_step_sizes(vit):
    model, calib, _ = vit
    q = quantize_model(copy.deepcopy(model), METHODS["brecq"].quant_config(4, 4))
    calibrate_weights(q)
    set_quant_state(q, weight=True, act=True)
    calibrate_activations(q, calib)
    block, budget = q.blocks[0], MemoryBudget(None)
    got = []
    hook = model.blocks[0].register_forward_hook(lambda _m, i, o: got.append((i[0], o)))
    with torch.no_grad():
        model(calib)
    hook.remove()
    inputs, targets = (TensorCache(len(calib), t.shape[1:], budget) for t in got[0])
    inputs.write(0, got[0][0])
    targets.write(0, got[0][1])
    weights = {k: v.clone() for k, v in block.state_dict().items() if k.endswith(("weight", "bias"))}
    scales = [s.scale.clone() for s in act_scale_quantizers(block)]
    cfg = ReconConfig(iters=3, batch_size=8, rounding="fixed", act_scale_lr=1e-2, act_scale_grad_scale=False)
    reconstruct_unit(block, inputs, targets, cfg, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False)
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in weights.items())  # no weight moved
    assert any(not torch.equal(s0, s.scale) for s0, s in zip(scales, act_scale_quantizers(block)))
    with pytest.raises(ValueError, match="rounding='fixed' trains no weights"):
        ReconConfig(rounding="fixed")


# --------------------------------------------------------------------------- methods through the engine
def _spy_reconstruct(monkeypatch):
    """Record (cfg, activation switch of the unit, whether its weights changed) for every unit call."""
    seen, real = [], engine.reconstruct_unit

    def spy(unit, inputs, targets, cfg, *a, **kw):
        mods = [m for m in unit.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
        before = [m.weight.detach().clone() for m in mods]
        out = real(unit, inputs, targets, cfg, *a, **kw)
        moved = any(not torch.equal(b, m.weight) for b, m in zip(before, mods))
        seen.append((cfg, {m.act_quant for m in mods}, moved))
        return out

    monkeypatch.setattr(engine, "reconstruct_unit", spy)
    return seen


def test_brecq_runs_a_weight_pass_then_a_step_size_pass(vit, monkeypatch):
    model, calib, test = vit
    seen = _spy_reconstruct(monkeypatch)
    res = iv.quantize(model, "brecq", 4, 4, calib, **KW)
    weight_pass = [s for s in seen if s[0].rounding == "adaround"]
    act_pass = [s for s in seen if s[0].rounding == "fixed"]
    assert len(weight_pass) == 8 and len(act_pass) == 7  # the patch embedding has no step size to learn
    assert all(acts == {False} and moved for _, acts, moved in weight_pass)  # activations FP, weights re-rounded
    assert all(acts == {True} and not moved for _, acts, moved in act_pass)  # weights untouched
    cfg = act_pass[0][0]
    assert (cfg.act_scale_lr, cfg.act_scale_grad_scale, cfg.loss_p, cfg.batch_size) == (4e-4, False, 2.4, 16)
    assert all(u["act_scale_change"] > 0 for u in res.unit_losses if u["stage"] == "act_recon")
    assert torch.isfinite(res.model(test)).all()


def test_qdrop_reaches_the_reconstruction_with_its_own_settings(vit, monkeypatch):
    model, calib, _ = vit
    seen = _spy_reconstruct(monkeypatch)
    res = iv.quantize(model, "qdrop", 4, 4, calib, **{**KW, "batch_size": None})  # iters=2, QDrop's own batch
    cfg = seen[0][0]
    assert (cfg.rounding, cfg.input_mix, cfg.act_drop_prob, cfg.act_scale_lr, cfg.act_scale_grad_scale, cfg.loss_p,
            cfg.batch_size, cfg.iters) == ("adaround", 0.5, 0.5, 4e-5, True, 2.4, 32, 2)  # fmt: skip
    assert res.config["stages"][1]["iters"] == 2 and METHODS["qdrop"].stages[1].iters == 20000


def test_repq_vit_through_the_engine_equals_its_calibration_function(vit):
    model, calib, test = vit
    res = iv.quantize(model, "repq-vit", 4, 4, calib, **KW)
    q = quantize_model(copy.deepcopy(model), METHODS["repq-vit"].quant_config(4, 4))
    repq_vit_calibrate(q, calib[:32], round_zero_point=False)
    with torch.no_grad():
        assert torch.equal(res.model(test), q(test))


def test_ptq4vit_through_the_engine_equals_the_hessian_search(vit):
    model, calib, test = vit
    m = METHODS["ptq4vit"]
    small = replace(m, stages=(replace(m.stages[0], images=8, candidates=4, rounds=1),))
    res = iv.quantize(model, small, 4, 4, calib, **KW)
    q = quantize_model(copy.deepcopy(model), m.quant_config(4, 4))
    hessian_calibrate(q, calib[:8], cfg=HessianConfig(n_candidates=4, rounds=1))
    set_quant_state(q, weight=True, act=True)
    with torch.no_grad():
        assert torch.equal(res.model(test), q(test))
