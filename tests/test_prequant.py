"""PreQuant: outlier selection, which parameters train (all others bit-identical), size and real kernels."""

import pytest
import torch
from bench.methods.prequant import PreQuant, PreQuantConfig, outlier_count, select_outliers
from tiny import padded_batches, tiny_bert
from torch import nn
from torch.nn import functional as F

from bench.api import MethodContext, QuantSpec, TrainingData
from bench.metrics.size import fp32_size_bytes, size_breakdown
from bench.quant import DEFAULT_KEEP_FP, OutlierQuantLinear, QuantLinear, WeightQuantizer, freeze
from bench.quant.kernels import KERNEL_RTOL, OutlierCorrected, kernel_for


class _Classify:
    """The smallest task a method needs: a kind and a loss on labeled batches."""

    kind = "classification"

    def loss(self, model, batch):
        return F.cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])


def _labeled(n=3, seed=0):
    batches = padded_batches(n, seed)
    for i, b in enumerate(batches):
        b["labels"] = torch.arange(8) % 2 if i % 2 else (torch.arange(8) + 1) % 2
    return batches


def _context(batches, pretrained_seed=1):
    return MethodContext(
        task=_Classify(),
        tokenizer=None,
        seed=0,
        keep_fp=DEFAULT_KEEP_FP,
        training=TrainingData(batches=lambda epoch, **kw: iter(batches), steps=lambda **kw: len(batches)),
        pretrained=lambda: tiny_bert(pretrained_seed),
    )


def test_select_outliers_finds_the_planted_columns_and_rows():
    torch.manual_seed(0)
    w = torch.randn(16, 40) * 0.1
    w[:, [3, 29]] *= 20  # two outlier input dims
    w[7] *= 30  # one outlier output dim
    q = WeightQuantizer(QuantSpec(4))(w)
    assert sorted(select_outliers(w, q, dim=1, count=2, score="l2").tolist()) == [3, 29]
    assert sorted(select_outliers(w, q, dim=1, count=2, score="absmax").tolist()) == [3, 29]
    assert select_outliers(w, q, dim=0, count=1, score="l2").tolist() == [7]
    assert outlier_count(384, 0.005) == 2 and outlier_count(1536, 0.005) == 8 and outlier_count(10, 0.005) == 1


@pytest.mark.parametrize("select", ["column", "row"])
def test_prequant_trains_only_the_outliers_and_the_head(select):
    batches = _labeled()
    cfg = PreQuantConfig(fraction=0.1, select=select, lr=1e-2, head_lr=1e-2, clip="minmax")
    context = _context(batches)
    torch.manual_seed(0)
    model = PreQuant(cfg).quantize(tiny_bert(0), QuantSpec(2), context)  # the fine-tuned model is not used
    reference = tiny_bert(1)  # the pre-trained model it must start from (same seed: same weights and head)
    before = dict(reference.named_parameters())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, OutlierQuantLinear)}
    assert len(layers) == 13  # 2 layers x 6 Linears + pooler; the classifier stays float
    for name, p in model.named_parameters():
        if name.endswith("outlier_weight"):
            continue
        if name.startswith("classifier."):
            assert not torch.equal(p, before[name]), f"{name}: the new task head must train"
        else:  # embeddings, LayerNorms, biases, the frozen float weights under the grid
            assert torch.equal(p, before[name]), f"{name} changed but must stay frozen"
    dim = 1 if select == "column" else 0
    for name, layer in layers.items():
        w = before[f"{name}.weight"].detach()
        expected_q = WeightQuantizer(QuantSpec(2))(w)  # the pre-trained weight's grid: frozen quantized values
        effective = layer.quantized_weight().detach()
        keep = torch.ones(w.shape[dim], dtype=torch.bool)
        keep[layer.outlier_index] = False
        assert torch.equal(
            effective.index_select(dim, keep.nonzero()[:, 0]), expected_q.index_select(dim, keep.nonzero()[:, 0])
        )
        slices = effective.index_select(dim, layer.outlier_index)
        assert torch.equal(slices, layer.outlier_weight.detach())
        assert not torch.equal(slices, w.index_select(dim, layer.outlier_index)), f"{name}: outliers must train"
        n = w.shape[dim]
        assert layer.outlier_index.numel() == outlier_count(n, 0.1)
    info = context.report
    total = sum(p.numel() for p in reference.parameters())
    outliers = sum(m.outlier_weight.numel() for m in layers.values())
    head = sum(p.numel() for p in reference.classifier.parameters())
    assert info["total_params"] == total and info["outlier_params"] == outliers
    assert info["trainable_params"] == outliers + head
    assert info["trainable_fraction"] == pytest.approx((outliers + head) / total, abs=1e-6)
    assert info["outlier_fraction"] == pytest.approx(0.1, abs=0.02)  # rounding to whole columns/rows
    assert info["train_steps"] == 3


