"""Quantization primitives shared by every method: one implementation of each."""

from bench.quant.layers import (
    DEFAULT_KEEP_FP,
    DynamicActQuantizer,
    QuantLinear,
    WeightQuantizer,
    quantize_model,
    summarize,
)
from bench.quant.uniform import QParams, fake_quantize, group_view, int_range, minmax_qparams

__all__ = [
    "DEFAULT_KEEP_FP",
    "DynamicActQuantizer",
    "QParams",
    "QuantLinear",
    "WeightQuantizer",
    "fake_quantize",
    "group_view",
    "int_range",
    "minmax_qparams",
    "quantize_model",
    "summarize",
]
