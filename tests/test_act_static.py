"""Static per-tensor activation quantization against torch's fake-quant op and a direct formula."""

import pytest
import torch
from torch import nn

from bench.api import QuantSpec
from bench.quant.act_static import StaticActQuantizer, calibrate_static_activations
from bench.quant.layers import DynamicActQuantizer, QuantLinear, quantize_model


def _batches(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 7, 16, generator=g) * (i + 1) + 0.3 for i in range(n)]


def _formula(x, lo, hi, bits, symmetric):
    """Scale/zero point by hand, then torch.fake_quantize_per_tensor_affine rounds and clamps."""
    if symmetric:
        # zero point 0, the signed extreme on the code -2^(b-1) (a negative scale when it is the maximum:
        # computed as a positive scale on the negated input, so torch never sees a negative scale)
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        sign = 1.0 if -lo >= hi else -1.0
        scale = max(-lo, hi) / 2 ** (bits - 1)
        return sign * torch.fake_quantize_per_tensor_affine(x * sign, scale, 0, qmin, qmax), sign * scale
    else:
        qmin, qmax = 0, 2**bits - 1
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / (qmax - qmin)
        zero = int(qmin - round(lo / scale))
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax), scale


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_calibrated_range_and_rounding_match_torch(bits, symmetric):
    batches = _batches()
    q = StaticActQuantizer(bits, symmetric=symmetric)
    for x in batches:
        q.observe(x)
    q.freeze()
    union = torch.cat([x.flatten() for x in batches])
    test = torch.randn(4, 16) * 3  # includes values outside the calibrated range: clipped, not re-ranged
    ref, scale = _formula(test, union.min().item(), union.max().item(), bits, symmetric)
    assert q.scale.item() == pytest.approx(scale, rel=1e-6)
    torch.testing.assert_close(q(test), ref, rtol=0, atol=1e-5)


def test_frozen_range_does_not_follow_new_inputs():
    q = StaticActQuantizer(8)
    q.observe(torch.tensor([-1.0, 0.5, 0.75]))
    q.freeze()
    out = q(torch.tensor([10.0, -10.0, 0.25]))
    step = 1.0 / 128  # 256 levels, -1 (the extreme) on the code -128
    torch.testing.assert_close(out, torch.tensor([127 * step, -128 * step, round(0.25 / step) * step]))


def test_uncalibrated_use_is_an_error_and_gradient_is_straight_through():
    q = StaticActQuantizer(8)
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.ones(3))
    with pytest.raises(RuntimeError, match="no calibration input"):
        q.freeze()
    q.observe(torch.tensor([-2.0, 2.0]))
    q.freeze()
    x = torch.randn(6, requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(6))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)

    def forward(self, x, attention_mask=None):
        return self.down(torch.relu(self.up(x)))


def test_calibrate_installs_ranges_of_scaled_inputs_over_real_tokens_only():
    torch.manual_seed(0)
    net = quantize_model(_Net(), QuantSpec(8, a_bits=8))
    net.up.input_scale = torch.rand(16) + 0.5
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    x[0, 3:] = 100.0  # padding tokens: must not widen the range
    installed = calibrate_static_activations(net, [{"x": x, "attention_mask": mask}])

    real = x[mask.bool()]
    up_in = real / net.up.input_scale
    # upstream activations in float (weights as the layer quantizes them)
    down_in = torch.relu(nn.functional.linear(up_in, net.up.quantized_weight(), net.up.bias))
    for layer, inputs in ((net.up, up_in), (net.down, down_in)):
        assert isinstance(layer.act_quantizer, StaticActQuantizer) and layer.act_quantizer.frozen
        assert layer.act_quantizer.bits == 8  # taken from the layer's dynamic quantizer (the cell's a_bits)
        assert layer.act_quantizer.hi.item() == pytest.approx(inputs.max().clamp(min=0).item(), rel=1e-6)
        assert layer.act_quantizer.lo.item() == pytest.approx(inputs.min().clamp(max=0).item(), rel=1e-6)
    assert set(installed) == {"up", "down"}


def test_calibrate_without_bits_or_activation_quantizer_is_an_error():
    net = quantize_model(_Net(), QuantSpec(8))
    with pytest.raises(ValueError, match="bits="):
        calibrate_static_activations(net, [{"x": torch.randn(3, 16)}])
    calibrate_static_activations(net, [{"x": torch.randn(3, 16)}], bits=6)
    assert net.up.act_quantizer.bits == 6 and not isinstance(net.up.act_quantizer, DynamicActQuantizer)
    assert isinstance(net.up, QuantLinear)
