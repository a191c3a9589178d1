"""Every registered PTQ method reproduces its stored results bit-exactly (CPU, one thread).

Bit-exact CPU results depend on the processor (vectorised kernels and BLAS code paths differ, e.g.
2e-6 in the logits of plain min/max calibration between two machines of this project), and
calibration searches and reconstruction amplify such differences. So the file holds one *set* of
pins per floating-point behaviour, told apart by the logits of ``vit/minmax`` (one second to compute):
the test uses the set whose ``vit/minmax`` logits this machine reproduces bit-exactly, and a case that
set lacks is skipped with the reason (``--write`` on such a machine adds its set).

The references in ``tests/data/method_pins.pt`` were written by the pre-refactor pipeline (one
procedure per ``schedule`` string) at tiny settings: W4/A4, 32 calibration images, 2 iterations, batch
16, seed 0, logits of 16 test images. A refactor of the calibration engine must not change them.
Regenerate only when a result is meant to change: ``python tests/test_method_pinning.py --write``.

History: written by the pre-refactor pipeline with the explicit straight-through rule and QDrop's
dropping on every activation (both deliberate changes, made before the refactor and checked by running
the old pipeline on them: identical); the declarative engine reproduced all 9 cases bit-exactly; then
regenerated once on purpose when the engine let Swin PatchMerging units sum their loss over tokens
(only ``swin/isvit`` changed). When the faithful baselines arrived (0.2), the old ``repq-vit``,
``ptq4vit`` and ``qdrop`` pins moved unchanged to ``reparam-logsqrt2``, ``twin-uniform-mse`` and
``qdrop-ste`` (the same stages under honest names, still bit-exact), and only the new cases were written
(``--write CASE ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

PINS = Path(__file__).parent / "data" / "method_pins.pt"

#: FIMA-Q's k = 5 refreshes do not fit into the cases' 2 steps: k = 2 (a refresh before each step)
_FIMA_CHEAP = {"reconstruct": {"loss": ("fisher_dplr", {"k": 2, "temperature": 20.0})}}

#: case name -> (embedded model, method, quantize() keyword arguments). A method is a registered name,
#: or (name, {stage name: field overrides}) for a registered method with cheaper stage settings.
CASES: dict[str, tuple[str, str | tuple[str, dict], dict[str, Any]]] = {
    "vit/isvit": ("vit", "isvit", {}),
    "vit/isvit-official": ("vit", "isvit-official", {}),
    "vit/repq-vit": ("vit", "repq-vit", {}),
    "swin/repq-vit": ("swin", "repq-vit", {}),
    "vit/reparam-logsqrt2": ("vit", "reparam-logsqrt2", {}),
    "vit/ptq4vit": ("vit", ("ptq4vit", {"hessian": {"images": 8, "candidates": 5, "rounds": 1}}), {}),
    "vit/twin-uniform-mse": ("vit", "twin-uniform-mse", {}),
    "vit/brecq": ("vit", "brecq", {}),
    "swin/brecq": ("swin", "brecq", {}),
    "vit/qdrop": ("vit", "qdrop", {}),
    "vit/qdrop-ste": ("vit", "qdrop-ste", {}),
    "vit/aphq-vit": ("vit", "aphq-vit", {}),
    "swin/aphq-vit": ("swin", "aphq-vit", {}),
    "vit/fima-q": ("vit", ("fima-q", _FIMA_CHEAP), {}),
    "swin/fima-q": ("swin", ("fima-q", _FIMA_CHEAP), {}),
    "vit/minmax": ("vit", "minmax", {}),
    "vit/isvit-no-sos": ("vit", "isvit", {"sos": False}),
    "vit/isvit-log2": ("vit", "isvit", {"softmax_quantizer": "log2"}),
    "swin/isvit": ("swin", "isvit", {}),
    "vit/isvit+": ("vit", "isvit+", {}),
    "swin/isvit+": ("swin", "isvit+", {}),
}


def _method(spec: str | tuple[str, dict]) -> Any:
    """A registered method, with stage fields replaced where the case asks for it."""
    from dataclasses import replace

    from isvit_viz.calib import METHODS

    if isinstance(spec, str):
        return spec
    from isvit_viz.calib import Loss

    name, over = spec
    m = METHODS[name]
    over = {st: {k: Loss(v[0], **v[1]) if k == "loss" else v for k, v in f.items()} for st, f in over.items()}
    return replace(m, stages=tuple(replace(s, **over.get(s.name, {})) for s in m.stages))


def _method_name(spec: str | tuple[str, dict]) -> str:
    return spec if isinstance(spec, str) else spec[0]


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
    res = iv.quantize(model, _method(method), 4, 4, calib, iters=2, batch_size=16, seed=0, progress=False,
                      callbacks=lambda s, _m: stages.append(s), **kw)  # fmt: skip
    with torch.no_grad():
        logits = res.model(test).float()
    losses = [_pinned_record(u) for u in res.unit_losses]
    return {"logits": logits, "stages": stages, "unit_losses": losses, "timing_keys": sorted(res.timings)}


def _pinned_record(u: dict[str, Any]) -> list:
    """A unit's first and last loss, or a ``ChooseSoftmax`` record's choice and candidate errors."""
    if "softmax_choice" in u:
        return [u["stage"], u["unit"], u["softmax_choice"], sorted((k, float(v)) for k, v in u["errors"].items())]
    return [u["stage"], u["unit"], float(u["loss_first"]), float(u["loss_last"])]


@pytest.fixture(scope="module")
def data() -> dict[str, tuple]:
    return {name: _data(name) for name in ("vit", "swin")}


#: The case whose logits identify a machine's floating-point behaviour (calibration only, ~1 s).
KEY_CASE = "vit/minmax"


def load_sets() -> list[dict[str, Any]]:
    """The stored pin sets, one per floating-point behaviour (``[]`` without the file)."""
    return torch.load(PINS, weights_only=True)["sets"] if PINS.exists() else []


def matching_set(sets: list[dict[str, Any]], key: dict[str, Any]) -> int | None:
    """Index of the set whose ``KEY_CASE`` logits equal ``key``'s bit for bit, or ``None``."""
    return next((i for i, s in enumerate(sets) if torch.equal(s[KEY_CASE]["logits"], key["logits"])), None)


