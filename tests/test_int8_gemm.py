"""The int8 x int8 GEMM path of WxA8 layers against the fake-quant layers and models it times."""

import copy

import pytest
import torch
from tiny import tiny_bert
from torch import nn

from bench.api import QuantSpec
from bench.metrics.latency import model_latency
from bench.quant.act_static import StaticActQuantizer
from bench.quant.export import quantize_linear
from bench.quant.kernels import (
    INT8_GEMM_RTOL,
    Int8GemmLinear,
    SimulatedLinear,
    act_codes,
    build_latency_model,
    kernel_for,
    kernel_label,
)
from bench.quant.layers import (
    DynamicActQuantizer,
    OutlierQuantLinear,
    QuantLinear,
    WeightQuantizer,
    freeze,
    quantize_model,
)

# end to end through a model: an activation within float rounding of a code boundary may round to the other
# code in one of the two models (see bench.quant.kernels); none does on the tiny BERT (measured 2.5e-7)
MODEL_RTOL = 1e-4


def _layer(out, cols, spec, *, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(cols, out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, cols, generator=g) * 0.05)
        linear.weight[1] = linear.weight[1].abs()  # all-positive row: asymmetric zero point 0, negative sym scale
        linear.weight[2] = -linear.weight[2].abs()  # all-negative row: asymmetric zero point 2^b - 1
        if bias:
            linear.bias.copy_(torch.randn(out, generator=g))
    act = DynamicActQuantizer(spec.a_bits) if spec.a_bits else None
    return QuantLinear(linear, WeightQuantizer(spec), act)


def _tokens(n, cols, seed=1):
    x = torch.randn(n, cols, generator=torch.Generator().manual_seed(seed)) * 2
    x[0] = x[0].abs() + 3  # an all-positive token: its zero point is 0 and most codes are near 255
    return x


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tokens", [1, 3, 20])
@pytest.mark.parametrize("granularity", ["per-channel", "per-tensor"])
@pytest.mark.parametrize("symmetric", [True, False, "narrow"])
@pytest.mark.parametrize("bits", [2, 4, 7, 8])
def test_int8_gemm_matches_fake_quant_layer(bits, symmetric, granularity, tokens):
    spec = QuantSpec(bits, a_bits=8, granularity=granularity, symmetric=bool(symmetric), narrow=symmetric == "narrow")
    layer = _layer(24, 40, spec)  # in/out features that are not multiples of 8 or 16
    fast = kernel_for(layer)
    assert isinstance(fast, Int8GemmLinear) and fast.kernel == "int8-gemm"
    assert fast.split == (bits == 8)  # 8-bit weight codes with 8-bit activation codes would saturate int16 pairs
    x = _tokens(tokens, 40)
    assert _rel(fast(x), layer(x)) < INT8_GEMM_RTOL


def _integer_reference(layer, x):
    """sx * sw * (u - za) @ (q - zw)^T in float64 from the integer codes: the arithmetic the kernel must do."""
    u, sx, za = act_codes(layer.act_quantizer, x)
    qw = quantize_linear(layer)
    zw = 0 if qw.zero_point is None else qw.zero_point.double()
    w = (qw.int_codes().double() - zw) * qw.scale.double()
    return ((u.double() - za.double()) @ w.T) * sx.double()


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (7, True), (7, False), (4, False)])
def test_extreme_codes_are_exact(bits, symmetric):
    """Tokens whose codes sit near 255 against weight rows at the grid's extremes: the largest pair sums an
    int8 GEMM can meet (W7 is the widest grid that needs no split; W8 needs it)."""
    layer = _layer(32, 64, QuantSpec(bits, a_bits=8, symmetric=symmetric))
    with torch.no_grad():
        layer.weight[3] = 0.1  # one value repeated: every code of the row at the grid's extreme
        layer.weight[4] = -0.1
    x = torch.rand(4, 64, generator=torch.Generator().manual_seed(2)) * 0.1 + 1.0  # codes 231..255
    ref = _integer_reference(layer, x)
    y = kernel_for(layer)(x)
    assert _rel(y.double(), ref) < 1e-6
    assert _rel(y, layer(x)) < INT8_GEMM_RTOL


