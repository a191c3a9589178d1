"""The tested list of timm models (:data:`COVERAGE`) and the README "Supported models" table.

``tests/test_model_coverage.py`` checks every entry: **supported** ones wrap to the exact FP function,
reparameterize exactly, run one I&S-ViT reconstruction iteration and round-trip through
``save_quantized``/``load_quantized`` bit-identically; **refused** ones raise
:class:`isvit_viz.models.support.UnsupportedModelError` naming the listed module path and class.
Render the README table with ``python -m isvit_viz.models.coverage --markdown``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CoverageEntry:
    """One tested timm model: its expected status and what it exercises (or why it is refused).

    ``kwargs`` are the architecture variant passed to ``timm.create_model`` (shown in the README); the
    coverage test adds only a depth reduction and a small ``num_classes``. ``refused_at`` is the module
    path and class the error must name.
    """

    name: str
    status: str  # "supported" | "refused"
    note: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    refused_at: tuple[str, str] | None = None


def _ok(name: str, note: str, **kwargs: Any) -> CoverageEntry:
    return CoverageEntry(name, "supported", note, kwargs)


def _no(name: str, path: str, cls: str, note: str, **kwargs: Any) -> CoverageEntry:
    return CoverageEntry(name, "refused", note, kwargs, (path, cls))


#: The tested timm models (``tests/test_model_coverage.py``); the README table is rendered from this list.
COVERAGE: tuple[CoverageEntry, ...] = (
    _ok("vit_tiny_patch16_224", "pre-norm ViT, class token"),
    _ok("vit_small_patch16_224", "paper model"),
    _ok("vit_base_patch16_224", "paper model"),
    _ok("vit_tiny_patch16_224", "bias-free qkv (reparameterization adds the qkv bias; save/load keeps it)", qkv_bias=False),
    _ok("vit_small_patch16_224", "qk-norm: LayerNorm on q and k between qkv and Q@K^T", qk_norm=True),
    _ok("vit_medium_patch16_gap_256", "no class token, average pooling, bias-free qkv, layer scale"),
    _ok("vit_wee_patch16_reg1_gap_256", "register token, no class token, average pooling, layer scale"),
    _ok("vit_tiny_patch16_224", "class token + 4 register tokens", reg_tokens=4),
    _ok("vit_xsmall_patch16_clip_224", "pre-norm stem (norm_pre), bias-free patch embedding"),
    _ok("vit_base_patch16_clip_quickgelu_224", "QuickGELU MLP activation"),
    _ok("vit_base_patch16_siglip_gap_224", "tanh-GELU, no class token, average pooling"),
    _ok("vit_small_patch16_18x2_224", "parallel blocks (ParallelThingsBlock): every branch folded and reconstructed"),
    _ok("beit3_base_patch16_224", "LayerNorm inside attention (before proj) and inside the MLP (before fc2)"),
    _ok("deit_tiny_patch16_224", "paper model"),
    _ok("deit_small_patch16_224", "paper model"),
    _ok("deit_base_patch16_224", "paper model"),
    _ok("deit_tiny_distilled_patch16_224", "distillation token, two heads (head and head_dist both reconstructed)"),
    _ok("deit3_small_patch16_224", "layer scale, no position embedding on the class token"),
    _ok("swin_tiny_patch4_window7_224", "shifted windows, patch merging"),
    _ok("swin_small_patch4_window7_224", "paper model"),
    _ok("swin_base_patch4_window7_224", "paper model"),
    _ok("swin_s3_tiny_224", "per-stage window sizes (7, 7, 14, 7)"),
    _no("vit_base_patch16_rpn_224", "blocks.0", "ResPostBlock", "post-norm blocks: no LayerNorm before qkv/fc1"),
    _no("vit_base_patch16_xp_224", "norm_pre", "RmsNorm", "RMSNorm throughout, fused qkv+fc1 blocks (ParallelScalingBlock)"),
    _no("vit_dwee_patch16_reg1_gap_256", "blocks.0.attn", "DiffAttention", "differential attention"),
    _no("vit_base_patch16_siglip_224", "attn_pool", "AttentionPoolLatent", "attention-pooling head (global_pool='map')"),
    _no("vit_small_r26_s32_224", "patch_embed", "HybridEmbed", "CNN stem"),
    _no("vit_relpos_small_patch16_224", "", "VisionTransformerRelPos", "relative-position MLP bias in attention"),
    _no("vit_small_patch16_rope_224", "", "Eva", "rotary position embedding"),
    _no("eva02_tiny_patch14_224", "", "Eva", "rotary position embedding, SwiGLU MLP"),
    _no("beit_base_patch16_224", "", "Beit", "relative position bias, qkv via F.linear on the raw weight"),
    _no("cait_xxs24_224", "", "Cait", "talking-heads and class attention"),
    _no("swinv2_tiny_window8_256", "", "SwinTransformerV2", "cosine attention, post-norm blocks"),
    _no("swinv2_cr_tiny_ns_224", "", "SwinTransformerV2Cr", "cosine attention, post-norm blocks"),
    _no(
        "swin_tiny_patch4_window7_224",
        "layers.0.blocks.0",
        "SwinTransformerBlock",
        "192 px: window padding after norm1 breaks the exact fold",
        img_size=192,
    ),
)


def _fmt_kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v!r}`" for k, v in kwargs.items())


def render_markdown(entries: tuple[CoverageEntry, ...] = COVERAGE) -> str:
    """The README "Supported models" table (markdown, ends with a newline), from :data:`COVERAGE`."""
    lines = [
        "| timm model | variant | status | exercises / reason |",
        "|---|---|---|---|",
    ]
    for e in entries:
        if e.status == "supported":
            status, text = "supported", e.note
        else:
            path, cls = e.refused_at or ("", "")
            where = f"`{cls}` at `{path}`" if path else f"model class `{cls}`"
            status, text = "refused", f"{e.note} ({where})"
        lines.append(f"| `{e.name}` | {_fmt_kwargs(e.kwargs)} | {status} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m isvit_viz.models.coverage", description=__doc__.splitlines()[0])
    p.add_argument("--markdown", action="store_true", help="print the README 'Supported models' table")
    args = p.parse_args(argv)
    if args.markdown:
        print(render_markdown(), end="")
    else:
        for e in COVERAGE:
            print(f"{e.status:9s} {e.name} {e.kwargs or ''}")
    return 0


__all__ = ["COVERAGE", "CoverageEntry", "render_markdown"]

if __name__ == "__main__":
    raise SystemExit(main())
