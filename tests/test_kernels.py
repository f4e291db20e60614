"""Real CPU kernels against the fake-quant layers they replace."""

import pytest
import torch
from torch import nn

from bench.api import QuantSpec
from bench.quant.export import quantize_linear
from bench.quant.kernels import (
    KERNEL_RTOL,
    Int4PackLinear,
    Int8PackLinear,
    SimulatedLinear,
    build_latency_model,
    int4_group,
    kernel_for,
    kernel_label,
)
from bench.quant.layers import DynamicActQuantizer, QuantLinear, WeightQuantizer, freeze, quantize_model


def _layer(out, cols, spec, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(cols, out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, cols, generator=g) * 0.05)
        linear.weight[1] = linear.weight[1].abs()  # all-positive row: asymmetric zero point at the edge
        if bias:
            linear.bias.copy_(torch.randn(out, generator=g))
    return QuantLinear(linear, WeightQuantizer(spec))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = [
    # bits, granularity, in_features, group_size, expected kernel, expected int4 kernel group
    (4, "per-group", 96, 64, "int4pack", 32),  # ragged last group of 32
    (4, "per-group", 128, 64, "int4pack", 64),
    (4, "per-channel", 64, 128, "int4pack", 64),
    (4, "per-tensor", 96, 128, "int4pack", 32),
    (3, "per-group", 128, 64, "int4pack", 64),  # 3- and 2-bit codes in the kernel's 4-bit slots
    (2, "per-channel", 64, 128, "int4pack", 64),
    (8, "per-channel", 96, 128, "int8pack", None),
    (8, "per-tensor", 48, 128, "int8pack", None),
]


@pytest.mark.parametrize("symmetric", [True, False, "narrow"])
@pytest.mark.parametrize("bits,granularity,cols,group,kernel,kgroup", CASES)
def test_real_kernel_matches_fake_quant_layer(bits, granularity, cols, group, kernel, kgroup, symmetric):
    grid = dict(symmetric=bool(symmetric), narrow=symmetric == "narrow")
    spec = QuantSpec(bits, granularity=granularity, group_size=group, **grid)
    layer = _layer(32, cols, spec)
    x = torch.randn(2, 3, cols, generator=torch.Generator().manual_seed(1))
    fast = kernel_for(layer)
    assert fast.kernel == kernel and getattr(fast, "group", None) == kgroup
    y = fast(x)
    assert y.shape == (2, 3, 32) and y.dtype == torch.float32
    assert _rel(y, layer(x)) < KERNEL_RTOL


def test_smoothed_layer_on_a_real_kernel():
    layer = _layer(32, 64, QuantSpec(4, granularity="per-group", group_size=32, symmetric=False))
    layer.input_scale = torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.5
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    fast = kernel_for(layer)
    assert isinstance(fast, Int4PackLinear) and _rel(fast(x), layer(x)) < KERNEL_RTOL


def _bf16_exact_layer(bits, symmetric, granularity, cols=64, group=32):
    """A frozen grid whose scales are powers of two: bfloat16 holds scales, zeros and weights exactly."""
    layer = _layer(
        16, cols, QuantSpec(bits, granularity=granularity, group_size=group, symmetric=symmetric), bias=False
    )
    wq = layer.weight_quantizer
    wq.freeze(layer.weight)
    g = torch.Generator().manual_seed(4)
    wq.scale = 2.0 ** -torch.randint(3, 7, wq.scale.shape, generator=g).float()
    if not symmetric:
        wq.zero_point = torch.randint(0, 2**bits, wq.zero_point.shape, generator=g).float()
    return layer


def test_asymmetric_int8_zero_point_correction_keeps_precision():
    """The int8 kernel has no zero point: q - 128 runs on it and rowsum(x) * (zp - 128) * s is subtracted.
    The kernel's bf16 output rounding then scales with |zp - 128|: bounded here for realistic weights."""
    spec = QuantSpec(8, granularity="per-channel", symmetric=False)
    layer = _layer(32, 64, spec)
    with torch.no_grad():
        layer.weight[2] = layer.weight[2].abs() + 0.05  # all-positive row: zero point 0, codes 0..255
        layer.weight[3] = -layer.weight[3].abs() - 0.05  # all-negative row: zero point 255
    assert set(quantize_linear(layer).zero_point[[2, 3], 0].tolist()) == {0, 255}
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(7))
    fast = kernel_for(layer)
    assert isinstance(fast, Int8PackLinear) and fast.zero_correction is not None
    assert _rel(fast(x), layer(x)) < KERNEL_RTOL