def test_activation_codes_are_the_fake_quantizers():
    act = DynamicActQuantizer(8)
    x = _tokens(5, 48)
    u, sx, za = act_codes(act, x)
    assert u.min() >= 0 and u.max() <= 255 and torch.equal(u, u.round())
    assert sx.shape == za.shape == (5, 1)
    torch.testing.assert_close((u - za) * sx, act(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_static_per_tensor_activations(symmetric):
    layer = _layer(32, 48, QuantSpec(4), bias=True)
    static = StaticActQuantizer(8, symmetric=symmetric)
    static.observe(torch.randn(16, 48, generator=torch.Generator().manual_seed(3)))
    static.freeze()
    layer.act_quantizer = static
    fast = kernel_for(layer)
    assert isinstance(fast, Int8GemmLinear)
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(4)) * 2  # partly outside the range: clipped
    assert _rel(fast(x) - layer.bias, layer(x) - layer.bias) < INT8_GEMM_RTOL
    layer.act_quantizer = StaticActQuantizer(8)  # not calibrated: no grid to serve
    assert isinstance(kernel_for(layer), SimulatedLinear)


def test_smoothed_layer_quantizes_x_over_s():
    layer = _layer(32, 64, QuantSpec(4, a_bits=8, symmetric=False))
    layer.input_scale = torch.rand(64, generator=torch.Generator().manual_seed(5)) + 0.5
    fast = kernel_for(layer)
    x = _tokens(7, 64)
    assert isinstance(fast, Int8GemmLinear) and _rel(fast(x), layer(x)) < INT8_GEMM_RTOL


def test_layers_the_int8_gemm_does_not_serve_stay_simulated():
    grouped = _layer(32, 64, QuantSpec(4, a_bits=8, granularity="per-group", group_size=32))
    outlier = OutlierQuantLinear(_layer(32, 64, QuantSpec(4, a_bits=8)), torch.tensor([3, 9]), dim=1)
    for layer, why in [(grouped, "one weight scale per row only"), (outlier, "float slices multiply Q(x)")]:
        fast = kernel_for(layer)
        assert isinstance(fast, SimulatedLinear), why
        x = _tokens(3, 64)
        assert torch.equal(fast(x), layer(x))


def test_copy_repacks_the_weight():
    """oneDNN's packed weight cannot be copied: a deep copy packs its own (timing copies models)."""
    layer = _layer(24, 40, QuantSpec(4, a_bits=8))
    fast = kernel_for(layer)
    x = _tokens(3, 40)
    y = fast(x)
    assert torch.equal(copy.deepcopy(fast)(x), y)


def _layer_inputs(model, batch):
    """Each QuantLinear's input and output in one forward of the fake-quant model."""
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    ]
    with torch.no_grad():
        logits = model(**batch).logits
    for h in hooks:
        h.remove()
    return logits, seen


@pytest.mark.parametrize(
    "spec,kernels,label",
    [
        (QuantSpec(4, a_bits=8), {"int8-gemm": 13, "fp32": 1}, "int8-gemm"),
        (QuantSpec(2, a_bits=8), {"int8-gemm": 13, "fp32": 1}, "int8-gemm"),
        (QuantSpec(8, a_bits=8), {"int8-gemm": 13, "fp32": 1}, "int8-gemm"),
        (QuantSpec(4, a_bits=8, symmetric=False), {"int8-gemm": 13, "fp32": 1}, "int8-gemm"),
        (QuantSpec(4, a_bits=8, granularity="per-group", group_size=16), {"simulated": 13, "fp32": 1}, "simulated"),
    ],
)
def test_tiny_bert_on_the_int8_gemm(spec, kernels, label):
    model = freeze(quantize_model(tiny_bert(), spec))
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[:2, 11:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    ref, seen = _layer_inputs(model, batch)
    fast, counts = build_latency_model(model)
    assert counts == kernels and kernel_label(counts) == label
    for name, (x, y) in seen.items():  # every layer on the fake-quant model's own inputs
        with torch.no_grad():
            assert _rel(fast.get_submodule(name)(x), y) < INT8_GEMM_RTOL, name
    with torch.no_grad():
        assert _rel(fast(**batch).logits, ref) < MODEL_RTOL


def test_minilm_shaped_w4a8_latency_names_the_int8_gemm():
    """MiniLM's shapes (hidden 384, MLP 1536, 12 heads; 2 layers, random): the row's kernel is the int8 GEMM."""
    config = dict(hidden_size=384, intermediate_size=1536, num_attention_heads=12, max_position_embeddings=64)
    model = freeze(quantize_model(tiny_bert(**config), QuantSpec(4, a_bits=8)))
    ids = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(7))
    latency = model_latency(
        model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, warmup=1, min_run_time=0.01
    )
    assert latency["kernel"] == "int8-gemm" and latency["kernels"] == {"int8-gemm": 13, "fp32": 1}
