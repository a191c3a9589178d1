"""Capture post-softmax attention maps from FP or quantized timm models, streamed into histograms."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

#: Default log-spaced histogram edges: 10^-10 .. 1 (values below the first edge land in an underflow bin).
DEFAULT_EDGES = torch.logspace(-10, 0, 121, dtype=torch.float64)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention module with an ``attn_drop`` (post-softmax) in forward order."""
    mods = [(n, m) for n, m in model.named_modules() if hasattr(m, "attn_drop") and hasattr(m, "qkv")]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no timm attention modules to capture")
    for _, m in mods:
        if getattr(m, "fused_attn", False):
            m.fused_attn = False  # fused SDPA never materialises the softmax
    return mods


@dataclass
class AttentionStats:
    """Histograms and summary statistics of post-softmax probabilities, per layer and head.

    Attributes:
        layer_names: attention module paths, index = layer.
        edges: histogram bin edges (float64, [bins + 1]).
        counts: [layers, heads, bins + 2] int64; bin 0 counts values below ``edges[0]`` (incl. exact 0),
            the last bin values above ``edges[-1]``.
        row_max_mean: mean over rows (query tokens) of the row maximum, per layer.
        frac_below_1e3: share of probabilities below 1e-3, per layer.
        samples: per layer, a fixed-seed random subsample of the probabilities (for fitting quantizers).
    """

    layer_names: list[str]
    edges: torch.Tensor
    counts: torch.Tensor
    row_max_mean: torch.Tensor
    frac_below_1e3: torch.Tensor
    samples: list[torch.Tensor] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    @property
    def n_heads(self) -> int:
        return int(self.counts.shape[1])

    def n_values(self, layer: int | None = None) -> int:
        return int(self.histogram(layer).sum())

    def check_layer(self, layer: int | None) -> None:
        if layer is not None and not (isinstance(layer, int) and 0 <= layer < self.n_layers):
            raise ValueError(f"layer must be in [0, {self.n_layers - 1}] or None (pooled), got {layer!r}")

    def check_head(self, head: int | None) -> None:
        if head is not None and not (isinstance(head, int) and 0 <= head < self.n_heads):
            raise ValueError(f"head must be in [0, {self.n_heads - 1}] or None (pooled), got {head!r}")

    def histogram(self, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """Counts [bins + 2] for one layer/head, or pooled over all (``None``)."""
        self.check_layer(layer)
        self.check_head(head)
        c = self.counts if layer is None else self.counts[layer : layer + 1]
        c = c if head is None else c[:, head : head + 1]
        return c.sum((0, 1))

    def sample(self, layer: int | None = None) -> torch.Tensor:
        """The stored probability subsample of one layer (or all layers concatenated)."""
        self.check_layer(layer)
        if not self.samples:
            raise ValueError("no samples were stored (capture with sample_per_layer > 0)")
        return torch.cat(self.samples) if layer is None else self.samples[layer]


@torch.no_grad()
def capture_attention(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    edges: torch.Tensor | None = None,
    sample_per_layer: int = 200_000,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> AttentionStats:
    """Run ``model`` over ``images`` and accumulate post-softmax statistics layer by layer.

    Memory stays bounded: each batch's maps are binned and subsampled immediately (``sample_per_layer``
    values per layer are kept, drawn uniformly with a fixed seed across all batches).
    """
    from ..utils import resolve_device

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        raise ValueError("images must be a non-empty tensor [N, C, H, W]")
    dev = resolve_device(device, model)
    mods = attention_modules(model)
    edges = (DEFAULT_EDGES if edges is None else edges).double()
    nb = len(edges) + 1
    state: dict[int, dict] = {}
    gen = torch.Generator().manual_seed(seed)
    n_batches = (len(images) + batch_size - 1) // batch_size
    per_batch = max(1, sample_per_layer // n_batches) if sample_per_layer > 0 else 0

    def make_hook(i: int):
        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            p = out.detach().float()
            heads = p.shape[1]
            st = state.setdefault(
                i,
                {"counts": torch.zeros(heads, nb, dtype=torch.long), "rowmax": 0.0, "rows": 0, "below": 0, "n": 0, "samples": []},
            )
            flat = p.transpose(0, 1).reshape(heads, -1).cpu()
            idx = torch.bucketize(flat.double(), edges, right=True)  # 0 = below edges[0]
            st["counts"] += torch.stack([torch.bincount(idx[h], minlength=nb) for h in range(heads)])
            rm = p.amax(-1)
            st["rowmax"] += float(rm.sum())
            st["rows"] += rm.numel()
            st["below"] += int((p < 1e-3).sum())
            st["n"] += p.numel()
            if per_batch:
                all_vals = flat.flatten()
                pick = torch.randint(0, all_vals.numel(), (min(per_batch, all_vals.numel()),), generator=gen)
                st["samples"].append(all_vals[pick])

        return hook

    handles = [m.attn_drop.register_forward_hook(make_hook(i)) for i, (_, m) in enumerate(mods)]
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(images), batch_size):
            model(images[s : s + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    layers = sorted(state)
    max_heads = max(state[i]["counts"].shape[0] for i in layers)
    counts = torch.zeros(len(layers), max_heads, nb, dtype=torch.long)
    for i in layers:
        counts[i, : state[i]["counts"].shape[0]] = state[i]["counts"]
    return AttentionStats(
        layer_names=[mods[i][0] for i in layers],
        edges=edges,
        counts=counts,
        row_max_mean=torch.tensor([state[i]["rowmax"] / state[i]["rows"] for i in layers]),
        frac_below_1e3=torch.tensor([state[i]["below"] / state[i]["n"] for i in layers]),
        samples=[torch.cat(state[i]["samples"]) if state[i]["samples"] else torch.empty(0) for i in layers],
    )
