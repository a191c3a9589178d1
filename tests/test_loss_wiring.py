"""The pluggable losses inside the engine (issue #17 item 1): the task-loss gradients the engine feeds
them are those of the network after the unit, the Fisher refresh runs at its scheduled steps through a
real reconstruction, the head gets its own loss, and a stage list with a bad loss fails up front."""

from __future__ import annotations

import copy

import pytest
import torch

import isvit_viz as iv
from isvit_viz.calib import Calibrate, Loss, Method, Reconstruct, engine, pipeline
from isvit_viz.calib.losses import LOSSES, FisherDPLRLoss, KLHeadLoss, LpLoss, output_grads
from isvit_viz.calib.task_grads import model_logits, unit_output_grads
from isvit_viz.models import load_embedded

KW = dict(iters=3, batch_size=8, seed=0, progress=False)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vit():
    model, splits = load_embedded("vit")
    calib, _ = splits.calib_tensors(16, seed=0)
    return model.eval(), calib


def _tail(model, i):
    """The ViT after block ``i``, written out by hand (what the engine's hook must reproduce)."""
    return lambda z: model.forward_head(model.norm(model.blocks[i + 1 :](z)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hook_gradients_equal_the_explicit_tail(vit, dtype):
    model, calib = vit
    model = copy.deepcopy(model).to(dtype)
    logits = model_logits(model, calib, CPU)
    z = []
    h = model.blocks[1].register_forward_hook(lambda _m, _i, o: z.append(o.detach()))
    with torch.no_grad():
        model(calib.to(dtype))
    h.remove()
    shifts = (1e-3, -1e-3)
    chunks = list(unit_output_grads(model, model.blocks[1], calib, logits, CPU, temperature=20.0, shifts=shifts, batch_size=5))
    assert [c.start for c in chunks] == [0, 5, 10, 15]  # in sample order, last chunk short
    for k, shift in enumerate(shifts):
        got = torch.cat([c.grads[k] for c in chunks])
        want = output_grads(_tail(model, 1), z[0], logits, 20.0, shift)
        assert got.dtype == dtype and torch.allclose(got, want, rtol=1e-4, atol=1e-9 if dtype == torch.float64 else 1e-7)
    assert torch.allclose(torch.cat([c.fp_out for c in chunks]), z[0], rtol=1e-5, atol=1e-6)  # chunked: BLAS blocking differs


def test_override_replaces_the_unit_output(vit):
    model, calib = vit
    logits = model_logits(model, calib, CPU)
    z = torch.randn(len(calib), *model.blocks[0](model._pos_embed(model.patch_embed(calib[:1]))).shape[1:])
    chunks = list(unit_output_grads(model, model.blocks[2], calib, logits, CPU,
                                    override=lambda s, _a, out: z[s : s + len(out)], batch_size=6))  # fmt: skip
    got = torch.cat([c.grads[0] for c in chunks])
    assert torch.equal(torch.cat([c.z for c in chunks]), z)
    assert torch.allclose(got, output_grads(_tail(model, 2), z, logits), rtol=1e-4, atol=1e-7)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # teacher untouched


class _Recording(FisherDPLRLoss):
    """FIMA-Q's loss that records the step of every refresh and every call."""

    name = "recording_dplr"
    log: list = []

    def update(self, g_row, d_row):
        _Recording.log.append(("update", g_row.shape, float(d_row.sum())))
        super().update(g_row, d_row)

    def __call__(self, pred, target, state=None):
        _Recording.log.append(("call", tuple(pred.shape)))
        return super().__call__(pred, target, state)


def test_fisher_refresh_runs_at_the_scheduled_steps_of_a_real_reconstruction(vit, monkeypatch):
    model, calib = vit
    monkeypatch.setitem(LOSSES, "recording_dplr", _Recording)
    _Recording.log = []
    m = Method(name="dplr", softmax="uniform", stages=(
        Calibrate(weights="calibrate"), Reconstruct(name="fit", loss=Loss("recording_dplr", k=2), head_loss="kl_div")))  # fmt: skip
    res = iv.quantize(model, m, 4, 4, calib, **{**KW, "iters": 4})
    units = [u["unit"] for u in res.unit_losses]
    assert units == ["patch_embed.proj", *(f"blocks.{i}" for i in range(len(model.blocks))), "head"]
    # every unit but the head (kl_div): refresh before steps 0 and 2 (period floor(4 / 2) = 2), a loss call every step
    per_unit = [e[0] for e in _Recording.log]
    assert per_unit == (["update", "call", "call", "update", "call", "call"]) * (len(units) - 1)
    n_out = model.blocks[0].mlp.fc2.out_features * (model.patch_embed.num_patches + model.num_prefix_tokens)
    updates = [e for e in _Recording.log if e[0] == "update"]
    assert all(e[1] == (n_out,) for e in updates[2:])  # block rows: one entry per output element
    assert all(e[2] > 0 for e in updates)  # d row: the quantized unit differs from FP
    assert all(torch.isfinite(torch.tensor(u["rec_last"])) for u in res.unit_losses)


def test_head_gets_head_loss_and_lp_takes_loss_p(vit, monkeypatch):
    model, calib = vit
    used = []
    real = engine._unit_loss

    def spy(stage, ctx, name):
        loss = real(stage, ctx, name)
        used.append((name, type(loss), getattr(loss, "p", None)))
        return loss

    monkeypatch.setattr(engine, "_unit_loss", spy)
    m = Method(name="lp-kl", softmax="uniform", stages=(
        Calibrate(weights="calibrate"), Reconstruct(name="fit", loss="lp", loss_p=2.4, head_loss="kl_div")))  # fmt: skip
    iv.quantize(model, m, 4, 4, calib, **KW)
    assert used[-1] == ("head", KLHeadLoss, None)
    assert {(t, p) for n, t, p in used[:-1]} == {(LpLoss, 2.4)}


@pytest.mark.parametrize("loss", ["fisher_diag", Loss("hessian_perturb", grad_dtype="float32")])
def test_gradient_losses_reconstruct_and_lower_the_loss(vit, loss):
    model, calib = vit
    m = Method(name="g", softmax="uniform", stages=(Calibrate(weights="calibrate"), Reconstruct(name="fit", loss=loss, lr=1e-3)))
    res = iv.quantize(model, m, 3, 3, calib, **{**KW, "iters": 12})
    blocks = [u for u in res.unit_losses if u["unit"].startswith("blocks.")]
    assert all(u["rec_last"] < u["rec_first"] for u in blocks[:2])  # the loss falls on the early units
    with torch.no_grad():
        assert torch.isfinite(res.model(calib[:4])).all()


@pytest.mark.parametrize(
    ("stage", "needle"),
    [
        (Reconstruct(name="fit", loss="fisher"), r"stages\[1\] \(Reconstruct 'fit'\): loss: unknown loss 'fisher'"),
        (Reconstruct(name="fit", loss=Loss("fisher_dplr", k=0)), r"stages\[1\] \(Reconstruct 'fit'\): loss: k .* got 0"),
        (Reconstruct(name="fit", head_loss=Loss("kl_div", temperature=-1)), r"head_loss: temperature .* got -1"),
        (Reconstruct(name="fit", loss=Loss("lp", q=3)), r"loss: unknown setting\(s\) \['q'\]"),
        (Reconstruct(name="fit", loss="fisher_diag", loss_p=2.4), r"loss_p: .*2 unless loss='lp'"),
        (Reconstruct(name="fit", loss=3), r"loss: must be a loss name or Loss"),
    ],
)
def test_bad_losses_fail_before_any_work(stage, needle):
    with pytest.raises(ValueError, match=needle):
        Method(name="bad", softmax="uniform", stages=(Calibrate(weights="calibrate"), stage))


def test_loss_spec_is_data():
    spec = Loss("fisher_dplr", p2=0.5, k=3)
    assert spec == Loss("fisher_dplr", k=3, p2=0.5) and repr(spec) == "Loss('fisher_dplr', k=3, p2=0.5)"
    built = spec.build()
    assert isinstance(built, FisherDPLRLoss) and (built.k, built.p2) == (3, 0.5)


def test_a_budget_too_small_for_the_refresh_schedule_fails_before_any_work(vit, monkeypatch):
    model, calib = vit
    monkeypatch.setattr(pipeline, "run_stages", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match=r"Reconstruct 'reconstruct': loss: k=5 Fisher refreshes do not fit into iters=2 steps"):
        iv.quantize(model, "fima-q", 4, 4, calib, **{**KW, "iters": 2})
