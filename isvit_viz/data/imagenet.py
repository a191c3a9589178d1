"""ImageNet (or any ImageFolder tree): per-model evaluation preprocessing, fair subsets, fast loaders.

Preprocessing: the paper's models keep the official code's settings (method.md 3.1); every other timm
model gets timm's own pretrained data config. Subsets: evaluation subsets are class-stratified
(:func:`stratified_indices`); calibration keeps the official rule, ``n`` random train images, seeded
(:func:`calibration_images`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_VIT = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9}
_DEIT = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.875}
_SWIN = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.9}
#: The official code's evaluation settings (utils/build_dataset.py, method.md 3.1) for the models it accepts:
#: the paper's seven plus vit_tiny and swin_tiny. Bicubic resize to floor(224 / crop_pct), centre crop 224.
OFFICIAL_PREPROCESSING: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": _VIT,
    "vit_small_patch16_224": _VIT,
    "vit_base_patch16_224": _VIT,
    "deit_tiny_patch16_224": _DEIT,
    "deit_small_patch16_224": _DEIT,
    "deit_base_patch16_224": _DEIT,
    "swin_tiny_patch4_window7_224": _SWIN,
    "swin_small_patch4_window7_224": _SWIN,
    "swin_base_patch4_window7_224": _SWIN,
}
#: Keys of a data config that define the evaluation transform (timm's names).
CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
SAMPLINGS = ("stratified", "random")


def default_workers() -> int:
    """DataLoader workers for JPEG decoding: up to 8, never more than the CPUs this process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus))


