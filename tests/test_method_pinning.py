"""Every registered PTQ method reproduces its stored results bit-exactly (CPU, one thread).

The references in ``tests/data/method_pins.pt`` were written by the pre-refactor pipeline (one
procedure per ``schedule`` string) at tiny settings: W4/A4, 32 calibration images, 2 iterations, batch
16, seed 0, logits of 16 test images. A refactor of the calibration engine must not change them.
Regenerate only when a result is meant to change: ``python tests/test_method_pinning.py --write``.

History: written by the pre-refactor pipeline with the explicit straight-through rule and QDrop's
dropping on every activation (both deliberate changes, made before the refactor and checked by running
the old pipeline on them: identical); the declarative engine reproduced all 9 cases bit-exactly; then
regenerated once on purpose when the engine let Swin PatchMerging units sum their loss over tokens
(only ``swin/isvit`` changed).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

PINS = Path(__file__).parent / "data" / "method_pins.pt"

#: case name -> (embedded model, method, quantize() keyword arguments)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "vit/isvit": ("vit", "isvit", {}),
    "vit/isvit-official": ("vit", "isvit-official", {}),
    "vit/repq-vit": ("vit", "repq-vit", {}),
    "vit/ptq4vit": ("vit", "ptq4vit", {}),
    "vit/qdrop": ("vit", "qdrop", {}),
    "vit/minmax": ("vit", "minmax", {}),
    "vit/isvit-no-sos": ("vit", "isvit", {"sos": False}),
    "vit/isvit-log2": ("vit", "isvit", {"softmax_quantizer": "log2"}),
    "swin/isvit": ("swin", "isvit", {}),
}


def _data(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    from isvit_viz.models import load_embedded

    model, splits = load_embedded(name)
    calib, _ = splits.calib_tensors(32, seed=0)
    test, _ = splits.test_tensors(16)
    return model, calib, test


def run_case(case: str, data: dict[str, tuple]) -> dict[str, Any]:
    """Quantize one case and return what is pinned: logits, callback order, per-unit losses, timing keys."""
    import isvit_viz as iv

    name, method, kw = CASES[case]
    model, calib, test = data[name]
    stages: list[str] = []
    torch.manual_seed(1234)  # quantize() must not depend on the caller's global RNG state
    res = iv.quantize(model, method, 4, 4, calib, iters=2, batch_size=16, seed=0, progress=False,
                      callbacks=lambda s, _m: stages.append(s), **kw)  # fmt: skip
    with torch.no_grad():
        logits = res.model(test).float()
    losses = [[u["stage"], u["unit"], float(u["loss_first"]), float(u["loss_last"])] for u in res.unit_losses]
    return {"logits": logits, "stages": stages, "unit_losses": losses, "timing_keys": sorted(res.timings)}


@pytest.fixture(scope="module")
def data() -> dict[str, tuple]:
    return {name: _data(name) for name in ("vit", "swin")}


@pytest.fixture(scope="module")
def pins() -> dict[str, Any]:
    return torch.load(PINS, weights_only=True)


@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_pinned_result(case, data, pins):
    assert torch.get_num_threads() == 1  # the references are single-threaded CPU results
    got, ref = run_case(case, data), pins[case]
    assert torch.equal(got["logits"], ref["logits"]), (got["logits"] - ref["logits"]).abs().max()
    assert got["stages"] == ref["stages"]
    assert got["unit_losses"] == ref["unit_losses"]
    assert got["timing_keys"] == ref["timing_keys"]


def test_pins_cover_every_registered_method(pins):
    from isvit_viz.calib import METHODS

    assert {m for _, m, _ in CASES.values()} == set(METHODS)
    assert set(pins) == set(CASES)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: OMP_NUM_THREADS=1 python tests/test_method_pinning.py --write")
    torch.set_num_threads(1)
    loaded = {name: _data(name) for name in ("vit", "swin")}
    out = {case: run_case(case, loaded) for case in CASES}
    PINS.parent.mkdir(exist_ok=True)
    torch.save(out, PINS)
    print(f"wrote {PINS} ({PINS.stat().st_size} bytes, {len(out)} cases)")
