"""Resumable calibration, disk-spilling caches, atomic outputs, bad input at public entry points."""

import pytest
import torch

import isvit_viz as iv
import isvit_viz.calib.engine as engine  # the stage engine calls reconstruct_unit
from isvit_viz.models import build_from_spec


def small():
    torch.manual_seed(0)
    return build_from_spec({"kind": "embedded", "name": "vit"})


@pytest.fixture(scope="module")
def images():
    return torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _run(images, **kw):
    return iv.quantize(small(), "isvit", 3, 3, images, iters=3, batch_size=32, seed=1, progress=False, **kw)


@pytest.mark.parametrize("interrupt_at", [3, 11])  # inside stage 1, inside stage 3
def test_interrupt_and_resume_gives_identical_model(images, tmp_path, monkeypatch, interrupt_at):
    ref = _run(images)
    real = engine.reconstruct_unit
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "reconstruct_unit", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(images, checkpoint_dir=tmp_path)
    assert (tmp_path / "progress.pt").exists() and not (tmp_path / "COMPLETE").exists()
    monkeypatch.setattr(engine, "reconstruct_unit", real)
    resumed = _run(images, checkpoint_dir=tmp_path)
    assert (tmp_path / "COMPLETE").exists()
    with torch.no_grad():
        assert torch.equal(resumed.model(images), ref.model(images))
    assert len(resumed.unit_losses) == len(ref.unit_losses)


def test_checkpoint_from_other_config_is_refused(images, tmp_path):
    _run(images, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different run configuration"):
        iv.quantize(small(), "isvit", 4, 4, images, iters=3, batch_size=32, seed=1, progress=False, checkpoint_dir=tmp_path)


def _record_cache_storage(monkeypatch) -> list[str]:
    """Patch TensorCache so every cache created appends its storage ("device"/"host"/"disk")."""
    from isvit_viz.calib import cache

    storages: list[str] = []
    orig = cache.TensorCache.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        storages.append(self.storage)

    monkeypatch.setattr(cache.TensorCache, "__init__", spy)
    return storages


def test_tiny_memory_budget_spills_to_disk_with_identical_results(images, monkeypatch):
    storages = _record_cache_storage(monkeypatch)
    ref = _run(images)
    assert storages and set(storages) == {"host"}
    storages.clear()
    disk = _run(images, memory_budget=0)
    assert storages and set(storages) == {"disk"}
    with torch.no_grad():
        assert torch.equal(disk.model(images), ref.model(images))


def test_atomic_save_leaves_no_partial_file(images, tmp_path, monkeypatch):
    res = _run(images)
    target = tmp_path / "q.pt"
    import isvit_viz.utils as utils

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(utils.os, "fsync", boom)
    with pytest.raises(OSError):
        iv.save_quantized(res, target)
    assert not target.exists() and not list(tmp_path.iterdir())


BAD_QUANTIZE = [
    ({"method": "nope"}, ValueError, "nope"),
    ({"w_bits": 1}, ValueError, "1"),
    ({"a_bits": 17}, ValueError, "17"),
    ({"w_bits": 4.0}, ValueError, "4.0"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"iters": -1}, ValueError, "-1"),
    ({"lr": float("nan")}, ValueError, "nan"),
    ({"device": "cuda"}, ValueError, "cuda"),
    ({"device": "tpu9"}, ValueError, "tpu9"),
    ({"softmax_quantizer": "foo"}, ValueError, "foo"),
    ({"calib": torch.empty(0, 1, 28, 28)}, ValueError, "empty"),
    ({"calib": torch.randn(8, 1, 28, 28)}, ValueError, "8 images"),
    ({"calib": torch.full((64, 1, 28, 28), float("nan"))}, ValueError, "NaN"),
    ({"calib": torch.randn(64, 3, 28, 28)}, ValueError, "3 channels"),
    ({"calib": torch.randn(64, 1, 32, 32)}, ValueError, "(32, 32)"),
    ({"calib": torch.randn(64, 28, 28)}, ValueError, "4-D"),
    ({"calib": "images/"}, ValueError, "str"),
    ({"sos": False, "method": "repq-vit"}, ValueError, "repq-vit"),
]


@pytest.mark.parametrize("kw,exc,needle", BAD_QUANTIZE)
def test_quantize_bad_input(kw, exc, needle, images):
    args = {"model": small(), "method": "isvit", "w_bits": 4, "a_bits": 4, "calib": images, "iters": 1, "progress": False}
    args.update(kw)
    with pytest.raises(exc) as ei:
        iv.quantize(**args)
    assert needle in str(ei.value)