def _model_name(model: str | nn.Module) -> str:
    if isinstance(model, str):
        return model
    spec = getattr(model, "isvit_build_spec", None) or {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return spec.get("name") or cfg.get("architecture") or type(model).__name__


def _base_name(name: str) -> str:
    return name.split(".", 1)[0]  # timm's "arch.tag" names


def official_preprocessing(model: str | nn.Module) -> dict[str, Any] | None:
    """The official code's data config for ``model`` (name or module), or ``None`` if it has none."""
    cfg = OFFICIAL_PREPROCESSING.get(_base_name(_model_name(model)))
    if cfg is None:
        return None
    return {"input_size": (3, 224, 224), "interpolation": "bicubic", **cfg, "crop_mode": "center"}


def timm_preprocessing(model: str | nn.Module) -> dict[str, Any]:
    """timm's evaluation data config: ``resolve_model_data_config`` for a module, the registered
    pretrained config for a name (``"arch"`` or ``"arch.tag"``). Raises ``ValueError`` for unknown names."""
    import timm
    from timm.data import resolve_data_config, resolve_model_data_config

    if isinstance(model, nn.Module):
        if getattr(model, "pretrained_cfg", None) is None:
            raise ValueError(f"{type(model).__name__} has no timm pretrained_cfg; pass a timm model or its name")
        cfg = resolve_model_data_config(model)
    else:
        if not timm.is_model(model):
            raise ValueError(f"no preprocessing known for {model!r}: not a timm model name (see timm.list_models())")
        pcfg = timm.models.get_pretrained_cfg(model)
        if pcfg is not None:
            cfg = resolve_data_config(pretrained_cfg=pcfg.to_dict())
        else:  # registered without a pretrained config: build it on the meta device (no memory, no init)
            with torch.device("meta"):
                cfg = resolve_model_data_config(timm.create_model(model, pretrained=False))
    return {k: cfg[k] for k in CONFIG_KEYS}


def preprocessing_config(model: str | nn.Module) -> dict[str, Any]:
    """Evaluation data config (timm's keys ``input_size, interpolation, mean, std, crop_pct, crop_mode``
    plus ``source``): the official settings for the paper's models (``source="official"``, see
    :data:`OFFICIAL_PREPROCESSING`), else timm's own (``source="timm"``)."""
    cfg = official_preprocessing(model)
    if cfg is not None:
        return {**cfg, "source": "official"}
    return {**timm_preprocessing(model), "source": "timm"}


def preprocessing_differences(model_name: str) -> dict[str, tuple[Any, Any]]:
    """``{key: (official, timm)}`` for every data-config key where the official setting of a paper model
    differs from timm's pretrained config (empty dict: they agree)."""
    off = official_preprocessing(model_name)
    if off is None:
        raise ValueError(f"{model_name!r} has no official preprocessing; known: {sorted(OFFICIAL_PREPROCESSING)}")
    tm = timm_preprocessing(model_name)
    return {k: (off[k], tm[k]) for k in CONFIG_KEYS if _norm(off[k]) != _norm(tm[k])}


def _norm(v: Any) -> Any:
    """Comparable form of a config value: tuples of floats, floats, or the string itself."""
    if isinstance(v, str):
        return v
    return tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else float(v)


def build_transform(model: str | nn.Module):
    """Evaluation transform of :func:`preprocessing_config`, built by ``timm.data.create_transform``:
    bicubic resize to ``floor(H / crop_pct)``, centre crop ``H``, to tensor, normalise."""
    from timm.data import create_transform

    cfg = preprocessing_config(model)
    return create_transform(**{k: cfg[k] for k in CONFIG_KEYS}, is_training=False)


def _check_n(n: Any, available: int, root: Path) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    if n > available:
        raise ValueError(f"{root} has {available} images, fewer than the {n} requested")


def stratified_indices(targets: list[int] | torch.Tensor, n: int, seed: int = 0, num_classes: int | None = None) -> list[int]:
    """Seeded class-stratified subset of ``n`` sample indices (sorted).

    Every class gets ``n // C`` images; the remaining ``n % C`` are given one each to classes drawn at
    random (seeded) among those with images to spare. Within a class the images are drawn at random.
    Raises ``ValueError`` when a class has fewer images than its share.
    """
    t = torch.as_tensor(targets, dtype=torch.long)
    c = int(num_classes if num_classes is not None else (int(t.max()) + 1 if len(t) else 0))
    if c == 0 or len(t) == 0:
        raise ValueError("no images to draw a subset from")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(t):
        raise ValueError(f"n must be an int in [1, {len(t)}], got {n!r}")
    order = torch.argsort(t, stable=True)
    counts = torch.bincount(t, minlength=c)
    starts = torch.cumsum(counts, 0) - counts
    share, extra = divmod(n, c)
    short = (counts < share).nonzero().flatten()
    if len(short):
        k = int(short[0])
        raise ValueError(f"class {k} has {int(counts[k])} images, fewer than the {share} per class a stratified subset "
                         f"of {n} needs")  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    spare = (counts > share).nonzero().flatten()
    if len(spare) < extra:
        raise ValueError(
            f"a stratified subset of {n} needs {extra} classes with more than {share} images, only {len(spare)} have"
        )
    quota = torch.full((c,), share, dtype=torch.long)
    quota[spare[torch.randperm(len(spare), generator=g)[:extra]]] += 1
    idx: list[torch.Tensor] = []
    for k in quota.nonzero().flatten().tolist():
        pick = torch.randperm(int(counts[k]), generator=g)[: int(quota[k])]
        idx.append(order[starts[k] + pick])
    return sorted(torch.cat(idx).tolist())


def random_indices(total: int, n: int, seed: int = 0) -> list[int]:
    """``n`` of ``total`` indices drawn at random without replacement (``torch.randperm``, seeded), in draw order."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def imagefolder_dataset(
    root: str | Path, model: str | nn.Module, n: int | None = None, seed: int = 0, sampling: str = "stratified"
) -> Dataset:
    """ImageFolder (``root/<class>/<image>``) with ``model``'s preprocessing, optionally a subset of ``n``
    images (``sampling="stratified"``: :func:`stratified_indices`; ``"random"``: :func:`random_indices`).
    The result has ``.classes`` (class folder names). Raises before decoding any image on bad input."""
    from torchvision.datasets import ImageFolder

    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    transform = build_transform(model)
    try:
        ds = ImageFolder(str(root), transform=transform)
    except FileNotFoundError as e:  # torchvision: no class folder, or a class folder without images
        raise ValueError(f"no images found under {root} (expected {root}/<class>/<image>): {e}") from None
    if len(ds) == 0:
        raise ValueError(f"no images found under {root}")
    classes = list(ds.classes)
    if n is None:
        return ds
    _check_n(n, len(ds), root)
    if sampling == "stratified":
        idx = stratified_indices(ds.targets, n, seed, num_classes=len(classes))
    else:
        idx = random_indices(len(ds), n, seed)
    sub = Subset(ds, idx)
    sub.classes = classes  # type: ignore[attr-defined]
    return sub


def imagefolder_loader(
    root: str | Path,
    model: str | nn.Module,
    n: int | None = None,
    batch_size: int = 64,
    shuffle_seed: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    sampling: str = "stratified",
    pin_memory: bool | None = None,
) -> DataLoader:
    """DataLoader of (images [B, 3, H, W] float32, labels [B]) over an ImageFolder tree, in a fixed order.

    Args:
        root: ``root/<class>/<image>``; classes are the sorted folder names.
        model: timm model or name; fixes the preprocessing (:func:`preprocessing_config`).
        n: keep a subset of ``n`` images (default all). By default a **class-stratified** subset drawn
            with ``seed`` (equal count per class, remainder spread over seeded classes): the fair way to
            evaluate on part of ImageNet val. ``sampling="random"`` draws ``n`` random images instead.
        shuffle_seed: kept for compatibility: same as ``sampling="random", seed=shuffle_seed`` (the
            official calibration rule; prefer :func:`calibration_images`).
        num_workers: decoding processes (0: in this process); workers persist across iterations.
        pin_memory: page-locked batches for fast host-to-GPU copies; default: when CUDA is available.
    """
    if shuffle_seed is not None:
        sampling, seed = "random", shuffle_seed
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    ds = imagefolder_dataset(root, model, n, seed, sampling)
    loader = DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )  # fmt: skip
    return loader


def imagenet_data(
    root: str | Path,
    model: nn.Module,
    n_calib: int = 1024,
    n_test: int | None = None,
    seed: int = 0,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    batch_size: int = 200,
) -> tuple[torch.Tensor, DataLoader]:
    """Calibration images and the evaluation loader of an ImageNet-style root (``root/train``, ``root/val``).

    The calibration set follows the official rule: ``n_calib`` random train images drawn with ``seed``,
    returned as one float32 tensor [n_calib, 3, H, W] (1024 at 224 px: 617 MB). The test loader streams
    all of val, or a seeded class-stratified subset of ``n_test`` images, in batches of ``batch_size``.
    ``num_workers`` defaults to :func:`default_workers`. Every check (folders, image counts, class folders
    against the model's head, train and val with the same classes) runs before any image is decoded.
    """
    root = Path(root)
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root}: missing folder {root / sub} (expected an ImageNet root with train/ and val/)")
    workers = default_workers() if num_workers is None else num_workers
    calib_ds = imagefolder_dataset(root / "train", model, n_calib, seed=seed, sampling="random")
    test_loader = imagefolder_loader(root / "val", model, n=n_test, batch_size=batch_size, num_workers=workers, seed=seed,
                                     pin_memory=pin_memory)  # fmt: skip
    check_classes(dataset_classes(calib_ds), model, root / "train")
    check_classes(dataset_classes(test_loader), model, root / "val")
    if dataset_classes(calib_ds) != dataset_classes(test_loader):
        raise ValueError(f"{root}: train/ and val/ have different class folders")
    calib_x = torch.cat([x for x, _ in DataLoader(calib_ds, batch_size=64, num_workers=workers)])
    return calib_x, test_loader


def calibration_images(
    root: str | Path, model: str | nn.Module, n: int = 1024, seed: int = 0, num_workers: int = 0, batch_size: int = 64
) -> torch.Tensor:
    """The official calibration rule: ``n`` random images of ``root`` (ImageNet train), seeded, as one
    float32 tensor [n, 3, H, W] (1024 images at 224 px: 617 MB)."""
    loader = imagefolder_loader(root, model, n, batch_size, num_workers=num_workers, seed=seed, sampling="random",
                                pin_memory=False)  # fmt: skip
    return torch.cat([x for x, _ in loader])


def dataset_classes(data: Dataset | DataLoader) -> list[str]:
    """Class folder names of an :func:`imagefolder_dataset` or its loader."""
    ds = data.dataset if isinstance(data, DataLoader) else data
    classes = getattr(ds, "classes", None)
    if classes is None:
        raise ValueError(f"{type(ds).__name__} has no .classes")
    return list(classes)


def model_num_classes(model: nn.Module) -> int | None:
    """Outputs of the model's classifier head (timm ``num_classes``), or ``None`` if unknown."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    return getattr(head, "out_features", None)


def check_classes(classes: list[str], model: nn.Module, root: str | Path) -> None:
    """Raise ``ValueError`` when the folder's class count differs from the model head's outputs."""
    n = model_num_classes(model)
    if n is not None and len(classes) != n:
        raise ValueError(f"{root} has {len(classes)} class folders but the model's head has {n} outputs; "
                         "use an ImageFolder with one folder per model class")  # fmt: skip
