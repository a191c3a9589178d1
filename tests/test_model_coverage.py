"""Model coverage (issue 15, item 5): every timm name in ``models.coverage.COVERAGE`` is quantized exactly or refused.

Random init, depth reduced (ViT-like: ``depth=2``; Swin: ``depths=(1, 2, 1, 1)`` so the second stage-2
block uses shifted windows and the attention mask), native input size, ``num_classes=10``, two images.
Random-init LayerNorms are the identity and timm's layer scales start at 1e-5 or 1e-6, which would hide
a wrong fold or a block whose output is lost; every norm affine and layer scale is therefore redrawn.
"""

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import isvit_viz as iv
from isvit_viz.calib import reconstruction_units, reparameterize
from isvit_viz.models import create
from isvit_viz.models.coverage import COVERAGE, render_markdown
from isvit_viz.models.support import UnsupportedModelError, block_types, check_supported, post_ln_links
from isvit_viz.quant.config import QuantConfig
from isvit_viz.quant.modules import QuantConv2d, QuantLinear
from isvit_viz.quant.uniform import UniformQuantizer
from isvit_viz.quant.wrap import quantize_model, set_quant_state

README = Path(__file__).resolve().parents[1] / "README.md"
SUPPORTED = [e for e in COVERAGE if e.status == "supported"]
REFUSED = [e for e in COVERAGE if e.status == "refused"]


def _id(e):
    return e.name + ("[" + ",".join(f"{k}={v}" for k, v in e.kwargs.items()) + "]" if e.kwargs else "")


def _arch_kwargs(e):
    depth = {"depths": (1, 2, 1, 1)} if e.name.startswith("swin") else {"depth": 2}
    return {**depth, "num_classes": 10, **e.kwargs}


