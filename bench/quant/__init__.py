"""Quantization primitives shared by every method: one implementation of each."""

from bench.quant.layers import (
    DEFAULT_KEEP_FP,
    QUANT_LAYERS,
    DynamicActQuantizer,
    OutlierQuantLinear,
    QuantEmbedding,
    QuantLinear,
    WeightQuantizer,
    freeze,
    quantize_model,
    replace_module,
    summarize,
)
from bench.quant.lsq import LSQQuantizer
from bench.quant.uniform import (
    CLIPS,
    QParams,
    compute_qparams,
    dequantize_int,
    fake_quantize,
    group_view,
    int_range,
    quantize_int,
    range_qparams,
    ungroup,
)

__all__ = [
    "DEFAULT_KEEP_FP",
    "DynamicActQuantizer",
    "LSQQuantizer",
    "OutlierQuantLinear",
    "QParams",
    "QUANT_LAYERS",
    "QuantEmbedding",
    "QuantLinear",
    "WeightQuantizer",
    "fake_quantize",
    "group_view",
    "int_range",
    "CLIPS",
    "compute_qparams",
    "dequantize_int",
    "quantize_int",
    "range_qparams",
    "ungroup",
    "freeze",
    "quantize_model",
    "replace_module",
    "summarize",
]
