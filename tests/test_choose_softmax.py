"""Per-attention choice of the post-softmax quantizer by calibration error (the ``ChooseSoftmax``
stage, issue #17 item 3): the lower-error quantizer wins on constructed maps, the engine installs and
records what it chose, and a saved or resumed model rebuilds the same quantizer types."""

from __future__ import annotations

import pytest
import torch

import isvit_viz as iv
from isvit_viz.calib import Calibrate, ChooseSoftmax, Method, Reconstruct
from isvit_viz.calib.choose import choose_for, matmul_error, softmax_matmuls
from isvit_viz.models import load_embedded
from isvit_viz.quant.config import QuantConfig
from isvit_viz.quant.log_quantizers import Log2Quantizer
from isvit_viz.quant.registry import QUANTIZERS
from isvit_viz.quant.uniform import UniformQuantizer
from isvit_viz.serialization import load_quantized, save_quantized

KW = dict(iters=2, batch_size=8, seed=0, progress=False)


@pytest.fixture(scope="module")
def vit():
    model, splits = load_embedded("vit")
    calib, _ = splits.calib_tensors(16, seed=0)
    return model, calib


def _maps():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 4, 8, generator=g)
    on_grid = torch.randint(0, 8, (2, 4, 4), generator=g).float() / 7  # exactly the 3-bit uniform levels
    on_grid[..., 0, 0] = 1.0
    powers = 2.0 ** -torch.randint(0, 7, (2, 4, 4), generator=g).float()  # exactly log2 levels
    return v, on_grid, powers


def test_matmul_error_by_hand():
    v, p, _ = _maps()
    q = UniformQuantizer(2, init="minmax").calibrate(p)
    by_hand = sum(((q(p)[i] - p[i]) @ v[i]).pow(2).sum() for i in range(2)) / (2 * 4 * 8)
    assert matmul_error(q, p, v) == pytest.approx(float(by_hand), rel=1e-6)


def test_the_lower_error_quantizer_wins_on_constructed_maps():
    v, on_grid, powers = _maps()
    cfg = QuantConfig(a_bits=3, act_init="minmax")
    name, q, errors = choose_for(on_grid, v, cfg, ("log2", "uniform", "sulq"))
    assert name == "uniform" and isinstance(q, UniformQuantizer) and errors["uniform"] < 1e-12 < errors["log2"]
    name, q, errors = choose_for(powers, v, cfg, ("uniform", "log2"))
    assert name == "log2" and isinstance(q, Log2Quantizer) and errors["log2"] == 0.0 < errors["uniform"]
    assert choose_for(powers, v, cfg, ("log2", "log2"))[0] == "log2"  # ties: the earlier one


def _chooser(candidates=("sulq", "uniform", "logsqrt2"), recon=False):
    stages = [Calibrate(), ChooseSoftmax(candidates=candidates, images=8)]
    if recon:
        stages.append(Reconstruct(name="fit", inputs="fp", weights="fp"))
    return Method(name="chooser", stages=tuple(stages))


def test_engine_installs_and_records_the_lowest_error_choice(vit, tmp_path):
    model, calib = vit
    res = iv.quantize(model, _chooser(), 6, 6, calib, **KW)
    recs = [u for u in res.unit_losses if u["stage"] == "choose_softmax"]
    mms = dict(softmax_matmuls(res.model))
    assert [r["unit"] for r in recs] == list(mms) and len(recs) == len(model.blocks)
    for r in recs:
        assert r["softmax_choice"] == min(r["errors"], key=r["errors"].get)
        assert isinstance(mms[r["unit"]].quantizer_a, QUANTIZERS[r["softmax_choice"]])
    assert res.config["quant_config"]["softmax_layers"] == {r["unit"]: r["softmax_choice"] for r in recs}
    path = save_quantized(res, tmp_path / "q.pt")
    again = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(again.model(calib[:4]), res.model(calib[:4]))


def test_resume_rebuilds_the_chosen_quantizer_types(vit, tmp_path):
    model, calib = vit
    m = _chooser(candidates=("uniform",), recon=True)  # every attention differs from the method's SULQ
    first = iv.quantize(model, m, 4, 4, calib, checkpoint_dir=tmp_path / "ck", **KW)
    assert all(isinstance(mm.quantizer_a, UniformQuantizer) for _, mm in softmax_matmuls(first.model))
    resumed = iv.quantize(model, m, 4, 4, calib, checkpoint_dir=tmp_path / "ck", **KW)  # loads the finished run
    with torch.no_grad():
        assert torch.equal(resumed.model(calib[:4]), first.model(calib[:4]))


@pytest.mark.parametrize(
    ("stages", "needle"),
    [
        (
            (ChooseSoftmax(),),
            r"stages\[0\] \(ChooseSoftmax 'choose_softmax'\): stage order: choosing quantizers before calibration",
        ),
        ((Calibrate(), ChooseSoftmax(candidates=("sulq", "cubic"))), r"candidates: unknown quantizer 'cubic'"),
        ((Calibrate(), ChooseSoftmax(candidates=())), r"candidates: must be a non-empty tuple"),
        ((Calibrate(), ChooseSoftmax(images=0)), r"images: must be None or an int >= 1"),
    ],
)
def test_bad_choose_stages_fail_before_any_work(stages, needle):
    with pytest.raises(ValueError, match=needle):
        Method(name="bad", stages=stages)


def test_quant_config_rejects_unknown_layer_quantizer():
    with pytest.raises(ValueError, match=r"softmax_layers\['blocks.0.attn'\]: unknown softmax quantizer 'cubic'"):
        QuantConfig(softmax_layers={"blocks.0.attn": "cubic"})
