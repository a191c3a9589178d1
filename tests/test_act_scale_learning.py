"""Learned activation step sizes during reconstruction (QDrop / BRECQ, LSQ-style; issue #16)."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from isvit_viz.calib.cache import MemoryBudget, TensorCache
from isvit_viz.calib.recon import ReconConfig, act_scale_quantizers, recon_loss, reconstruct_unit
from isvit_viz.quant import UniformQuantizer
from isvit_viz.quant.log_quantizers import Log2Quantizer
from isvit_viz.quant.modules import QuantLinear, QuantMatMul
from isvit_viz.quant.ste import clamp_ste, round_ste
from isvit_viz.quant.uniform import WEIGHT_PERCENTILES
from isvit_viz.quant.wrap import calibrate_activations, calibrate_weights, set_quant_state

CPU = torch.device("cpu")

# 2-bit asymmetric, s = 0.5, z = 1 (codes 0..3). x/s = 0.75, 2.25, -1.25, -2, 4: codes 2 (inside), 3 (upper
# edge, inside), 0 (lower edge, inside), -1 (below), 5 (above).
X = torch.tensor([[0.375, 1.125, -0.625, -1.0, 2.0]])
# d x_hat / d s: round(x/s) - x/s inside; -z below; qmax - z above.
DS = [1 - 0.75, 2 - 2.25, -1 + 1.25, -1.0, 3 - 1.0]


def _quantizer(per_channel: bool) -> UniformQuantizer:
    q = UniformQuantizer(2, channel_axis=-1 if per_channel else None)
    shape = (1, 5) if per_channel else ()
    q.set_params(torch.full(shape, 0.5), torch.full(shape, 1.0), channel_axis=-1 if per_channel else None)
    return q


def test_step_size_gradient_hand_values_inside_below_above():
    q = _quantizer(per_channel=True)  # one scale per element: the gradient is read element by element
    fixed = q(X.clone().requires_grad_(True))
    q.learn_scale(True, grad_scale=False)
    x = X.clone().requires_grad_(True)
    y = q(x)
    y.backward(torch.ones_like(y))
    assert q.scale.grad.tolist() == [DS]
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]  # the input's STE rule is unchanged
    assert torch.equal(y, fixed) and y.tolist() == [[0.5, 1.0, -0.5, -0.5, 1.0]]


def test_step_size_gradient_equals_autograd_of_the_reference_expression():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    q = _quantizer(per_channel=False)
    q.learn_scale(True, grad_scale=False)
    (q(X) * w).sum().backward()  # X does not require grad: the scale alone still gets one
    assert float(q.scale.grad) == sum(a * b for a, b in zip(w[0].tolist(), DS)) == 6.5
    s = torch.tensor(0.5, requires_grad=True)
    ref = (clamp_ste(round_ste(X / s) + 1.0, 0, 3) - 1.0) * s  # QDrop's learnable fake-quant, inclusive edges
    (ref * w).sum().backward()
    assert float(s.grad) == 6.5


@pytest.mark.parametrize("symmetric, qp", [(False, 7), (True, 3)])
def test_lsq_gradient_scale_is_one_over_sqrt_n_qp(symmetric, qp):
    """QDrop's grad_factor 1/sqrt(numel * quant_max) per tensor, numel / C per channel."""
    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0))
    for axis, n in ((None, 120), (-1, 24)):
        grads = []
        for grad_scale in (False, True):
            q = UniformQuantizer(3, channel_axis=axis, symmetric=symmetric).calibrate(x)
            q.learn_scale(True, grad_scale=grad_scale)
            (q(x) * x).sum().backward()
            grads.append(q.scale.grad)
        assert torch.allclose(grads[1], grads[0] / math.sqrt(n * qp), rtol=1e-6, atol=0), (axis, symmetric)


