"""``torch.compile`` for the reconstruction step, with an eager fallback.

A reconstruction unit runs the same forward and backward hundreds to thousands of times on batches of
one shape, which is what compilation pays off on: Inductor fuses the fake-quant element-wise work with
its neighbours (GELU, residual adds, the straight-through masks) into a few loops, so less time goes to
anything but the matrix products. It costs one compilation per unit (seconds on a CPU; units of the
same structure reuse Inductor's cache) and needs a C++ compiler on the CPU (Triton on a GPU).

Compiled steps are not bit-identical to eager ones (fused kernels reorder float operations); the
random masks of QDrop keep eager's generator (``fallback_random``), so a seed draws the same masks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

#: Inductor options: eager's random generator (QDrop's masks stay those of the seed).
COMPILE_OPTIONS: dict[str, object] = {"fallback_random": True}
#: Dynamo compiles one graph per unit (the blocks share their class's ``forward`` but differ in guarded
#: constants such as timm's drop-path rate) and per stage; its default limit of 8 per code object would
#: silently send every later unit back to eager.
RECOMPILE_LIMIT = 256


def compiled(unit: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``unit``'s forward compiled with ``torch.compile``; eager (with a warning) if compiling fails.

    The returned callable compiles on its first call. A failure there (no C++ compiler, an operator
    Inductor cannot lower) is reported once and every later call runs ``unit`` eagerly; an error raised
    by ``unit`` itself is re-raised by the eager call, so it is never hidden.
    """
    fast = torch.compile(unit, dynamic=False, options=COMPILE_OPTIONS)
    state = {"eager": False}

    def forward(x: torch.Tensor) -> torch.Tensor:
        if state["eager"]:
            return unit(x)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, accumulated_recompile_limit=4 * RECOMPILE_LIMIT):
                return fast(x)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back; eager re-raises real errors
            state["eager"] = True
            warnings.warn(
                f"torch.compile failed for {type(unit).__name__} ({type(err).__name__}: {str(err)[:200]}); "
                "running this unit eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            return unit(x)

    return forward
