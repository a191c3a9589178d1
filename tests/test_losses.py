"""Pluggable reconstruction losses (issue #17): each against a hand computation on tiny tensors."""

import math

import pytest
import torch
from torch import nn

from isvit_viz.calib.losses import (
    LOSSES,
    APHQLoss,
    FisherDPLRLoss,
    KLHeadLoss,
    LossState,
    LpLoss,
    MSELoss,
    kl_task_loss,
    make_loss,
    output_grads,
)
from isvit_viz.calib.recon import recon_loss


def _pair(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randn(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------- Lp / MSE


@pytest.mark.parametrize("shape", [(4, 5, 6), (3, 2, 4, 5)])
@pytest.mark.parametrize("tokens_last", [False, True])
@pytest.mark.parametrize("p", [2.0, 2.4])
def test_lp_is_bit_equal_to_recon_loss(shape, tokens_last, p):
    pred, target = _pair(*shape)
    got = LpLoss(p)(pred, target, LossState(tokens_last=tokens_last))
    assert torch.equal(got, recon_loss(pred, target, tokens_last, p))
    if p == 2.0:
        assert torch.equal(MSELoss()(pred, target, LossState(tokens_last=tokens_last)), got)


def test_lp_nhwc_sums_over_tokens():
    pred, target = _pair(2, 3, 4, 5)
    err = (pred - target).pow(2)
    by_hand = sum(err[b].sum((0, 1)).sum() / 5 for b in range(2)) / 2  # sum over H*W, mean over B and C
    assert torch.allclose(LpLoss()(pred, target, LossState(tokens_last=True)), by_hand)
    assert torch.allclose(LpLoss()(pred, target), err.sum(1).mean())  # NCHW-style: sum over dim 1


# ---------------------------------------------------------------- BRECQ Fisher diagonal


@pytest.mark.parametrize("tokens_last", [False, True])
def test_fisher_diag_against_hand_computation(tokens_last):
    pred, target = _pair(3, 2, 2, 4)
    g = torch.randn(3, 2, 2, 4, generator=torch.Generator().manual_seed(1))
    loss = make_loss("fisher_diag")
    assert loss.needs_grads and loss.per_sample and loss.grad_shifts == (0.0,)
    rows = loss.prepare_grads([g])
    assert torch.equal(rows, g.abs() / 32 + 1.0)  # BRECQ save_grad_data: |g| + 1, batchmean over 32
    got = loss(pred, target, LossState(grad=rows, tokens_last=tokens_last))
    total = 0.0
    for b in range(3):
        per = [[0.0] * 4 for _ in range(2)] if not tokens_last else [0.0] * 4
        for h in range(2):
            for w in range(2):
                for c in range(4):
                    v = float((pred[b, h, w, c] - target[b, h, w, c]) ** 2 * (abs(float(g[b, h, w, c])) / 32 + 1) ** 2)
                    if tokens_last:
                        per[c] += v  # sum over the 4 tokens (h, w)
                    else:
                        per[w][c] += v  # sum over dim 1 (h)
        flat = per if tokens_last else [x for row in per for x in row]
        total += sum(flat) / len(flat)
    assert math.isclose(float(got), total / 3, rel_tol=1e-5)


# ---------------------------------------------------------------- APHQ-ViT perturbation Hessian


def _tail(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(1), nn.Linear(3 * 4, 6), nn.GELU(), nn.Linear(6, 5)).double()


def test_aphq_finite_difference_matches_hessian_vector_product():
    tail = _tail()
    z = torch.randn(4, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    teacher = tail(z).detach()
    loss = APHQLoss()
    assert loss.grad_shifts == (1e-6, -1e-6) and loss.temperature == 20.0 and loss.grad_model == "fp"
    gp, gm = (output_grads(tail, z, teacher, loss.temperature, s) for s in loss.grad_shifts)
    # autograd: H_n 1 for every sample n (samples are independent, so one HVP gives every row)
    zz = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kl_task_loss(tail(zz), teacher, 20.0), zz, create_graph=True)
    (hv,) = torch.autograd.grad(g.sum(), zz)
    assert g.abs().max() < 1e-12  # FP point: the KL gradient vanishes
    fd = APHQLoss.hessian_rows(gp, gm) / (2 * loss.eps)
    assert torch.allclose(fd, hv.abs(), rtol=1e-5, atol=1e-9 * float(hv.abs().max()))
    assert float(hv.abs().max()) > 0


def test_aphq_loss_weight_and_first_value_normalisation():
    tail = _tail(1)
    z = torch.randn(6, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    teacher = tail(z).detach()
    loss = make_loss("hessian_perturb")
    loss.start(10)
    rows = []
    for sl in (slice(0, 4), slice(4, 6)):  # chunked as the engine would
        gs = [output_grads(tail, z[sl], teacher[sl], loss.temperature, s) for s in loss.grad_shifts]
        rows.append(APHQLoss.hessian_rows(*gs))
        assert loss.prepare_grads(gs) is None
    w = torch.cat(rows).mean(0, keepdim=True)
    assert torch.allclose(loss.weight, w)
    p1, t1 = _pair(2, 3, 4, seed=4, dtype=torch.float64)
    p2, t2 = _pair(2, 3, 4, seed=5, dtype=torch.float64)
    raw1, raw2 = ((p1 - t1) ** 2 * w).mean(), ((p2 - t2) ** 2 * w).mean()
    assert torch.allclose(loss(p1, t1), torch.tensor(2.0, dtype=torch.float64))  # 2 * first / first
    assert torch.allclose(loss(p2, t2), 2 * raw2 / raw1)
    assert torch.allclose(loss.raw(p2, t2), raw2)
    # per-sample variant (use_mean_hessian=False): rows come back for the engine's cache
    ps = APHQLoss(average=False, norm=None)
    ps.start(10)
    gs = [output_grads(tail, z[:2], teacher[:2], ps.temperature, s) for s in ps.grad_shifts]
    r = ps.prepare_grads(gs)
    assert ps.per_sample and r.shape == (2, 3, 4)
    assert torch.allclose(ps(p1, t1, LossState(grad=r)), ((p1 - t1) ** 2 * r).mean())


# ---------------------------------------------------------------- FIMA-Q DPLR Fisher


def test_dplr_terms_against_explicit_matrix_product():
    gen = torch.Generator().manual_seed(6)
    G, D = torch.rand(3, 12, generator=gen, dtype=torch.float64), torch.rand(3, 12, generator=gen, dtype=torch.float64)
    loss = FisherDPLRLoss(k=3, p1=0.7, p2=1.3)
    loss.start(9)
    for r in range(3):
        loss.update(G[r], D[r])
    pred, target = _pair(4, 3, 4, seed=7, dtype=torch.float64)
    e = (pred - target).abs().reshape(4, 12)
    F_lr = G.T @ torch.linalg.inv(D @ D.T) @ G  # [12, 12]
    l1 = sum(e[b] @ F_lr @ e[b] for b in range(4)) / 4
    l2 = sum(float(e[b, i] ** 2 * G[:, i].mean()) for b in range(4) for i in range(12)) / 48
    got1, got2 = loss.terms(pred, target)
    assert torch.allclose(got1, l1) and math.isclose(float(got2), l2, rel_tol=1e-12)
    assert math.isclose(float(loss(pred, target)), 0.7 + 1.3, rel_tol=1e-12)  # normalised by first values
    p2_, t2_ = _pair(4, 3, 4, seed=8, dtype=torch.float64)
    n1, n2 = loss.terms(p2_, t2_)
    assert torch.allclose(loss(p2_, t2_), 0.7 * n1 / got1 + 1.3 * n2 / got2)
    # a refresh resets the normalisers: the next call is p1 + p2 again
    loss.update(torch.rand(12, generator=gen, dtype=torch.float64), torch.rand(12, generator=gen, dtype=torch.float64))
    assert loss.G.shape == (4, 12)
    assert math.isclose(float(loss(p2_, t2_)), 2.0, rel_tol=1e-12)


def test_dplr_rows_are_mean_abs():
    g, q, f = _pair(5, 2, 3, seed=9) + (torch.randn(5, 2, 3),)
    gr, dr = FisherDPLRLoss.rows(g, q, f)
    assert torch.allclose(gr, g.abs().reshape(5, 6).mean(0)) and torch.allclose(dr, (q - f).abs().reshape(5, 6).mean(0))


@pytest.mark.parametrize(
    ("iters", "k", "mode", "expected"),
    [
        (20000, 5, "q", [0, 4000, 8000, 12000, 16000]),  # FIMA-Q configs: k = 5, dis_mode 'q'
        (20, 5, "q", [0, 4, 8, 12, 16]),
        (10, 3, "q", [0, 3, 6, 9]),  # k does not divide iters: one extra refresh, as their code
        (10, 3, "qf", [0, 1, 2]),
        (5, 5, "q", [0, 1, 2, 3, 4]),
    ],
)
def test_refresh_happens_at_scheduled_iterations(iters, k, mode, expected):
    loss = make_loss("fisher_dplr", k=k, mode=mode)
    loss.start(iters)
    assert loss.schedule() == expected
    if iters > 100:
        return
    gen = torch.Generator().manual_seed(0)
    refreshed, values = [], []
    pred = torch.randn(2, 6, generator=gen)
    for it in range(iters):  # the engine's loop
        if loss.refresh(it):
            loss.update(torch.rand(6, generator=gen), torch.rand(6, generator=gen))
            refreshed.append(it)
        values.append(float(loss(pred, torch.zeros(2, 6))))
        assert loss.G.shape[0] == len(refreshed)
    assert refreshed == expected
    for it in expected:
        assert math.isclose(values[it], 2.0, rel_tol=1e-6)  # normalisers reset at each refresh
    loss.start(iters)  # a new unit forgets the rows
    assert loss.G is None


# ---------------------------------------------------------------- KL head


def test_kl_head_against_hand_computation():
    pred, target = _pair(3, 7, seed=10)
    for t in (1.0, 2.0):
        p = torch.softmax(target / t, -1)
        q = torch.softmax(pred / t, -1)
        by_hand = (p * (p.log() - q.log())).sum() / 3
        assert torch.allclose(KLHeadLoss(temperature=t)(pred, target), by_hand, atol=1e-6)
    normed = KLHeadLoss(norm=2.0)
    normed.start(5)
    assert math.isclose(float(normed(pred, target)), 2.0, rel_tol=1e-6)
    assert torch.allclose(kl_task_loss(pred, target), 3 * KLHeadLoss()(pred, target))


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("name", "kw", "needle"),
    [
        ("nope", {}, "'nope'"),
        ("lp", {"p": -1.0}, "-1.0"),
        ("lp", {"p": float("nan")}, "nan"),
        ("lp", {"q": 2}, "'q'"),
        ("fisher_diag", {"damping": -0.5}, "-0.5"),
        ("hessian_perturb", {"eps": 0.0}, "got 0.0"),
        ("hessian_perturb", {"average": "yes"}, "'yes'"),
        ("fisher_dplr", {"k": 0}, "got 0"),
        ("fisher_dplr", {"k": 2.5}, "2.5"),
        ("fisher_dplr", {"mode": "qq"}, "'qq'"),
        ("fisher_dplr", {"p1": -0.1}, "-0.1"),
        ("fisher_dplr", {"p1": 0.0, "p2": 0.0}, "p1=0.0"),
        ("kl_div", {"temperature": 0}, "got 0"),
        ("kl_div", {"norm": -2.0}, "-2.0"),
    ],
)
def test_bad_values_raise_value_error_naming_them(name, kw, needle):
    with pytest.raises(ValueError) as info:
        make_loss(name, **kw)
    assert needle in str(info.value)


def test_bad_schedules_raise():
    loss = FisherDPLRLoss(k=5)
    with pytest.raises(ValueError, match="k=5"):
        loss.start(4)
    with pytest.raises(ValueError, match="iters"):
        loss.start(0)
    loss.start(10)
    for it in (-1, 10):
        with pytest.raises(ValueError, match=str(it)):
            loss.refresh(it)
    with pytest.raises(ValueError, match="singular"):
        loss.update(torch.ones(4), torch.zeros(4))
    assert loss.G is None  # nothing appended after the error
    loss.update(torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match="singular"):
        loss.update(torch.ones(4), 2 * torch.ones(4))  # linearly dependent d rows
    assert loss.G.shape == (1, 4)


def test_registry_names():
    assert set(LOSSES) == {"mse", "lp", "fisher_diag", "hessian_perturb", "fisher_dplr", "kl_div"}
    assert all(cls.name == key for key, cls in LOSSES.items())


# ---------------------------------------------------------------- end to end on a tiny unit


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_gives_finite_scalar_with_gradient(name):
    torch.manual_seed(0)
    unit, tail = nn.Linear(4, 4), nn.Sequential(nn.Flatten(1), nn.Linear(3 * 4, 5))
    teacher_unit = nn.Linear(4, 4)
    x = torch.randn(8, 3, 4)
    with torch.no_grad():
        z = teacher_unit(x)
        logits = tail(z)
    loss = make_loss(name)
    loss.start(10)
    cache = None
    if loss.needs_grads:  # grads at the "quantized" unit's output (BRECQ) or the FP one (APHQ)
        at = z if loss.grad_model == "fp" else unit(x).detach()
        cache = loss.prepare_grads([output_grads(tail, at, logits, loss.temperature, s) for s in loss.grad_shifts])
    idx = torch.tensor([1, 4, 6])
    if loss.refresh(0):
        q = unit(x).detach()
        loss.update(*FisherDPLRLoss.rows(output_grads(tail, q, logits, loss.temperature), q, z))
    pred = unit(x[idx])
    target = logits[idx] if name == "kl_div" else z[idx]
    if name == "kl_div":
        pred = tail(pred)
    state = LossState(grad=None if cache is None else cache[idx], idx=idx, tokens_last=False)
    out = loss(pred, target, state)
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()
    assert unit.weight.grad is not None and torch.isfinite(unit.weight.grad).all() and unit.weight.grad.abs().sum() > 0