def test_learn_scale_switch_keeps_value_keys_and_state():
    q = UniformQuantizer(3).calibrate(torch.randn(100, generator=torch.Generator().manual_seed(0)))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.learn_scale(True)
    assert q.learns_scale and isinstance(q.scale, nn.Parameter) and "scale" not in q._buffers
    with pytest.raises(RuntimeError, match="learn_scale"):
        q.calibrate(torch.randn(10))
    q.learn_scale(False)
    assert not q.learns_scale and list(q._parameters) == [] and list(q._buffers) == ["initialized", "scale", "zero_point"]
    after = q.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


# ----------------------------------------------------------------- the engine
class _Unit(nn.Module):
    """Linear, then an attention-like matmul: uniform Linear input, log2 post-softmax operand, uniform V."""

    def __init__(self) -> None:
        super().__init__()
        wq = UniformQuantizer(4, channel_axis=0, percentiles=WEIGHT_PERCENTILES)
        self.fc = QuantLinear(nn.Linear(8, 8), wq, UniformQuantizer(3))
        self.mm = QuantMatMul(Log2Quantizer(3), UniformQuantizer(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.mm((h @ h.transpose(-1, -2) / 8**0.5).softmax(-1), h)


@pytest.fixture(scope="module")
def setup():
    """(calibrated unit, its inputs, FP targets): 32 samples of 6 tokens x 8 channels."""
    torch.manual_seed(0)
    unit = _Unit()
    x = torch.randn(32, 6, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = unit(x)  # quantization off: the FP teacher
    calibrate_weights(unit)
    set_quant_state(unit, weight=True, act=True)
    calibrate_activations(unit, x)
    budget = MemoryBudget(1 << 30)
    xs, ys = TensorCache(32, (6, 8), budget), TensorCache(32, (6, 8), budget)
    xs.write(0, x)
    ys.write(0, y)
    return unit, xs, ys


def _run(setup, **kw):
    unit, xs, ys = setup
    unit = copy.deepcopy(unit)
    cfg = ReconConfig(iters=25, batch_size=32, **kw)  # full batch: deterministic
    out = reconstruct_unit(unit, xs, ys, cfg, CPU, torch.Generator().manual_seed(0), progress=False)
    with torch.no_grad():
        final = float(recon_loss(unit(xs.gather(torch.arange(32), CPU)), ys.gather(torch.arange(32), CPU)))
    return unit, out, final


def _quant_state(unit):
    return {k: v.clone() for k, v in unit.state_dict().items() if "quantizer" in k}


@pytest.mark.parametrize("rounding", ["ste", "adaround"])
def test_option_off_leaves_every_activation_scale_bit_identical(setup, rounding):
    before = _quant_state(setup[0])
    unit, out, _ = _run(setup, rounding=rounding, lr=1e-3)
    after = _quant_state(unit)
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(k.startswith("act_scale") for k in out)
    assert not any(q.learns_scale for q in unit.modules() if isinstance(q, UniformQuantizer))


def test_learning_changes_uniform_scales_only_and_lowers_the_final_loss(setup):
    before = _quant_state(setup[0])
    assert [id(q) for q in act_scale_quantizers(setup[0])] == [id(setup[0].fc.input_quantizer), id(setup[0].mm.quantizer_b)]
    lrs = []
    handle = register_optimizer_step_post_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    try:
        unit, out, final = _run(setup, lr=1e-12, act_scale_lr=1e-2)  # weights all but frozen
    finally:
        handle.remove()
    _, _, final_fixed = _run(setup, lr=1e-12)
    assert final < final_fixed and out["rec_last"] < out["rec_first"]
    assert out["act_scale_n"] == 2 and out["act_scale_change"] > 0
    after = _quant_state(unit)
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed == {"fc.input_quantizer.scale", "mm.quantizer_b.scale"}  # zero-points, log2, weights fixed
    assert not any(q.learns_scale for q in unit.modules() if isinstance(q, UniformQuantizer))
    # two optimisers per step (weights, then scales); the scales' lr is cosine from 1e-2 to 0 over 25 steps
    scale_lrs = lrs[1::2]
    assert len(scale_lrs) == 25 and scale_lrs[0] == 1e-2
    assert scale_lrs[10] == pytest.approx(1e-2 * (1 + math.cos(math.pi * 10 / 25)) / 2, rel=1e-12)


def test_learned_scales_state_dict_round_trip_is_exact(setup):
    unit, _, _ = _run(setup, rounding="adaround", act_scale_lr=1e-2)
    fresh = _Unit()  # other weights, uncalibrated quantizers
    fresh.load_state_dict(unit.state_dict())
    set_quant_state(fresh, weight=True, act=True)
    x = setup[1].gather(torch.arange(8), CPU)
    with torch.no_grad():
        assert torch.equal(fresh(x), unit(x))
    assert torch.equal(fresh.fc.input_quantizer.scale, unit.fc.input_quantizer.scale)


def test_error_restores_the_original_scales(setup):
    unit, xs, ys = setup
    unit = copy.deepcopy(unit)
    before = _quant_state(unit)
    scale_steps = []

    def fail_on_second_scale_step(opt, *_):
        if all(p.dim() == 0 for p in opt.param_groups[0]["params"]):  # the step-size optimiser
            scale_steps.append(float(unit.fc.input_quantizer.scale.detach()))
            if len(scale_steps) == 2:
                raise RuntimeError("boom")

    handle = register_optimizer_step_post_hook(fail_on_second_scale_step)
    cfg = ReconConfig(iters=3, batch_size=32, act_scale_lr=1e-2)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            reconstruct_unit(unit, xs, ys, cfg, CPU, torch.Generator(), progress=False)
    finally:
        handle.remove()
    assert scale_steps[0] != float(before["fc.input_quantizer.scale"])  # the scales had moved
    after = _quant_state(unit)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not unit.fc.input_quantizer.learns_scale


def test_act_scale_lr_validation():
    for bad in (0.0, -1e-3, float("inf"), True, "1e-3"):
        with pytest.raises(ValueError, match="act_scale_lr"):
            ReconConfig(act_scale_lr=bad)
    assert ReconConfig().act_scale_lr is None


def test_save_quantized_round_trip_keeps_learned_scales(tmp_path):
    """A ViT block reconstructed with learned step sizes reloads with bit-identical scales and logits."""
    import isvit_viz as iv
    from isvit_viz.calib.capture import capture_unit_io
    from isvit_viz.models import build_from_spec
    from isvit_viz.quant.config import QuantConfig
    from isvit_viz.quant.wrap import quantize_model

    spec = {"kind": "embedded", "name": "vit"}
    fp = build_from_spec(spec).eval()
    qcfg = QuantConfig(w_bits=4, a_bits=4)
    q = quantize_model(copy.deepcopy(fp), qcfg).eval()
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    calibrate_weights(q)
    set_quant_state(q, weight=True, act=True)
    calibrate_activations(q, images)
    name, budget = "blocks.0", MemoryBudget(1 << 30)
    xs, _ = capture_unit_io(q, q.get_submodule(name), images, budget, CPU, want_output=False)
    _, ys = capture_unit_io(fp, fp.get_submodule(name), images, budget, CPU, want_input=False)
    qkv_in = q.get_submodule(name).attn.qkv.input_quantizer
    s0 = qkv_in.scale.clone()
    cfg = ReconConfig(iters=2, batch_size=8, rounding="adaround", act_scale_lr=1e-2)
    out = reconstruct_unit(q.get_submodule(name), xs, ys, cfg, CPU, torch.Generator().manual_seed(0), progress=False)
    # qkv, proj, fc1, fc2 inputs, Q, K, V; the post-softmax quantizer is not uniform and stays fixed
    assert out["act_scale_n"] == 7 and not torch.equal(qkv_in.scale, s0)
    res = iv.QuantResult(model=q, config={"quant_config": qcfg.to_dict(), "build_spec": spec})
    back = iv.load_quantized(iv.save_quantized(res, tmp_path / "q.pt"))
    assert torch.equal(back.model.get_submodule(name).attn.qkv.input_quantizer.scale, qkv_in.scale)
    with torch.no_grad():
        assert torch.equal(back.model(images), q(images))
