"""isvit_viz: post-training quantization of vision transformers (I&S-ViT) and its analyses.

Top-level API::

    import isvit_viz as iv
    model, splits = iv.load_embedded("vit")
    iv.evaluate(model, splits.test())
    res = iv.quantize(model, "isvit", w_bits=4, a_bits=4, calib=splits.calib(1024))
    iv.save_quantized(res, "w4a4.pt"); q = iv.load_quantized("w4a4.pt")
"""

from __future__ import annotations

from ._version_guard import check_timm_version

check_timm_version()

from . import analysis, experiments, paper  # noqa: E402
from .calib.pipeline import QuantResult, quantize  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .models.embedded import load_embedded  # noqa: E402
from .models.support import UnsupportedModelError  # noqa: E402
from .serialization import load_quantized, save_quantized  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "QuantResult",
    "UnsupportedModelError",
    "analysis",
    "__version__",
    "evaluate",
    "experiments",
    "load_embedded",
    "load_quantized",
    "paper",
    "quantize",
    "save_quantized",
]
