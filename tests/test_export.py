"""Packed low-bit storage and model size, against hand-computed bitstreams and byte counts."""

import math

import pytest
import torch
from torch import nn

from bench.api import QuantSpec
from bench.metrics.size import fp32_size_bytes, size_breakdown, size_bytes
from bench.quant.export import pack_bits, pack_linear, pack_model, packed_nbytes, quantize_linear, unpack_bits
from bench.quant.layers import QuantLinear, WeightQuantizer, freeze, quantize_model


def _reference_stream(codes: list[int], bits: int) -> bytes:
    """The little-endian bitstream by Python integer arithmetic: code i sits at bit i*bits."""
    value = sum(c << (i * bits) for i, c in enumerate(codes))
    return value.to_bytes(math.ceil(len(codes) * bits / 8), "little")


def test_pack_bits_hand_examples():
    # 2 codes of 4 bits -> 1 byte: low nibble first
    assert bytes(pack_bits(torch.tensor([0xA, 0x3]), 4).tolist()) == b"\x3a"
    # 8 codes of 3 bits -> 3 bytes: 1,2,3,4,5,6,7,0 = 0b000_111_110_101_100_011_010_001
    packed = pack_bits(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b11010001, 0b01011000, 0b00011111]
    # 3 codes of 2 bits -> 1 byte, upper bits zero
    assert pack_bits(torch.tensor([3, 0, 2]), 2).tolist() == [0b100011]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64])
def test_pack_bits_matches_integer_reference_and_round_trips(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(bits * 100 + n))
    packed = pack_bits(codes, bits)
    assert bytes(packed.tolist()) == _reference_stream(codes.tolist(), bits)
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n).long(), codes)


def test_pack_bits_rejects_codes_outside_the_width():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_bits(torch.tensor([8]), 3)


def _layer(out, cols, spec, clip="minmax", seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(cols, out)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, cols, generator=g))
        linear.weight[0] *= 10  # outlier row
        linear.weight[1] = linear.weight[1].abs()  # all-positive row
    return QuantLinear(linear, WeightQuantizer(spec, clip=clip))


GRIDS = [("per-tensor", 16), ("per-channel", 16), ("per-group", 16)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False, "narrow"])
@pytest.mark.parametrize("granularity,group", GRIDS)
def test_unpack_equals_fake_quant_weight_exactly(bits, symmetric, granularity, group):
    # 40 columns with group 16: two full groups and a ragged last group of 8
    grid = dict(symmetric=bool(symmetric), narrow=symmetric == "narrow")
    layer = _layer(8, 40, QuantSpec(bits, granularity=granularity, group_size=group, **grid))
    packed = pack_linear(layer)
    assert torch.equal(packed.unpack(), layer.quantized_weight())
    codes = packed.int_codes()
    assert codes.min() >= packed.qmin and codes.max() <= packed.qmax
    assert packed.codes.numel() == math.ceil(8 * 40 * bits / 8)
    if symmetric:
        assert packed.zero_point is None  # nothing stored for a symmetric grid
    else:
        assert packed.zero_point.dtype == torch.uint8 and packed.zero_point.shape == packed.scale.shape
    assert packed.scale.dtype == torch.float32  # float16 would change the dequantized values
    unpacked = quantize_linear(layer)  # the kernels' view: same codes, not bit-packed
    assert torch.equal(unpacked.int_codes(), codes) and torch.equal(unpacked.unpack(), packed.unpack())
    parts = packed_nbytes(layer)  # size counting without packing must agree with real packing
    assert parts["codes"] == packed.codes.numel() and sum(parts.values()) == packed.nbytes


@pytest.mark.parametrize("clip", ["mse", "percentile"])
def test_round_trip_exact_with_clipped_frozen_and_smoothed_grids(clip):
    layer = _layer(8, 40, QuantSpec(3, granularity="per-group", group_size=16, symmetric=False), clip=clip)
    layer.input_scale = torch.rand(40, generator=torch.Generator().manual_seed(3)) + 0.5
    layer.weight_quantizer.freeze(layer.effective_weight())
    with torch.no_grad():
        layer.weight.mul_(0.9)  # weight edited on the frozen grid (GPTQ-style)
    packed = pack_linear(layer)
    assert torch.equal(packed.unpack(), layer.quantized_weight())
    assert torch.equal(packed.input_scale, layer.input_scale)


