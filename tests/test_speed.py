"""The speed paths (issue: speed) compute exactly what the literal formulas compute.

* fake-quant without autograd (evaluation) and the fused training kernel: bit for bit the literal
  ``(clamp(round(x/s) + z, 0, qmax) - z) * s`` and SULQ's formulas, gradients included;
* the frozen-weight cache: reused while nothing changes, recomputed on every change it depends on;
* ``compile``: a compiled reconstruction step agrees with eager, and a failing compiler falls back to
  eager with a warning;
* the demo prints its first PTQ table before any reconstruction starts;
* the speed benchmark's matrix-product floor replays exactly the step's products.
"""

import argparse
import warnings

import pytest
import torch

from isvit_viz.quant import SULQ, UniformQuantizer
from isvit_viz.quant.modules import QuantLinear


def _literal_uniform(x: torch.Tensor, q: UniformQuantizer) -> torch.Tensor:
    return (torch.clamp(torch.round(x / q.scale) + q.zero_point, 0, q.qmax) - q.zero_point) * q.scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [None, 0, -1])
@pytest.mark.parametrize("zp", ["integer", "fractional"])
def test_uniform_fast_paths_are_the_literal_formula(bits, axis, zp):
    g = torch.Generator().manual_seed(bits * 7 + (axis or 3))
    x = torch.randn(6, 33, 12, generator=g) * 3
    q = UniformQuantizer(bits, channel_axis=axis).calibrate(x)
    if zp == "fractional":  # the official reparameterization's mean zero-point
        q.set_params(q.scale, q.zero_point + 0.37, axis)
    ties = (torch.randint(-9, 9, (6, 1, 12), generator=g) + 0.5) * q.scale.reshape(-1).max()
    x = torch.cat([x, ties], dim=1)  # along the axis no quantizer has channels on
    ref = _literal_uniform(x, q)
    with torch.no_grad():
        assert torch.equal(q(x), ref)
    xg = x.clone().requires_grad_(True)
    y = q(xg)
    assert torch.equal(y.detach(), ref)
    w = torch.randn(x.shape, generator=g)
    y.backward(w)
    code = torch.round(x / q.scale) + q.zero_point
    inside = (code >= 0) & (code <= q.qmax)  # the STE rule: edges included
    assert inside.any() and (~inside).any()
    assert torch.equal(xg.grad, torch.where(inside, w, 0.0))


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("bits", [3, 4, 6])
def test_sulq_no_grad_path_is_the_autograd_formula(mode, bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.softmax(torch.randn(4, 3, 17, 17, generator=g) * 4, -1)
    q = SULQ(bits, mode=mode).calibrate(x)
    x = torch.cat([x.flatten(), torch.tensor([0.0, 1.0])])
    with torch.no_grad():
        fast = q(x)
    ref = q._dequant(q._codes(x.clone().requires_grad_(True), ste=True)).detach()  # the autograd formula
    assert torch.equal(fast, ref)


def _layer(seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(8, 5)
    layer = QuantLinear(lin, UniformQuantizer(4, channel_axis=0), None)
    layer.weight_quantizer.calibrate(lin.weight.detach())
    layer.weight_quant = True
    return layer


def _count_calls(monkeypatch) -> list[int]:
    """Calls of UniformQuantizer.forward, counted at the class (a hook would itself turn the cache off)."""
    calls, forward = [0], UniformQuantizer.forward

    def counted(self, x):
        calls[0] += 1
        return forward(self, x)

    monkeypatch.setattr(UniformQuantizer, "forward", counted)
    return calls


def test_frozen_weight_cache_reuses_until_anything_changes(monkeypatch):
    layer = _layer()
    calls = _count_calls(monkeypatch)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y0 = layer(x)
        assert torch.equal(layer(x), y0) and calls[0] == 1  # reused
        layer.weight.add_(0.3)  # in-place change of the weight
        y1 = layer(x)
        assert calls[0] == 2 and torch.equal(
            y1, torch.nn.functional.linear(x, _literal_uniform(layer.weight, layer.weight_quantizer), layer.bias)
        )
        layer.weight_quantizer.scale.mul_(2)  # in-place change of a quantizer buffer
        layer(x)
        assert calls[0] == 3
        layer.weight_quantizer.bits = 3  # a plain setting
        layer(x)
        assert calls[0] == 4
        layer.weight = torch.nn.Parameter(layer.weight.detach() * 0.5)  # a new tensor
        y4 = layer(x)
        assert calls[0] == 5 and torch.equal(
            y4, torch.nn.functional.linear(x, _literal_uniform(layer.weight, layer.weight_quantizer), layer.bias)
        )
    # with autograd on a trainable weight the quantizer runs every time and the gradient reaches the weight
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert calls[0] == 7 and layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_hooks_bypasses_and_foreign_quantizers_see_every_call(monkeypatch):
    """Analyses observe or replace the weight quantizer (sensitivity, captures): no cached weight then."""
    layer = _layer()
    calls = _count_calls(monkeypatch)
    x = torch.randn(3, 8)
    seen = []
    with torch.no_grad():
        layer(x)
        h = layer.weight_quantizer.register_forward_hook(lambda _m, _i, out: seen.append(out))
        layer(x), layer(x)
        assert calls[0] == 3 and len(seen) == 2  # the hook saw both calls
        h.remove()
        layer.weight_quantizer.forward = lambda w: w  # a bypass, as the sensitivity analysis does
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        del layer.weight_quantizer.forward
        layer.weight_quantizer = torch.nn.Identity()  # not one of ours
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_recon_config_rejects_a_non_bool_compile():
    from isvit_viz.calib.recon import ReconConfig

    with pytest.raises(ValueError, match="compile must be True or False"):
        ReconConfig(compile="yes")


def _block():
    import isvit_viz as iv
    from isvit_viz.calib.pipeline import reconstruction_units

    model, splits = iv.load_embedded("vit")
    res = iv.quantize(model, "isvit", 4, 4, splits.calib_tensors(32)[0], iters=0, batch_size=32, progress=False)
    blk = next(u[1] for u in reconstruction_units(res.model) if u[2] == "block")
    x = torch.randn(4, model.patch_embed.num_patches + 1, model.embed_dim, generator=torch.Generator().manual_seed(0))
    return blk, x


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(monkeypatch):
    from isvit_viz.calib import fast

    blk, x = _block()

    def broken(*_a, **_k):
        def run(_x):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    forward = fast.compiled(blk)
    with pytest.warns(RuntimeWarning, match="running this unit eagerly"):
        y = forward(x)
    with torch.no_grad():
        assert torch.equal(y, blk(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        forward(x)


def test_compiled_block_step_agrees_with_eager():
    from isvit_viz.calib import fast

    blk, x = _block()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y_c = fast.compiled(blk)(x.clone().requires_grad_(True))
    if any("running this unit eagerly" in str(w.message) for w in caught):
        pytest.skip("torch.compile cannot run here (no C++ compiler): the eager fallback is tested above")
    xe = x.clone().requires_grad_(True)
    y_e = blk(xe)
    # fused kernels reorder float operations: equal up to a few codes flipping at rounding ties
    rel = ((y_c.detach() - y_e.detach()).norm() / y_e.detach().norm()).item()
    assert rel < 1e-3


def test_demo_prints_the_calibration_only_table_before_reconstruction(monkeypatch, capsys):
    from isvit_viz import cli

    calls = []

    def fake_run(ns):
        calls.append((ns.method, ns.w_bits, ns.iters))
        print(f"RUN {ns.method} {ns.iters}")
        return {"model": ns.model, "method": ns.method, "w_bits": ns.w_bits, "a_bits": ns.a_bits, "q_top1": 0.5,
                "agree_top1": 0.6, "kl_to_fp": 0.1}  # fmt: skip

    monkeypatch.setattr(cli, "run_quantize", fake_run)
    monkeypatch.setattr(cli, "cmd_evaluate", lambda ns: print("FP TABLE"))
    args = argparse.Namespace(full=False, iters=None, device="cpu", threads=1, quiet=True, out="x", no_notebooks=True)
    assert cli.cmd_demo(args) == 0
    out = capsys.readouterr().out
    assert [c[2] for c in calls] == [0, 0, 0, 40, 40, 40, 40]  # three calibration-only runs first
    first_table = out.index("model", out.index("RUN isvit 0"))
    assert out.index("FP TABLE") < out.index("RUN minmax 0") < first_table < out.index("RUN repq-vit 40")


def test_speed_floor_replays_the_steps_matrix_products():
    from benchmarks.speed import _floor

    a, b = torch.randn(16, 8, requires_grad=True), torch.randn(8, 4)
    bias = torch.randn(4)

    def step():
        torch.addmm(bias, a, b).relu().sum().backward()

    floor, n = _floor(step)
    floor()
    assert n == 2  # the forward addmm and the backward mm for a's gradient (b takes none)