def test_unsupported_models_are_named():
    with pytest.raises(ValueError, match="Sequential"):
        iv.quantize(torch.nn.Sequential(torch.nn.Linear(2, 2)), "isvit", 4, 4, torch.randn(64, 1, 28, 28))
    import timm

    with pytest.raises(ValueError, match="unsupported"):
        iv.quantize(timm.create_model("resnet18", pretrained=False), "isvit", 4, 4, torch.randn(64, 3, 224, 224))


def test_save_load_bad_input(tmp_path, images):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        iv.load_quantized(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="junk.pt"):
        iv.load_quantized(tmp_path / "junk.pt")
    res = _run(images)
    p = iv.save_quantized(res, tmp_path / "ok.pt")
    data = p.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.pt"):
        iv.load_quantized(tmp_path / "trunc.pt")
    from isvit_viz.models import build_from_spec as b

    with pytest.raises(ValueError, match="does not match"):
        iv.load_quantized(p, model=b({"kind": "embedded", "name": "swin"}))
    with pytest.raises(ValueError, match="QuantResult"):
        iv.save_quantized(res.model, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="directory"):
        iv.save_quantized(res, tmp_path)


def test_models_create_bad_input(tmp_path):
    from isvit_viz.models import create

    with pytest.raises(ValueError, match="unknown model 'not_a_model'"):
        create("not_a_model")  # any timm name is accepted here; quantize() guards the architecture
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        create("deit_tiny_patch16_224", weights=tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"xx")
    with pytest.raises(ValueError, match="bad.safetensors"):
        create("deit_tiny_patch16_224", weights=tmp_path / "bad.safetensors")


def test_imagefolder_loader_on_generated_tree(tmp_path):
    from PIL import Image

    from isvit_viz.data import imagefolder_loader

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(tmp_path / cls / f"{i}.png")
    loader = imagefolder_loader(tmp_path, "deit_small_patch16_224", batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [0, 0, 0, 1]
    assert len(list(imagefolder_loader(tmp_path, "vit_small_patch16_224", n=2, shuffle_seed=0))[0][1]) == 2
    with pytest.raises(FileNotFoundError):
        imagefolder_loader(tmp_path / "nope", "deit_small_patch16_224")
    with pytest.raises(ValueError, match="not_a_model"):
        imagefolder_loader(tmp_path, "not_a_model")  # timm names get timm's config; unknown names are refused


def test_timm_version_guard():
    from isvit_viz._version_guard import check_timm_version

    assert check_timm_version("1.0.31")
    with pytest.warns(RuntimeWarning, match="0.4.12"):
        assert not check_timm_version("0.4.12")
    with pytest.warns(RuntimeWarning, match="1.2.0"):
        assert not check_timm_version("1.2.0")


def test_device_resident_cache_gives_identical_results(images, monkeypatch):
    # On CUDA the caches live in GPU memory; the same code path on CPU (explicit device budget) must
    # return the same mini-batches, hence bit-identical results.
    from isvit_viz.calib import cache

    storages = _record_cache_storage(monkeypatch)
    ref = _run(images)
    assert storages and set(storages) == {"host"}
    storages.clear()
    orig_budget = cache.MemoryBudget.__init__

    def on_device(self, limit_bytes=None, spill_dir=None, device=None, device_limit_bytes=None):
        orig_budget(self, limit_bytes, spill_dir, device, device_limit_bytes=1 << 30)

    monkeypatch.setattr(cache.MemoryBudget, "__init__", on_device)
    dev = _run(images)
    assert storages and set(storages) == {"device"}
    with torch.no_grad():
        assert torch.equal(dev.model(images), ref.model(images))


def test_memory_budget_device_limits():
    from isvit_viz.calib.cache import MemoryBudget, TensorCache

    assert MemoryBudget(0, device="cpu").device_limit == 0  # CPU: host memory is the cache
    with pytest.raises(ValueError, match="needs a device"):
        MemoryBudget(0, device_limit_bytes=10)
    b = MemoryBudget(0, device="cpu", device_limit_bytes=4 * 6)
    first, second = TensorCache(2, (3,), b), TensorCache(2, (3,), b)
    assert (first.storage, second.storage) == ("device", "disk")
    first.close()
    assert b.device_used == 0 and TensorCache(2, (3,), b).storage == "device"
    second.close()