def test_packed_nbytes_by_hand():
    layer = _layer(8, 40, QuantSpec(3, granularity="per-group", group_size=16, symmetric=False))
    packed = pack_linear(layer)
    groups = 8 * 3  # ceil(40 / 16) groups per row
    assert packed.nbytes == 8 * 40 * 3 // 8 + groups * 4 + groups * 1  # codes + fp32 scales + uint8 zeros


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(40, 16)
        self.classifier = nn.Linear(16, 2)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: stored once
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("positions", torch.arange(10), persistent=False)  # rebuilt at load: not stored


def _quantized_toy():
    torch.manual_seed(0)
    model = _Toy()
    model.fc1 = QuantLinear(model.fc1, WeightQuantizer(QuantSpec(4, granularity="per-channel")))
    spec = QuantSpec(3, granularity="per-group", group_size=16, symmetric=False)
    model.fc2 = QuantLinear(model.fc2, WeightQuantizer(spec))
    return freeze(model)


def test_size_bytes_of_a_toy_model_by_hand():
    model = _quantized_toy()
    emb = 10 * 16 * 4  # also the tied head weight, counted once
    norm = 2 * 16 * 4
    fc1 = 16 * 32 * 4 // 8 + 32 * 4 + 32 * 4  # 4-bit codes + per-channel fp32 scales + fp32 bias (no zeros)
    fc2 = 16 * 40 * 3 // 8 + 16 * 3 * 5 + 16 * 4  # 3-bit codes + 48 groups x (fp32 scale + uint8 zero) + bias
    classifier = (16 * 2 + 2) * 4
    steps = 3 * 8
    assert size_bytes(model) == emb + norm + fc1 + fc2 + classifier + steps
    parts = size_breakdown(model)
    assert parts["codes"] == 256 + 240 and parts["scales"] == 128 + 192 and parts["zero_points"] == 48
    fp32 = emb + norm + (16 * 32 + 32) * 4 + (40 * 16 + 16) * 4 + classifier + steps
    assert fp32_size_bytes(model) == fp32
    assert fp32_size_bytes(_Toy()) == fp32  # quantizer state is not part of the float model


def test_size_of_a_half_precision_remainder_counts_its_own_dtype():
    model = _Toy().half()
    assert size_bytes(model) == (10 * 16 + 2 * 16 + 16 * 32 + 32 + 40 * 16 + 16 + 16 * 2 + 2) * 2 + 3 * 8
    assert fp32_size_bytes(model) == (10 * 16 + 2 * 16 + 16 * 32 + 32 + 40 * 16 + 16 + 16 * 2 + 2) * 4 + 3 * 8


def test_input_scale_is_stored_and_unquantized_quantlinear_counts_as_float():
    model = _quantized_toy()
    model.fc2.input_scale = torch.ones(40)
    assert size_breakdown(model)["input_scales"] == 40 * 4
    plain = nn.Sequential(QuantLinear(nn.Linear(4, 4), nn.Identity()))  # no grid: stays float
    assert size_bytes(plain) == (16 + 4) * 4


class _StaticAct(nn.Module):
    """An activation quantizer with calibrated state (a static range): stored with the model."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(1, 1))
        self.register_buffer("zero_point", torch.zeros(1, 1))
        self.register_buffer("scratch", torch.ones(5), persistent=False)

    def forward(self, x):
        return x


def test_activation_quantizer_state_is_stored_but_not_float_model():
    model = _quantized_toy()
    before, fp32 = size_bytes(model), fp32_size_bytes(model)
    model.fc1.act_quantizer = _StaticAct()
    assert size_breakdown(model)["act_quantizers"] == 2 * 4
    assert size_bytes(model) == before + 8 and fp32_size_bytes(model) == fp32


def test_learned_step_quantizer_is_stored_as_packed_scales():
    from bench.quant.lsq import LSQQuantizer

    linear = nn.Linear(32, 16)
    layer = QuantLinear(linear, LSQQuantizer(QuantSpec(4, granularity="per-group", group_size=16), linear.weight))
    # codes + one fp32 step per group (the step Parameter is not counted twice) + fp32 bias
    assert size_bytes(nn.Sequential(layer)) == 16 * 32 // 2 + 16 * 2 * 4 + 16 * 4


def test_pack_model_and_compression_of_a_quantized_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    freeze(quantize_model(model, QuantSpec(4, granularity="per-group", group_size=32)))
    packed = pack_model(model)
    assert sorted(packed) == ["0", "2"]
    per_layer = 64 * 64 // 2 + 64 * 2 * 4 + 64 * 4  # codes + 2 fp32 scales per row + fp32 bias
    assert size_bytes(model) == 2 * per_layer
    assert fp32_size_bytes(model) / size_bytes(model) == pytest.approx(2 * (64 * 64 + 64) * 4 / (2 * per_layer))
