"""One grid family for every method: at b bits each min-max method's rows use all 2^b levels.

The old symmetric grid (scale = max|w| / (2^(b-1) - 1)) never used the code -2^(b-1): ternary at 2 bits for
RTN, GPTQ, AWQ, SmoothQuant and the min-max students of ZSAQ/GAN/PreQuant, while LSQ-based methods learned
steps over 4 levels. These tests count the stored integer codes (what export packs and kernels run) per row.
"""

import copy

import pytest
import torch
from bench.methods.awq import AWQ
from bench.methods.gptq import GPTQ
from bench.methods.rtn import RTN
from bench.methods.smoothquant import SmoothQuant
from tiny import OneLinear
from torch import nn

from bench.api import MethodContext, QuantSpec
from bench.quant import QuantLinear, WeightQuantizer, freeze, quantize_model
from bench.quant.export import quantize_linear

IN, OUT = 1024, 32


def _gaussian_model() -> OneLinear:
    torch.manual_seed(0)
    fc = nn.Linear(IN, OUT)
    with torch.no_grad():
        fc.weight.normal_()
    return OneLinear(fc)


def _context() -> MethodContext:
    x = torch.randn(256, IN, generator=torch.Generator().manual_seed(1))
    return MethodContext(task=None, tokenizer=None, seed=0, keep_fp=(), calibration=lambda n: [{"x": x}])


def _minmax_student(model, spec, context):
    """What zsaq/gan students and PreQuant's frozen grid build: quantize_model's min-max WeightQuantizer."""
    return freeze(quantize_model(model, spec, keep_fp=(), weight_quantizer=WeightQuantizer))


METHODS = {
    "rtn": lambda m, s, c: RTN().quantize(m, s, c),
    "gptq": lambda m, s, c: GPTQ().quantize(m, s, c),
    "awq": lambda m, s, c: AWQ().quantize(m, s, c),
    "smoothquant": lambda m, s, c: SmoothQuant().quantize(m, s, c),
    "minmax-student": _minmax_student,
}


def _levels_per_row(model) -> torch.Tensor:
    layer = model.fc
    assert isinstance(layer, QuantLinear)
    codes = quantize_linear(layer).int_codes()
    return torch.tensor([len(torch.unique(row)) for row in codes])


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_min_max_method_uses_all_levels(method, bits):
    model = METHODS[method](copy.deepcopy(_gaussian_model()), QuantSpec(bits), _context())
    levels = _levels_per_row(model)
    assert levels.max() <= 2**bits
    assert levels.median() == 2**bits, levels.tolist()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_narrow_grid_is_an_explicit_option(method):
    model = METHODS[method](copy.deepcopy(_gaussian_model()), QuantSpec(2, narrow=True), _context())
    assert _levels_per_row(model).max() == 3  # ternary: what some BERT papers call 2-bit
    assert QuantSpec(2, narrow=True).label() == "W2A32 narrow" and QuantSpec(2).levels == 4
