"""A bit-exact integer reference of SULQ attention (levels ``2^e - eta``: ``P V`` by shifts).

Modules (one idea each): :mod:`.fixed_point` (scales as multiplier + shift, the final rescale),
:mod:`.softmax` (exp-table integer softmax), :mod:`.sulq_codes` (SULQ exponents by a threshold
table), :mod:`.shift` (shift-and-accumulate), :mod:`.attention` (the integer attention core),
:mod:`.gemm` (the int8-GEMM variant and its exact relation), :mod:`.export` (integer parameters,
saved with ``save_quantized``), :mod:`.module` (swap into a model), :mod:`.ops` (operation counts),
:mod:`.compare` (SQNR, end-to-end), :mod:`.timing`, :mod:`.results` (the committed benchmark).

Typical use::

    from isvit_viz import integer
    with integer.use_integer_attention(res.model) as m:
        logits = m(images)
"""

from .attention import IntegerParts, integer_attention_core
from .compare import end_to_end, layer_report, sqnr_db
from .export import (
    IntegerAttentionParams,
    OutputRescale,
    UniformParams,
    export_attention,
    export_model,
    load_integer_params,
    save_integer_quantized,
)
from .gemm import gemm_attention_core, int8_frac_bits
from .module import IntegerAttention, IntegerSwap, use_integer_attention
from .ops import attention_op_counts, model_op_counts
from .results import load_results
from .softmax import exp_table, integer_softmax
from .sulq_codes import ExponentTable, count_mismatches, exponent_table
from .timing import time_attention

__all__ = [
    "ExponentTable",
    "IntegerAttention",
    "IntegerAttentionParams",
    "IntegerParts",
    "IntegerSwap",
    "OutputRescale",
    "UniformParams",
    "attention_op_counts",
    "count_mismatches",
    "end_to_end",
    "exp_table",
    "export_attention",
    "export_model",
    "exponent_table",
    "gemm_attention_core",
    "int8_frac_bits",
    "integer_attention_core",
    "integer_softmax",
    "layer_report",
    "load_integer_params",
    "load_results",
    "model_op_counts",
    "save_integer_quantized",
    "sqnr_db",
    "time_attention",
    "use_integer_attention",
]
