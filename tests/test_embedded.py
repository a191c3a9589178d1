"""Embedded default models and data: recorded accuracies, API, bad input."""

import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import isvit_viz as iv
from isvit_viz import _assets
from isvit_viz._assets import ASSETS_DIR, AssetError

METRICS = json.loads((ASSETS_DIR / "embedded_metrics.json").read_text())


@pytest.mark.parametrize("name,target", [("vit", 0.88), ("swin", 0.86)])
def test_recorded_accuracy_exact(name, target):
    model, splits = iv.load_embedded(name)
    res = iv.evaluate(model, splits.test(), progress=False)
    assert res["n"] == 10_000
    assert res["top1"] == METRICS[name]["top1"]  # exact: the number written in MODEL_CARD.md
    assert res["top5"] == METRICS[name]["top5"]
    assert res["top1"] >= target
    card = (ASSETS_DIR / "MODEL_CARD.md").read_text()
    assert f"Test top-1: {METRICS[name]['top1']:.4f}" in card


def test_model_state_and_attention_regime():
    model, splits = iv.load_embedded("vit")
    assert not model.training
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    # trained attention is peaked: far above the uniform 1/50 row maximum
    assert min(METRICS["vit"]["attention"]["row_max_mean"]) > 2 / 50


def test_splits_loaders():
    _, splits = iv.load_embedded("vit")
    x, y = next(iter(splits.calib(100, seed=3)))
    assert x.shape == (100, 1, 28, 28) and y.shape == (100,)
    a, _ = splits.calib_tensors(64, seed=0)
    b, _ = splits.calib_tensors(64, seed=0)
    c, _ = splits.calib_tensors(64, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sum(len(yb) for _, yb in splits.test()) == 10_000
    assert sum(len(yb) for _, yb in splits.test(300)) == 300
    with pytest.raises(ValueError, match=r"\[1, 2048\]"):
        splits.calib(5000)


def test_assets_within_budget():
    total = sum(p.stat().st_size for p in ASSETS_DIR.iterdir() if p.is_file())
    assert total <= 25 * 1024 * 1024


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"valid choices: \['swin', 'vit'\]"):
        iv.load_embedded("nope")


def test_missing_and_corrupted_assets(tmp_path, monkeypatch):
    for f in ASSETS_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setattr(_assets, "ASSETS_DIR", tmp_path)
    monkeypatch.setattr(_assets, "MANIFEST", tmp_path / "MANIFEST.json")
    (tmp_path / "embedded_vit.safetensors").unlink()
    with pytest.raises(AssetError, match="embedded_vit.safetensors"):
        iv.load_embedded("vit")
    data = bytearray((ASSETS_DIR / "embedded_swin.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "embedded_swin.safetensors").write_bytes(bytes(data))
    with pytest.raises(AssetError, match="embedded_swin.safetensors"):
        iv.load_embedded("swin")
    (tmp_path / "fashion_mnist_test.npz").write_bytes(b"not a zip")
    monkeypatch.setattr(_assets, "MANIFEST", tmp_path / "absent.json")  # skip checksums: the reader must fail
    from isvit_viz.data import EmbeddedSplits

    with pytest.raises(AssetError, match="fashion_mnist_test.npz"):
        EmbeddedSplits().test()


def test_evaluate_empty_loader():
    model, _ = iv.load_embedded("vit")
    empty = DataLoader(TensorDataset(torch.empty(0, 1, 28, 28), torch.empty(0, dtype=torch.long)), batch_size=8)
    with pytest.raises(ValueError, match="empty"):
        iv.evaluate(model, empty)


def test_evaluate_top5_and_progress_bar(capsys):
    model, splits = iv.load_embedded("swin")
    res = iv.evaluate(model, splits.test(256), progress=True)
    assert 0 <= res["top1"] <= res["top5"] <= 1 and res["n"] == 256
    assert "eval" in capsys.readouterr().err  # tqdm writes to stderr


def test_compare_to_fp_metrics_exact():
    import math

    from torch import nn

    from isvit_viz.evaluate import compare_to_fp, predict_logits

    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    fp, q = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        fp.weight.copy_(torch.eye(2))
        q.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swaps the two logits
    loader = [(x[:2], y[:2]), (x[2:], y[2:])]
    got = compare_to_fp(fp, q, loader, progress=False)

    def kl(a, b):  # KL(softmax(a) || softmax(b)) for 2 classes, by hand
        pa = [math.exp(v) / (math.exp(a[0]) + math.exp(a[1])) for v in a]
        pb = [math.exp(v) / (math.exp(b[0]) + math.exp(b[1])) for v in b]
        return sum(p * math.log(p / r) for p, r in zip(pa, pb))

    rows = x.tolist()
    assert got["fp_top1"] == 0.75 and got["q_top1"] == 0.25 and got["agree_top1"] == 0.0 and got["n"] == 4
    assert got["kl_to_fp"] == pytest.approx(sum(kl(r, r[::-1]) for r in rows) / 4, rel=1e-12)
    again = compare_to_fp(fp, q, loader, progress=False, fp_outputs=predict_logits(fp, loader, progress=False))
    assert again == got


def test_run_grid_draws_each_seeds_calibration_set():
    from isvit_viz.experiments import run_grid

    model, splits = iv.load_embedded("vit")
    drawn: dict[int, torch.Tensor] = {}

    def calib(seed):
        drawn[seed] = splits.calib_tensors(64, seed=seed)[0]
        return drawn[seed]

    recs = run_grid(model, calib, splits.test(128), ["minmax"], [(4, 4)], seeds=[0, 1])
    assert [r["seed"] for r in recs] == [0, 1] and sorted(drawn) == [0, 1]
    assert all(r["calib_images"] == 64 for r in recs)
    assert torch.equal(drawn[0], splits.calib_tensors(64)[0])  # seed 0 is the default set
    assert not torch.equal(drawn[0], drawn[1])
    # a fixed tensor is shared by all seeds; min/max calibration is deterministic, so equal results
    fixed = run_grid(model, drawn[0], splits.test(128), ["minmax"], [(4, 4)], seeds=[0, 5])
    keys = ("q_top1", "agree_top1", "kl_to_fp")
    assert [fixed[0][k] for k in keys] == [fixed[1][k] for k in keys] == [recs[0][k] for k in keys]