@pytest.fixture(scope="module")
def pins(data) -> dict[str, Any]:
    sets = load_sets()
    i = matching_set(sets, run_case(KEY_CASE, data))
    if i is None:
        pytest.skip(f"none of the {len(sets)} stored pin sets matches this CPU's floating-point results ({KEY_CASE} "
                    "logits differ); add this machine's set: OMP_NUM_THREADS=1 python tests/test_method_pinning.py --write")  # fmt: skip
    return sets[i]


@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_pinned_result(case, data, pins):
    assert torch.get_num_threads() == 1  # the references are single-threaded CPU results
    if case not in pins:
        pytest.skip(f"{case} is not pinned for this CPU's floating-point results (the set was written before the case)")
    got, ref = run_case(case, data), pins[case]
    assert torch.equal(got["logits"], ref["logits"]), (got["logits"] - ref["logits"]).abs().max()
    assert got["stages"] == ref["stages"]
    assert got["unit_losses"] == ref["unit_losses"]
    assert got["timing_keys"] == ref["timing_keys"]


def test_pins_cover_every_registered_method(pins):
    from isvit_viz.calib import METHODS

    assert {_method_name(m) for _, m, _ in CASES.values()} == set(METHODS)
    assert set(pins) <= set(CASES)
    assert any(set(s) == set(CASES) for s in load_sets())  # at least one machine's set pins every case


if __name__ == "__main__":
    if not sys.argv[1:] or sys.argv[1] != "--write":
        sys.exit("usage: OMP_NUM_THREADS=1 python tests/test_method_pinning.py --write [CASE ...]  (default: every case)")
    torch.set_num_threads(1)
    loaded = {name: _data(name) for name in ("vit", "swin")}
    sets, key = load_sets(), run_case(KEY_CASE, loaded)
    i = matching_set(sets, key)
    if i is None:
        sets.append({KEY_CASE: key})
        i = len(sets) - 1
    # this machine's set: drop cases that no longer exist, (re)write the named ones (default: all)
    out = {case: sets[i][case] for case in CASES if case in sets[i]}
    for case in sys.argv[2:] or list(CASES):
        out[case] = run_case(case, loaded)
    sets[i] = out
    PINS.parent.mkdir(exist_ok=True)
    torch.save({"sets": sets}, PINS)
    print(f"wrote {PINS}: set {i + 1} of {len(sets)} ({len(out)} cases)")
