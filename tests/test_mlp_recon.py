"""APHQ-ViT's ReLU MLP reconstruction (issue #17 item 2): the stage trains fc1 / fc2 of every MLP and
nothing else, lowers its loss, clamps at APHQ-ViT's percentile, and aphq-vit keeps the ReLU model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import isvit_viz as iv
from isvit_viz.calib import Calibrate, Method, ReluMLP
from isvit_viz.calib.cache import MemoryBudget, TensorCache
from isvit_viz.calib.mlp_recon import MLPReconConfig, _mlp_out, block_mlps, positive_quantile, reconstruct_mlp
from isvit_viz.models import load_embedded
from isvit_viz.serialization import load_quantized, save_quantized

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vit():
    model, splits = load_embedded("vit")
    calib, _ = splits.calib_tensors(16, seed=0)
    return model, calib


def _cache(t: torch.Tensor) -> TensorCache:
    c = TensorCache(len(t), tuple(t.shape[1:]), MemoryBudget(None))
    c.write(0, t)
    return c


def test_positive_quantile_is_aphq_rank():
    fc1 = nn.Linear(1, 1, bias=False)
    fc1.weight.data.fill_(1.0)
    mlp = nn.Module()
    mlp.fc1, mlp.act = fc1, nn.Identity()
    x = torch.tensor([-3.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]).reshape(12, 1, 1)
    # 10 positive values 1..10: APHQ-ViT takes sorted[ceil(10 * pct) - 1]
    assert positive_quantile(mlp, _cache(x), 0.95, CPU, chunk=5) == 10.0
    assert positive_quantile(mlp, _cache(x), 0.9, CPU) == 9.0
    assert positive_quantile(mlp, _cache(x), 0.01, CPU) == 1.0


def test_reconstruct_mlp_trains_fc1_fc2_only_and_lowers_the_loss():
    torch.manual_seed(0)
    from timm.layers import Mlp

    teacher = Mlp(8, 16, act_layer=nn.GELU)
    student = Mlp(8, 16, act_layer=nn.ReLU)
    student.load_state_dict(teacher.state_dict())
    x = torch.randn(64, 5, 8)
    with torch.no_grad():
        y = teacher(x)
    frozen = {k: v.clone() for k, v in student.state_dict().items()}
    w = torch.rand(1, 5, 8) + 0.5
    ub = positive_quantile(teacher, _cache(x), 0.99, CPU)
    cfg = MLPReconConfig(iters=60, batch_size=16, lr=1e-2)
    out = reconstruct_mlp(student, _cache(x), _cache(y), w, ub, cfg, CPU, torch.Generator().manual_seed(0), progress=False)
    assert out["loss_last"] < 0.5 * out["loss_first"]
    # the loss as APHQ-ViT writes it, at the end state, by hand on the whole set
    with torch.no_grad():
        rec = ((student(x) - y).pow(2) * w).sum(1).mean() / 10
        clamp = ((student.fc2(torch.clamp(student.act(student.fc1(x)), 0, ub)) - y).pow(2) * w).sum(1).mean() / 10
        assert torch.allclose(_mlp_out(student, x, ub), student.fc2(torch.clamp(student.act(student.fc1(x)), 0, ub)))
    assert math.isfinite(float(rec + 2.0 * clamp))
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, frozen[k])}
    assert changed == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_relu_mlp_stage_in_a_method(vit):
    model, calib = vit
    m = Method(name="relu", softmax="uniform", mlp_act="relu", stages=(ReluMLP(iters=3, batch_size=8), Calibrate(images=8)))
    res = iv.quantize(model, m, 4, 4, calib, seed=0, progress=False)
    mlps = dict(block_mlps(res.model))
    assert len(mlps) == len(model.blocks) and all(isinstance(m.act, nn.ReLU) for m in mlps.values())
    recs = [u for u in res.unit_losses if u["stage"] == "mlp_recon"]
    assert [r["unit"] for r in recs] == list(mlps) and all(r["ub"] > 0 for r in recs)
    for name, mlp in mlps.items():  # only fc1 / fc2 moved; the blocks' attention is the FP model's
        t = model.get_submodule(name)
        assert not torch.equal(mlp.fc1.weight, t.fc1.weight) and not torch.equal(mlp.fc2.weight, t.fc2.weight)
    for blk, t_blk in zip(res.model.blocks, model.blocks):
        assert torch.equal(blk.norm2.weight, t_blk.norm2.weight) and torch.equal(blk.attn.qkv.weight, t_blk.attn.qkv.weight)


def test_aphq_vit_saves_and_loads_with_its_relu(vit, tmp_path):
    model, calib = vit
    res = iv.quantize(model, "aphq-vit", 4, 4, calib, iters=2, batch_size=8, seed=0, progress=False)
    assert res.config["quant_config"]["mlp_act"] == "relu"
    back = load_quantized(save_quantized(res, tmp_path / "q.pt"))
    assert all(isinstance(m.act, nn.ReLU) for _, m in block_mlps(back.model))
    with torch.no_grad():
        assert torch.equal(back.model(calib[:4]), res.model(calib[:4]))


@pytest.mark.parametrize(
    ("kw", "stages", "needle"),
    [
        ({}, (ReluMLP(), Calibrate()), r"stages\[0\] \(ReluMLP 'mlp_recon'\): mlp_act: .*mlp_act='relu'"),
        ({"mlp_act": "relu"}, (Calibrate(), ReluMLP()), r"stages\[1\] .*stage order: ReluMLP .* before any calibration"),
        ({"mlp_act": "relu"}, (ReluMLP(clamp_pct=1.5), Calibrate()), r"clamp_pct: must be None or a quantile"),
        ({"mlp_act": "relu"}, (ReluMLP(iters=0), Calibrate()), r"iters: must be an int >= 1"),
        ({"mlp_act": "relu"}, (ReluMLP(clamp_weight=-1), Calibrate()), r"clamp_weight: must be a finite number >= 0"),
    ],
)
def test_bad_relu_mlp_stages_fail_before_any_work(kw, stages, needle):
    with pytest.raises(ValueError, match=needle):
        Method(name="bad", stages=stages, **kw)