@torch.no_grad()
def _redraw_norms_and_scales(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rpartition(".")[2]
        if leaf == "gamma" or (leaf == "weight" and p.dim() == 1):  # layer scale, norm weight
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif leaf == "bias" and p.dim() == 1 and "norm" in name:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _build(e) -> nn.Module:
    torch.manual_seed(0)
    m = create(e.name, **_arch_kwargs(e))  # records isvit_build_spec, so load_quantized can rebuild it
    _redraw_norms_and_scales(m)
    return m.eval()


def _images(model: nn.Module, n: int = 2) -> torch.Tensor:
    size = tuple(model.pretrained_cfg["input_size"])
    return torch.randn(n, *size, generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("entry", SUPPORTED, ids=_id)
def test_supported_model_is_exact_and_round_trips(entry, tmp_path):
    m = _build(entry)
    x = _images(m)
    check_supported(m)
    with torch.no_grad():
        ref = m(x)
        q = quantize_model(copy.deepcopy(m), QuantConfig())
        # 1. wrapped, quantization off: the FP function
        assert _rel(q(x), ref) <= 1e-5

        # 2. every quantized layer belongs to exactly one reconstruction unit; every block is a unit
        units = reconstruction_units(q)
        unit_names = [n for n, _, _ in units]
        for name, mod in q.named_modules():
            if isinstance(mod, (QuantLinear, QuantConv2d)):
                owners = [u for u in unit_names if name == u or name.startswith(u + ".")]
                assert len(owners) == 1, (name, owners)
        blocks = [n for n, mod in q.named_modules() if type(mod) in block_types()]
        assert blocks and set(blocks) <= set(unit_names)

        # 3. reparameterization is exact in FP: random channel-wise (scale, integer zero-point) on every
        #    post-LN input, then fold (the algebra of method.md 2.4 does not depend on how they were chosen)
        links = post_ln_links(q)
        assert len(links) == sum(2 * len(getattr(q.get_submodule(b), "attns", [None])) for b in blocks)  # parallel: per branch
        g = torch.Generator().manual_seed(2)
        for _, _, lin in links:
            qz = q.get_submodule(lin).input_quantizer
            assert isinstance(qz, UniformQuantizer) and qz.channel_axis == -1
            d = q.get_submodule(lin).in_features
            qz.set_params(0.05 * (torch.rand(d, generator=g) + 0.5), torch.randint(0, 16, (d,), generator=g).float(), -1)
        set_quant_state(q, False, False)
        before = q(x)
        assert reparameterize(q) == len(links)
        assert _rel(q(x), before) <= 1e-5
        assert all(q.get_submodule(lin).input_quantizer.scale.numel() == 1 for _, _, lin in links)

    # 4. one reconstruction iteration of the full I&S-ViT pipeline, every block reconstructed in both stages
    res = iv.quantize(m, "isvit", 4, 4, x, iters=1, batch_size=2, progress=False)
    for stage in ("stage1", "stage3"):
        done = {u["unit"] for u in res.unit_losses if u["stage"] == stage}
        assert set(blocks) <= done, stage
    with torch.no_grad():
        out = res.model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()

    # 5. save / load (architecture rebuilt from the recorded build spec): bit-identical
    path = iv.save_quantized(res, tmp_path / "q.pt")
    back = iv.load_quantized(path)
    with torch.no_grad():
        assert torch.equal(back.model(x), out)
    sd_a, sd_b = res.model.state_dict(), back.model.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


class _MustNotBeTouched:
    """Calibration data that fails if the pipeline reads it: the guard must run first."""

    def __iter__(self):
        raise AssertionError("calibration data was read before the architecture check")


@pytest.mark.parametrize("entry", REFUSED, ids=_id)
def test_refused_model_names_module_path_and_class(entry):
    torch.manual_seed(0)
    m = create(entry.name, **_arch_kwargs(entry))
    path, cls = entry.refused_at
    with pytest.raises(UnsupportedModelError) as ei:
        iv.quantize(m, "isvit", 4, 4, _MustNotBeTouched(), iters=1, progress=False)
    err = ei.value
    assert (err.path, err.cls) == (path, cls)
    assert type(m.get_submodule(path)).__name__ == cls
    assert cls in str(err) and (f"'{path}'" in str(err) if path else "(the model itself)" in str(err))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(UnsupportedModelError):
        quantize_model(m, QuantConfig())
    assert not any(isinstance(mod, (QuantLinear, QuantConv2d)) for mod in m.modules())  # nothing was swapped
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_coverage_list_is_large_and_consistent():
    assert len(COVERAGE) >= 25
    assert {e.status for e in COVERAGE} == {"supported", "refused"}
    assert all((e.refused_at is None) == (e.status == "supported") for e in COVERAGE)
    assert len({_id(e) for e in COVERAGE}) == len(COVERAGE)


def test_readme_table_is_rendered_from_the_coverage_list():
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- supported-models:start -->\n(.*?)<!-- supported-models:end -->", text, re.S)
    assert m, "README.md lacks the supported-models markers"
    assert m.group(1) == render_markdown(), "regenerate with: python -m isvit_viz.models.coverage --markdown"


# --- the guard on hand-modified models (small, non-native 32 px: these test the guard, not a timm name) ---


def _tiny_vit(**kw) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kw).eval()


class _MyMlp(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.inner = mlp

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize(
    "modify,path,cls",
    [
        (lambda m: setattr(m.blocks[1], "mlp", _MyMlp(m.blocks[1].mlp)), "blocks.1.mlp", "_MyMlp"),
        (lambda m: setattr(m.blocks[1].attn, "gate", nn.Linear(32, 32)), "blocks.1.attn", "Attention"),
        (lambda m: setattr(m.blocks[0], "norm1", nn.LayerNorm(32, bias=False)), "blocks.0.norm1", "LayerNorm"),
        (lambda m: setattr(m.blocks[0].mlp, "act", nn.SiLU()), "blocks.0.mlp.act", "SiLU"),
        (lambda m: setattr(m, "extra", nn.Linear(32, 32)), "extra", "Linear"),
    ],
)
def test_unsupported_module_inside_a_supported_model_is_named(modify, path, cls):
    m = _tiny_vit()
    modify(m)
    with pytest.raises(UnsupportedModelError, match=re.escape(f"{cls} at '{path}'")):
        quantize_model(m, QuantConfig())


def test_bias_free_qkv_save_load_round_trip(tmp_path):
    """Reparameterization gives qkv a bias the FP model lacks; load and resume must recreate it."""
    m = _tiny_vit(qkv_bias=False)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert m.blocks[0].attn.qkv.bias is None
    res = iv.quantize(m, "isvit", 4, 4, x, iters=1, batch_size=2, progress=False, checkpoint_dir=tmp_path / "ck")
    assert res.model.blocks[0].attn.qkv.bias is not None and res.model.blocks[0].attn.qkv.bias.abs().sum() > 0
    p = iv.save_quantized(res, tmp_path / "q.pt")
    back = iv.load_quantized(p, model=_tiny_vit(qkv_bias=False))
    with torch.no_grad():
        assert torch.equal(back.model(x), res.model(x))
    # resuming from the finished checkpoint loads the same state into a freshly wrapped model
    again = iv.quantize(m, "isvit", 4, 4, x, iters=1, batch_size=2, progress=False, checkpoint_dir=tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(again.model(x), res.model(x))
