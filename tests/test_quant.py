"""bench.quant against torch's own fake-quantization ops and direct formulas."""

import pytest
import torch
from torch import nn

from bench.api import QuantSpec
from bench.errors import BenchError
from bench.quant import QuantLinear, compute_qparams, fake_quantize, int_range, quantize_model, summarize
from bench.quant.uniform import group_view

BITS = [2, 3, 4, 8]


def _weight(rows=16, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[0] *= 10  # one outlier row: per-channel must not share its scale with the others
    w[3] = w[3].abs()  # an all-positive row: the asymmetric range must still contain 0
    return w


def _symmetric_scale(lo, hi, bits, narrow=False):
    """Zero-point-0 grids. Full (2^b levels): the signed extreme (lo if |lo| >= hi, else hi) sits on the code
    -2^(b-1), scale = -extreme / 2^(b-1) (llama.cpp's Q4_0 rule); narrow (2^b - 1 levels): max|w| on +-qmax."""
    lo, hi = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
    if narrow:
        return torch.maximum(-lo, hi) / (2 ** (bits - 1) - 1)
    return -torch.where(-lo >= hi, lo, hi) / 2 ** (bits - 1)


def _torch_reference(w, bits, symmetric, narrow=False):
    """Scales/zero points by the formula, then torch.fake_quantize_per_channel_affine does the rounding (a
    negative scale as a positive one on the sign-flipped row, so torch never sees a negative scale)."""
    qmin, qmax = (-(2 ** (bits - 1)) + narrow, 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    if symmetric:
        scale = _symmetric_scale(w.amin(1).clamp(max=0), w.amax(1).clamp(min=0), bits, narrow).float()
        sign = scale.sign().unsqueeze(1)
        zero = torch.zeros(len(scale), dtype=torch.int32)
        return sign * torch.fake_quantize_per_channel_affine(w * sign, scale.abs(), zero, 0, qmin, qmax)
    else:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zero = qmin - torch.round(lo / scale)
    return torch.fake_quantize_per_channel_affine(w, scale, zero.to(torch.int32), 0, qmin, qmax)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_matches_torch(bits, symmetric):
    w = _weight()
    ours = fake_quantize(w, bits, symmetric=symmetric, granularity="per-channel")
    torch.testing.assert_close(ours, _torch_reference(w, bits, symmetric), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_narrow_grid_matches_torch(bits):
    w = _weight()
    ours = fake_quantize(w, bits, symmetric=True, narrow=True, granularity="per-channel")
    torch.testing.assert_close(ours, _torch_reference(w, bits, True, narrow=True), rtol=0, atol=1e-6)
    assert max(len(torch.unique(row)) for row in ours) <= 2**bits - 1
    torch.testing.assert_close(ours.abs().amax(1), w.abs().amax(1))  # absmax sits on the top code exactly


def test_narrow_grid_is_symmetric_only():
    with pytest.raises(ValueError, match="symmetric only"):
        int_range(4, False, narrow=True)
    with pytest.raises(BenchError, match="narrow"):
        QuantSpec(4, symmetric=False, narrow=True)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_level_is_used_on_a_gaussian_row(bits, symmetric):
    """At b bits a min-max grid has 2^b usable levels (the old absmax/(2^(b-1)-1) grid left the code
    -2^(b-1) unused: ternary at 2 bits)."""
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    levels = torch.tensor([len(torch.unique(row)) for row in fake_quantize(w, bits, symmetric=symmetric)])
    assert levels.median() == 2**bits  # a row with a lone far outlier may leave an end code empty


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_matches_torch(bits, symmetric):
    w = _weight()
    qmin, qmax = int_range(bits, symmetric)
    lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
    if symmetric:
        scale = _symmetric_scale(lo, hi, bits).item()
        sign = -1.0 if scale < 0 else 1.0
        ref = sign * torch.fake_quantize_per_tensor_affine(w * sign, abs(scale), 0, qmin, qmax)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = int(qmin - round(lo / scale))
        ref = torch.fake_quantize_per_tensor_affine(w, scale, zero, qmin, qmax)
    ours = fake_quantize(w, bits, symmetric=symmetric, granularity="per-tensor")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("cols,group", [(64, 16), (576, 128), (40, 16)])
def test_per_group_equals_per_channel_of_each_group(symmetric, cols, group):
    """Groups along the input dim, ragged last group included (576 = 4*128 + 64)."""
    w = _weight(cols=cols)
    ours = fake_quantize(w, 4, symmetric=symmetric, granularity="per-group", group_size=group)
    expected = torch.cat([_torch_reference(w[:, s : s + group], 4, symmetric) for s in range(0, cols, group)], dim=1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_grid_size_and_exact_points(bits):
    w = _weight()
    for symmetric in (True, False):
        out = fake_quantize(w, bits, symmetric=symmetric)
        qp = compute_qparams(group_view(w, "per-channel", 0), bits, symmetric)
        codes = out / qp.scale + qp.zero_point
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)  # on the integer grid
        assert max(len(torch.unique(row)) for row in out) <= 2**bits
        assert bool(((out - w).abs() <= qp.scale.abs() + 1e-6).all())  # clipped by at most one step
    # symmetric: the row's signed extreme sits exactly on the code -2^(b-1)
    at = w.abs().argmax(1, keepdim=True)
    torch.testing.assert_close(fake_quantize(w, bits, symmetric=True).gather(1, at), w.gather(1, at))


def test_quantization_error_shrinks_with_bits():
    w = _weight()
    errors = [(fake_quantize(w, b) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3


def test_straight_through_estimator_passes_gradient_unchanged():
    w = _weight().requires_grad_()
    upstream = torch.randn_like(w)
    (fake_quantize(w, 2) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream)


def test_bits_outside_range_rejected():
    with pytest.raises(ValueError, match="2..8"):
        int_range(1, True)
    with pytest.raises(ValueError):
        int_range(9, False)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.classifier = nn.Linear(8, 2)

    def forward(self, x):
        return self.classifier(self.encoder(x))


def test_quantize_model_swaps_linears_and_keeps_head():
    torch.manual_seed(0)
    model = _Toy()
    x = torch.randn(4, 8)
    before = model(x)
    w0 = model.encoder[0].weight.detach().clone()
    quantize_model(model, QuantSpec(4))
    assert isinstance(model.encoder[0], QuantLinear) and isinstance(model.encoder[2], QuantLinear)
    assert type(model.classifier) is nn.Linear
    summary = summarize(model)
    assert summary["quantized_linears"] == 2 and summary["kept_fp"] == ["classifier"]
    assert summary["quantized_embeddings"] == [] and "embeddings" in summary["float_always"]
    # the float weight is kept (for QAT / GPTQ to edit); the forward uses its fake-quantized copy
    torch.testing.assert_close(model.encoder[0].weight, w0)
    torch.testing.assert_close(model.encoder[0].quantized_weight(), fake_quantize(w0, 4))
    after = model(x)
    assert not torch.allclose(before, after)
    manual = nn.functional.linear(
        nn.functional.gelu(nn.functional.linear(x, fake_quantize(w0, 4), model.encoder[0].bias)),
        fake_quantize(model.encoder[2].weight, 4),
        model.encoder[2].bias,
    )
    torch.testing.assert_close(after, model.classifier(manual))


def test_activation_quantization_is_per_token():
    torch.manual_seed(0)
    model = _Toy()
    quantize_model(model, QuantSpec(8, a_bits=8))
    layer = model.encoder[0]
    x = torch.randn(3, 5, 8)
    x[0, 0] *= 100  # an outlier token must not coarsen the other tokens' grid
    xq = layer.act_quantizer(x)
    per_token = torch.stack([fake_quantize(t.unsqueeze(0), 8, symmetric=False)[0] for t in x.reshape(-1, 8)])
    torch.testing.assert_close(xq.reshape(-1, 8), per_token)
    assert QuantSpec(4, 8).label() == "W4A8" and QuantSpec(4).label() == "W4A32"


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_clip_matches_numpy_percentile(symmetric):
    import numpy as np

    w = torch.randn(8, 20000, generator=torch.Generator().manual_seed(1))
    w[:, 0] = 50.0  # a single outlier per row: clipped away by the 99.99th percentile
    qp = compute_qparams(w, 4, symmetric, "percentile")
    qmin, qmax = int_range(4, symmetric)
    x = w.double().numpy()
    lo = np.minimum(np.percentile(x, 0.01, axis=1), 0)
    hi = np.maximum(np.percentile(x, 99.99, axis=1), 0)
    if symmetric:
        scale = _symmetric_scale(lo, hi, 4).numpy()
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = qmin - lo / scale  # before rounding: float32 vs float64 may round a .5 tie differently
        torch.testing.assert_close(qp.zero_point.squeeze(1).double(), torch.tensor(zero).round(), rtol=0, atol=1.0)
    torch.testing.assert_close(qp.scale.squeeze(1).double(), torch.tensor(scale), rtol=5e-5, atol=0)
    ours = fake_quantize(w, 4, symmetric=symmetric, clip="percentile")
    ref = torch.fake_quantize_per_channel_affine(
        w, qp.scale.squeeze(1), qp.zero_point.squeeze(1).to(torch.int32), 0, qmin, qmax
    )
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert ours[:, 0].max() < 10  # the outlier was clipped


def _brute_force_mse(row, bits, symmetric, grid=100, max_shrink=0.8, norm=2.4):
    """The GPTQ reference search, written out for one row."""
    qmin, qmax = int_range(bits, symmetric)
    best, best_err = None, float("inf")
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        if symmetric:
            scale, zero = _symmetric_scale(min(row.min(), 0) * p, max(row.max(), 0) * p, bits).float(), 0.0
        else:
            lo, hi = min(row.min(), 0) * p, max(row.max(), 0) * p
            scale = (hi - lo) / (qmax - qmin)
            zero = qmin - torch.round(lo / scale)
        q = (torch.clamp(torch.round(row / scale) + zero, qmin, qmax) - zero) * scale
        err = (q - row).abs().pow(norm).sum().item()
        if err < best_err:
            best, best_err = q, err
    return best


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clip_equals_brute_force_search(symmetric):
    w = _weight(rows=6, cols=64)
    ours = fake_quantize(w, 3, symmetric=symmetric, clip="mse")
    expected = torch.stack([_brute_force_mse(row, 3, symmetric) for row in w])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    minmax_err = (fake_quantize(w, 3, symmetric=symmetric) - w).abs().pow(2.4).sum(1)
    assert torch.all((ours - w).abs().pow(2.4).sum(1) <= minmax_err + 1e-6)


def test_frozen_grid_survives_weight_edits():
    from bench.quant import WeightQuantizer

    w = _weight()
    quantizer = WeightQuantizer(QuantSpec(4, granularity="per-group", group_size=16))
    before = quantizer(w)
    quantizer.freeze(w)
    torch.testing.assert_close(quantizer(w), before)
    edited = w * 0.5  # a method moves weights on a fixed grid: the scale must not follow them
    qp = quantizer.qparams(edited)
    assert torch.equal(qp.scale, quantizer.scale)
    torch.testing.assert_close(
        quantizer(edited), fake_quantize(edited, 4, granularity="per-group", group_size=16, qparams=qp)
    )
    assert not torch.allclose(quantizer(edited), fake_quantize(edited, 4, granularity="per-group", group_size=16))


def test_input_scale_smoothing_is_exact_before_quantization():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    layer = QuantLinear(linear, nn.Identity())  # no quantization: smoothing must not change the output
    layer.input_scale = torch.rand(8) + 0.5
    torch.testing.assert_close(layer(x), linear(x))


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel", "per-group"])
def test_lsq_forward_is_the_uniform_grid_and_init_follows_the_paper(granularity):
    import math

    from bench.quant import LSQQuantizer
    from bench.quant.uniform import QParams

    w = _weight(cols=48)
    spec = QuantSpec(3, granularity=granularity, group_size=16)
    lsq = LSQQuantizer(spec, w)
    grouped = group_view(w, granularity, 16)
    torch.testing.assert_close(lsq.step.detach(), 2 * grouped.abs().mean(1, keepdim=True) / math.sqrt(3))
    qp = QParams(lsq.step.detach(), torch.zeros_like(lsq.step.detach()), -4, 3)
    torch.testing.assert_close(lsq(w), fake_quantize(w, 3, granularity=granularity, group_size=16, qparams=qp))


def test_lsq_gradients_follow_the_paper():
    """Step gradient = g * sum(-w/s + round(w/s)) inside the grid, g*Qn or g*Qp outside; weight grad STE inside."""
    import math

    from bench.quant import LSQQuantizer

    w = torch.tensor([[0.05, -0.3, 0.9, 3.0, -3.0, 0.41]], requires_grad=True)
    lsq = LSQQuantizer(QuantSpec(3, granularity="per-tensor"), w)
    with torch.no_grad():
        lsq.step.fill_(0.2)
    lsq(w).sum().backward()
    s, qmin, qmax = 0.2, -4, 3
    v = w.detach() / s
    inside = (v > qmin) & (v < qmax)
    expected_step = torch.where(inside, torch.round(v) - v, torch.where(v <= qmin, float(qmin), float(qmax))).sum()
    g = 1 / math.sqrt(w.numel() * qmax)
    torch.testing.assert_close(lsq.step.grad.squeeze(), expected_step * g)
    torch.testing.assert_close(w.grad, inside.float())


def test_embedding_quantization_is_opt_in_and_per_row():
    from bench.quant import QuantEmbedding

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 4))
    ids = torch.tensor([[1, 7, 49]])
    quantize_model(model, QuantSpec(4), keep_fp=())
    assert type(model[0]) is nn.Embedding  # off by default
    model2 = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 4))
    quantize_model(model2, QuantSpec(4, embeddings=True), keep_fp=())
    assert isinstance(model2[0], QuantEmbedding)
    expected = fake_quantize(model2[0].weight, 4)[ids]  # per row = per token vector
    torch.testing.assert_close(model2[0](ids), expected)
    assert summarize(model2)["quantized_embeddings"] == ["0"]


def test_eval_cache_of_quantized_weight_follows_every_edit():
    from bench.quant import WeightQuantizer

    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(32, 8), WeightQuantizer(QuantSpec(4)))
    layer.weight_quantizer.freeze(layer.weight)
    with torch.no_grad():
        first = layer.quantized_weight()
        assert layer.quantized_weight() is first  # cached while nothing changes
        layer.weight.mul_(0.5)  # an in-place edit (as GPTQ/AWQ do) invalidates it
        torch.testing.assert_close(layer.quantized_weight(), layer.weight_quantizer(layer.weight))
        layer.weight_quantizer.freeze(layer.weight)  # a new grid too
        torch.testing.assert_close(layer.quantized_weight(), fake_quantize(layer.weight, 4))
        layer.input_scale = torch.full((32,), 2.0)  # and smoothing
        torch.testing.assert_close(layer.quantized_weight(), layer.weight_quantizer(layer.weight * 2.0))
    assert layer.quantized_weight().requires_grad  # with gradients on, never cached