def test_outlier_fraction_follows_the_setting():
    context = _context(_labeled(1))
    PreQuant(PreQuantConfig(fraction=0.05)).quantize(None, QuantSpec(4), context)
    small = context.report["outlier_fraction"]
    context = _context(_labeled(1))
    PreQuant(PreQuantConfig(fraction=0.2)).quantize(None, QuantSpec(4), context)
    assert small == pytest.approx(0.05, abs=0.02) and context.report["outlier_fraction"] == pytest.approx(0.2, abs=0.02)


def _outlier_layer(bits=4, dim=1):
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(64, 32), WeightQuantizer(QuantSpec(bits)))
    freeze(layer)
    out = OutlierQuantLinear(layer, torch.tensor([5, 30, 17]), dim)
    with torch.no_grad():
        out.outlier_weight.mul_(3.0)  # moved far from the grid, as training would
    return out


def test_outlier_slices_are_counted_at_32_bit_and_not_in_the_fp32_size():
    layer = _outlier_layer()
    plain = QuantLinear(nn.Linear(64, 32), WeightQuantizer(QuantSpec(4)))
    freeze(plain)
    extra = size_breakdown(layer)["total"] - size_breakdown(plain)["total"]
    assert extra == 32 * 3 * 4 + 3 * 8  # float32 slices + int64 indices
    assert fp32_size_bytes(layer) == fp32_size_bytes(plain) == (64 * 32 + 32) * 4


@pytest.mark.parametrize("bits,dim", [(4, 1), (4, 0), (8, 1)])
def test_real_kernel_adds_the_outlier_correction(bits, dim):
    layer = _outlier_layer(bits, dim)
    kernel = kernel_for(layer)
    assert isinstance(kernel, OutlierCorrected) and kernel.kernel == ("int4pack" if bits == 4 else "int8pack")
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected, got = layer(x), kernel(x)
        base = kernel.inner(x)  # the low-bit matmul alone misses the outliers
    rel = lambda a: (a - expected).norm() / expected.norm()  # noqa: E731
    assert rel(got) < KERNEL_RTOL
    assert rel(base) > 10 * KERNEL_RTOL


def test_frozen_grid_is_cached_while_only_outliers_train():
    layer = _outlier_layer()
    layer.weight.requires_grad_(False)
    first = layer.base_quantized_weight()
    assert layer.base_quantized_weight() is first  # gradients on, but nothing under the grid trains
    layer.quantized_weight().sum().backward()
    assert layer.outlier_weight.grad is not None and layer.weight.grad is None


@pytest.mark.parametrize("dim", [1, 0])
@pytest.mark.parametrize("smoothed", [False, True])
def test_training_the_slices_computes_the_same_function_and_gradients_with_less_arithmetic(dim, smoothed):
    """The training forward (Q(W) x plus the slices' correction) equals the overwritten weight's, value and
    gradients, and its forward + backward does about two of the three weight-sized products."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.quant import DynamicActQuantizer

    layer = _outlier_layer(dim=dim)
    layer.act_quantizer = DynamicActQuantizer(8)
    if smoothed:
        layer.input_scale = torch.rand(64) + 0.5
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 5, 64)

    def run(forward):
        layer.outlier_weight.grad = None
        xi = x.clone().requires_grad_(True)
        with FlopCounterMode(display=False) as flops:
            y = forward(xi)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        return y.detach(), xi.grad, layer.outlier_weight.grad.clone(), flops.get_total_flops()

    y, gx, go, fast = run(layer)
    y_ref, gx_ref, go_ref, slow = run(lambda xi: QuantLinear.forward(layer, xi))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(go, go_ref, rtol=1e-5, atol=1e-6)
    assert fast < 0.8 * slow
