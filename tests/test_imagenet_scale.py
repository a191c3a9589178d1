"""ImageNet scale on a synthetic ImageFolder: stratified subsets, timm preprocessing, local weights, streaming
evaluation, the CLI end to end, safe resumable checkpoints and bad input."""

import hashlib
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from isvit_viz.cli import main
from isvit_viz.data import imagefolder_dataset, imagefolder_loader, preprocessing_config, preprocessing_differences
from isvit_viz.data.imagenet import stratified_indices
from isvit_viz.evaluate import compare_to_fp, evaluate, predict_logits

N_CLASSES, PER_CLASS, BIG = 1000, 2, 5  # val: 1000 classes x 2 small JPEGs, plus one 224-px JPEG in classes 0..4
MODEL = "deit_tiny_patch16_224"


def _write_tree(root: Path, rng: np.random.Generator, big: int) -> None:
    for c in range(N_CLASSES):
        d = root / f"n{c:05d}"
        d.mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.JPEG", quality=80)
        if c < big:
            Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(d / "big.JPEG", quality=80)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """``root/train`` (2000 JPEGs) and ``root/val`` (2005 JPEGs), 1000 classes."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    _write_tree(root / "train", rng, big=0)
    _write_tree(root / "val", rng, big=BIG)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A random-init deit_tiny saved as .safetensors (stands in for a downloaded checkpoint)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "deit_tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return path, model


def _class_counts(ds) -> np.ndarray:
    targets = np.asarray(ds.dataset.targets)[ds.indices]
    return np.bincount(targets, minlength=N_CLASSES)


# --- fair subsets -------------------------------------------------------------------------------------


def test_stratified_indices_by_hand():
    t = [0, 0, 0, 1, 1, 2, 2, 2]  # class sizes 3, 2, 3
    for seed in range(5):
        idx = stratified_indices(t, 5, seed)  # 5 = 1 per class + 2 extra, given to 2 of the 3 classes
        counts = np.bincount(np.asarray(t)[idx], minlength=3)
        assert idx == sorted(set(idx)) and sorted(counts.tolist()) == [1, 2, 2]
        assert stratified_indices(t, 5, seed) == idx  # seeded
    for seed in range(5):  # 7 = 2 per class + 1 extra, which only classes 0 and 2 can give
        counts = np.bincount(np.asarray(t)[stratified_indices(t, 7, seed)], minlength=3)
        assert counts[1] == 2 and sorted(counts.tolist()) == [2, 2, 3]
    assert len({tuple(stratified_indices(t, 3, s)) for s in range(10)}) > 1  # the draw depends on the seed
    with pytest.raises(ValueError, match="class 1 has 1 images, fewer than the 2 per class"):
        stratified_indices([0, 0, 0, 1, 2, 2, 2], 6, 0)
    with pytest.raises(ValueError, match="needs 2 classes with more than 2 images, only 1 have"):
        stratified_indices([0, 0, 0, 0, 1, 1, 2, 2], 8, 0)


@pytest.mark.parametrize("n", [16, 1000, 1005, 2000])
def test_stratified_subset_counts_are_exact(imagenet, n):
    ds = imagefolder_dataset(imagenet / "val", MODEL, n=n, seed=3)
    counts = _class_counts(ds)
    share, extra = divmod(n, N_CLASSES)
    assert len(ds) == n and ds.indices == sorted(set(ds.indices))
    assert (counts == share + 1).sum() == extra and (counts == share).sum() == N_CLASSES - extra
    assert ds.classes[0] == "n00000" and len(ds.classes) == N_CLASSES
    if n < 2000:
        assert imagefolder_dataset(imagenet / "val", MODEL, n=n, seed=4).indices != ds.indices


def test_stratified_remainder_goes_to_classes_with_spare_images(imagenet):
    counts = _class_counts(imagefolder_dataset(imagenet / "val", MODEL, n=2003, seed=0))  # 2 each + 3 of classes 0..4
    assert (counts[:BIG] == 3).sum() == 3 and (counts[BIG:] == 2).all()


def test_calibration_keeps_the_official_random_rule(imagenet):
    ds = imagefolder_dataset(imagenet / "train", MODEL, n=8, seed=0, sampling="random")
    assert ds.indices == torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:8].tolist()
    legacy = imagefolder_loader(imagenet / "train", MODEL, n=8, shuffle_seed=0)  # the old keyword keeps its meaning
    assert legacy.dataset.indices == ds.indices


def test_imagenet_data_draws_calibration_and_a_stratified_val(imagenet, weights, tmp_path):
    import timm

    from isvit_viz.data import calibration_images, imagenet_data

    model = weights[1]
    calib, loader = imagenet_data(imagenet, model, n_calib=6, n_test=1003, seed=2, num_workers=0)
    assert torch.equal(calib, calibration_images(imagenet / "train", model, 6, seed=2))  # the official random rule
    assert loader.dataset.indices == imagefolder_dataset(imagenet / "val", model, n=1003, seed=2).indices
    mismatch = tmp_path / "mismatch"
    for split, classes in (("train", ("a", "b")), ("val", ("a", "c"))):
        for c in classes:
            (mismatch / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(mismatch / split / c / "0.JPEG")
    with pytest.raises(ValueError, match="train/ and val/ have different class folders"):
        imagenet_data(mismatch, timm.create_model(MODEL, num_classes=2), n_calib=1, num_workers=0)
    with pytest.raises(FileNotFoundError, match="missing folder"):
        imagenet_data(tmp_path / "nowhere", model, num_workers=0)


# --- preprocessing ------------------------------------------------------------------------------------

#: Per paper model: where the official evaluation settings (method.md 3.1) differ from timm's pretrained
#: data config, as {key: (official, timm)}. Only DeiT differs: crop_pct 0.875 (resize 256) vs timm's 0.9 (248).
TIMM_VS_OFFICIAL = {
    "vit_small_patch16_224": {},
    "vit_base_patch16_224": {},
    "deit_tiny_patch16_224": {"crop_pct": (0.875, 0.9)},
    "deit_small_patch16_224": {"crop_pct": (0.875, 0.9)},
    "deit_base_patch16_224": {"crop_pct": (0.875, 0.9)},
    "swin_small_patch4_window7_224": {},
    "swin_base_patch4_window7_224": {},
}


@pytest.mark.parametrize("name", sorted(TIMM_VS_OFFICIAL))
def test_paper_models_official_vs_timm_preprocessing(name):
    assert preprocessing_differences(name) == TIMM_VS_OFFICIAL[name]
    cfg = preprocessing_config(name)
    assert cfg["source"] == "official" and cfg["interpolation"] == "bicubic" and cfg["input_size"] == (3, 224, 224)


def test_transform_is_the_official_one_bit_for_bit():
    from torchvision import transforms as T

    from isvit_viz.data import build_transform

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    official = {  # utils/build_dataset.py of the official code
        "deit_small_patch16_224": T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                                             T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]),
        "vit_base_patch16_224": T.Compose([T.Resize(248, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                                           T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]),
    }  # fmt: skip
    for name, ref in official.items():
        assert torch.equal(build_transform(name)(img), ref(img))


def test_other_timm_models_get_timm_config():
    import timm
    from timm.data import resolve_model_data_config

    m = timm.create_model("deit3_small_patch16_224", pretrained=False, depth=1)
    cfg = preprocessing_config(m)
    assert cfg.pop("source") == "timm" and cfg == resolve_model_data_config(m)
    assert preprocessing_config("deit3_small_patch16_224")["crop_pct"] == 0.9
    with pytest.raises(ValueError, match="not_a_model"):
        preprocessing_config("not_a_model")


# --- local weights ------------------------------------------------------------------------------------


def test_weights_files_load_through_timm(weights, tmp_path):
    from isvit_viz.models import create

    path, ref = weights
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "w.pth")
    torch.save({"model": sd}, tmp_path / "w.bin")  # a training checkpoint: timm picks its "model" entry
    for f in (path, tmp_path / "w.pth", tmp_path / "w.bin"):
        m = create(MODEL, weights=f)
        assert all(torch.equal(a, sd[k]) for k, a in m.state_dict().items())
        assert m.isvit_weights["weights_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        assert m.isvit_weights["timm_pretrained_tag"] == "fb_in1k"
    bad = dict(sd)
    bad["blocks.3.mlp.fc1.weight"] = torch.zeros(10, 192)
    del bad["blocks.5.norm1.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad.pth .*first mismatched key 'blocks.3.mlp.fc1.weight': shape \(10, 192\) "
                                         r"in the file, \(768, 192\) in the model \(1 more"):  # fmt: skip
        create(MODEL, weights=tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unknown model 'not_a_model'"):
        create("not_a_model")


def test_augreg_vit_loads_a_safetensors_file(tmp_path):
    # timm's default vit_small config loads big_vision .npz files with a custom loader; a .safetensors
    # file must go through the ordinary state-dict path instead.
    import timm
    from safetensors.torch import save_file

    from isvit_viz.models import create

    src = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1)
    save_file(src.state_dict(), str(tmp_path / "v.safetensors"))
    m = create("vit_small_patch16_224", weights=tmp_path / "v.safetensors", depth=1)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values()))


# --- streaming ----------------------------------------------------------------------------------------


class OnceLoader:
    """Yields fresh batches; may be iterated ``passes`` times in all; records the most batches alive at once."""

    def __init__(self, batches: int, passes: int, shape=(8, 3, 8, 8), classes: int = 5) -> None:
        self.batches, self.passes, self.shape, self.classes = batches, passes, shape, classes
        self.iterations, self.max_alive, self._refs = 0, 0, []

    def __iter__(self):
        self.iterations += 1
        if self.iterations > self.passes:
            raise AssertionError(f"loader iterated {self.iterations} times, allowed {self.passes}")
        for i in range(self.batches):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(*self.shape, generator=g)
            y = torch.randint(0, self.classes, (self.shape[0],), generator=g)
            self._refs.append(weakref.ref(x))
            self.max_alive = max(self.max_alive, sum(r() is not None for r in self._refs))
            yield x, y


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Flatten(), nn.Linear(192, 5))
    q = nn.Sequential(nn.Flatten(), nn.Linear(192, 5))
    with torch.no_grad():
        q[1].weight.copy_(fp[1].weight + 0.05 * torch.randn_like(fp[1].weight))
        q[1].bias.copy_(fp[1].bias)
    return fp, q


def test_compare_to_fp_streams_the_loader():
    fp, q = _pair()
    loader = OnceLoader(batches=12, passes=1)
    got = compare_to_fp(fp, q, loader, progress=False)
    # one batch in use plus at most the previous one not yet released: never the whole loader (12)
    assert loader.iterations == 1 and loader.max_alive <= 2
    assert got == compare_to_fp(fp, q, list(OnceLoader(12, 1)), progress=False)  # lists of batches still work
    assert got["n"] == 96
    fp_out = predict_logits(fp, OnceLoader(12, 1), progress=False)
    again = OnceLoader(12, passes=1)
    assert compare_to_fp(fp, q, again, progress=False, fp_outputs=fp_out) == got and again.max_alive <= 2
    with pytest.raises(ValueError, match="other labels"):
        compare_to_fp(fp, q, OnceLoader(11, 1), progress=False, fp_outputs=fp_out)


def test_autocast_dtype_for_the_fp_reference():
    fp, q = _pair()
    batches = list(OnceLoader(3, 1))
    ref, _ = predict_logits(fp, batches, progress=False)
    bf16, _ = predict_logits(fp, batches, progress=False, dtype="bfloat16")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, ref) and torch.allclose(bf16, ref, atol=0.05)
    assert (
        compare_to_fp(fp, q, batches, progress=False, fp_dtype="bfloat16")["q_top1"]
        == compare_to_fp(fp, q, batches, progress=False)["q_top1"]
    )  # the quantized model always runs in float32
    with pytest.raises(ValueError, match="float64"):
        predict_logits(fp, batches, progress=False, dtype="float64")


def test_run_grid_computes_fp_once_and_streams():
    from isvit_viz.experiments import run_grid
    from isvit_viz.models import build_from_spec

    torch.manual_seed(0)
    model = build_from_spec({"kind": "embedded", "name": "vit"})
    loader = OnceLoader(batches=6, passes=1 + 2, shape=(16, 1, 28, 28), classes=10)  # FP once + two runs
    recs = run_grid(model, torch.randn(64, 1, 28, 28), loader, ["minmax"], [(4, 4), (6, 6)])
    assert loader.iterations == 3 and loader.max_alive <= 2 and [r["n"] for r in recs] == [96, 96]


def test_evaluate_streams_with_workers_on_the_folder(imagenet, weights):
    from isvit_viz.models import create

    model = create(MODEL, weights=weights[0])
    loader = imagefolder_loader(imagenet / "val", model, n=16, batch_size=8, num_workers=1, seed=0)
    ev = evaluate(model, loader, progress=False)
    cmp = compare_to_fp(model, model, loader, progress=False)  # second pass over the persistent workers
    assert cmp["n"] == ev["n"] == 16 and cmp["fp_top1"] == cmp["q_top1"] == ev["top1"]
    assert cmp["agree_top1"] == 1.0 and cmp["kl_to_fp"] == 0.0


# --- CLI end to end and reruns ------------------------------------------------------------------------


def test_cli_quantize_on_imagefolder(imagenet, weights, tmp_path, capsys):
    path, _ = weights
    out = tmp_path / "run"
    argv = ["quantize", "--model", MODEL, "--weights", str(path), "--data", str(imagenet), "--iters", "1", "--calib", "8",
            "--batch-size", "8", "--test-images", "16", "--workers", "0", "--threads", "1", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["test_images"] == 16 and rec["test_subset"] == "stratified" and rec["calib_images"] == 8
    assert rec["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and rec["timm_pretrained_tag"] == "fb_in1k"
    assert rec["eval_dtype"] == "float32" and rec["device"] == "cpu" and (out / "checkpoint" / "COMPLETE").exists()
    # --overwrite discards the old run (checkpoint included) but no other file in the folder
    (out / "checkpoint" / "stale").write_text("x")
    (out / "notes.txt").write_text("mine")
    assert main([*argv[:1], "--method", "minmax", *argv[1:], "--overwrite"]) == 0
    assert not (out / "checkpoint" / "stale").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "results.json").read_text())["method"] == "minmax"
    capsys.readouterr()
    assert main(["evaluate", "--model", MODEL, "--weights", str(path), "--data", str(imagenet), "--n", "16", "--workers", "0",
                 "--quiet"]) == 0  # fmt: skip
    cap = capsys.readouterr()
    assert "72.21" in cap.out and "sha256=" in cap.out  # the paper's FP top-1 of DeiT-T beside the measurement
    assert "warning: measured FP top-1" in cap.err  # random weights: far from the paper


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isvit-viz: error:"), lines
    return lines[0]


def test_cli_bad_imagefolders_fail_before_calibration(imagenet, weights, tmp_path, monkeypatch, capsys):
    import isvit_viz

    monkeypatch.setattr(isvit_viz, "quantize", lambda *a, **k: pytest.fail("calibration started"))
    base = ["quantize", "--model", MODEL, "--weights", str(weights[0]), "--workers", "0", "--quiet", "--data"]
    assert main([*base, str(imagenet), "--calib", "5000"]) == 2
    assert "has 2000 images, fewer than the 5000 requested" in _err(capsys)
    assert main([*base, str(imagenet), "--test-images", "3000"]) == 2
    assert "has 2005 images, fewer than the 3000 requested" in _err(capsys)
    assert main([*base, str(imagenet), "--eval-dtype", "bfloat16"]) == 2
    assert "--device cuda" in _err(capsys)
    few = tmp_path / "few"
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (few / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(few / split / c / "0.JPEG")
    assert main([*base, str(few), "--calib", "2"]) == 2
    assert "has 3 class folders but the model's head has 1000 outputs" in _err(capsys)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    assert main([*base, str(empty)]) == 2
    assert "no images found under" in _err(capsys)
    nofiles = tmp_path / "nofiles"
    (nofiles / "train" / "a").mkdir(parents=True)
    (nofiles / "val" / "a").mkdir(parents=True)
    assert main([*base, str(nofiles)]) == 2
    assert "no images found under" in _err(capsys)


def test_checkpoint_is_safe_and_versioned(tmp_path, monkeypatch):
    import isvit_viz
    import isvit_viz as iv
    from isvit_viz.models import build_from_spec

    def run(ckpt):
        torch.manual_seed(0)
        m = build_from_spec({"kind": "embedded", "name": "vit"})
        x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        return iv.quantize(m, "minmax", 4, 4, x, progress=False, checkpoint_dir=ckpt)  # writes a checkpoint after calibration

    run(tmp_path)
    state = torch.load(tmp_path / "progress.pt", weights_only=True)  # tensors and one JSON string only
    meta = json.loads(state["meta"])
    assert meta["config"]["isvit_viz_version"] == isvit_viz.__version__
    monkeypatch.setattr(isvit_viz, "__version__", "9.9.9")
    with pytest.raises(ValueError, match=r"written by isvit_viz .* this is 9\.9\.9"):
        run(tmp_path)
    monkeypatch.undo()
    torch.save({"config": {}, "payload": Path("x")}, tmp_path / "progress.pt")  # a pickle with an arbitrary object
    with pytest.raises(ValueError, match="cannot be read safely"):
        run(tmp_path)