@pytest.mark.parametrize(
    "bits,granularity,symmetric",
    [
        (4, "per-group", True),
        (4, "per-group", False),
        (4, "per-channel", False),
        (3, "per-group", False),
        (2, "per-channel", True),
        (8, "per-channel", True),
    ],
)
def test_grid_maps_onto_kernel_format_exactly(bits, granularity, symmetric):
    """With bf16-exact scales and inputs, only the kernel's bf16 output rounding remains: the mapping
    of our (q - zp) * s onto the kernel's format (int4: (u - 8) * scale + zero) loses nothing.
    (Asymmetric int8 subtracts its zero-point term after that rounding: tested separately.)"""
    layer = _bf16_exact_layer(bits, symmetric, granularity)
    x = torch.randint(-8, 8, (4, 64), generator=torch.Generator().manual_seed(5)).float() / 4  # exact in bf16
    y = kernel_for(layer)(x)
    ref = layer(x)
    torch.testing.assert_close(y, ref, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize(
    "spec,out,cols,why",
    [
        (QuantSpec(6, granularity="per-group", group_size=32), 32, 64, "6-bit per-group: no kernel"),
        (QuantSpec(4, granularity="per-group", group_size=16), 32, 64, "kernel groups are 32..256"),
        (QuantSpec(4, granularity="per-group", group_size=64), 32, 80, "80 columns: no kernel group divides them"),
        (QuantSpec(4), 24, 64, "out_features must be a multiple of 16"),
        (QuantSpec(8, granularity="per-group", group_size=32), 32, 64, "int8 kernel is per-channel only"),
        (QuantSpec(8), 32, 40, "int8 kernel crashes unless in_features % 16 == 0"),
        (QuantSpec(8, a_bits=8, granularity="per-group", group_size=32), 32, 64, "int8 GEMM: one scale per row"),
    ],
)
def test_layers_without_a_kernel_stay_simulated_and_exact(spec, out, cols, why):
    layer = _layer(out, cols, spec)
    if spec.a_bits:
        layer.act_quantizer = DynamicActQuantizer(spec.a_bits)
    fast = kernel_for(layer)
    assert isinstance(fast, SimulatedLinear), why
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(6))
    assert torch.equal(fast(x), layer(x))


def test_int4_kernel_group_choice():
    def group_for(cols, granularity, group_size):
        return int4_group(
            quantize_linear(_layer(16, cols, QuantSpec(4, granularity=granularity, group_size=group_size)))
        )

    assert group_for(576, "per-group", 128) == 64  # SmolLM2 hidden: 4 groups of 128 + a ragged 64
    assert group_for(1536, "per-group", 128) == 128  # SmolLM2 MLP
    assert group_for(576, "per-channel", 128) == 64
    assert group_for(576, "per-group", 32) == 32
    assert group_for(512, "per-group", 256) == 256
    assert group_for(48, "per-channel", 128) is None


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 64))
        self.classifier = nn.Linear(64, 3)

    def forward(self, x):
        return self.classifier(self.body(x))


@pytest.mark.parametrize(
    "spec,kernels,label",
    [
        (QuantSpec(4, granularity="per-group", group_size=32), {"int4pack": 2, "fp32": 1}, "int4pack"),
        (QuantSpec(8), {"int8pack": 2, "fp32": 1}, "int8pack"),
        (QuantSpec(3), {"int4pack": 2, "fp32": 1}, "int4pack"),
        (QuantSpec(6), {"simulated": 2, "fp32": 1}, "simulated"),
    ],
)
def test_build_latency_model_counts_kernels_and_keeps_the_original(spec, kernels, label):
    torch.manual_seed(0)
    model = freeze(quantize_model(_Net(), spec))
    x = torch.randn(4, 64)
    ref = model(x)
    fast, counts = build_latency_model(model)
    assert counts == kernels and kernel_label(counts) == label
    assert isinstance(model.body[0], QuantLinear)  # the evaluated model is untouched
    assert type(fast.classifier) is nn.Linear
    assert fast.classifier.weight is model.classifier.weight  # shared read only, not a second copy of the model
    assert _rel(fast(x), ref) < KERNEL_RTOL
    assert torch.equal(model(x), ref)


def test_model_labels():
    assert kernel_label(build_latency_model(_Net())[1]) == "fp32"
    model = _Net()
    model.body[0] = QuantLinear(model.body[0], WeightQuantizer(QuantSpec(4, granularity="per-group", group_size=32)))
    model.body[2] = QuantLinear(model.body[2], WeightQuantizer(QuantSpec(6)))
    fast, counts = build_latency_model(model, inplace=True)
    assert counts == {"int4pack": 1, "simulated": 1, "fp32": 1} and kernel_label(counts) == "simulated"
    assert isinstance(model.body[0], Int4PackLinear) and fast is model
    assert kernel_label({"int4pack": 3, "int8pack": 1}) == "int4pack+int8pack"
    assert isinstance(kernel_for(_layer(32, 64, QuantSpec(8))), Int8PackLinear)
