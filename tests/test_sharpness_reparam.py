"""Sharpness and the Hessian metrics are properties of the function, not of how smoothing parametrizes it.

A smoothed QuantLinear (``input_scale`` s: SmoothQuant, AWQ) computes Q(x / s) @ Q(W s)^T. Scaling the input
by s and the weight by 1/s gives the same function for any s, so the metrics must measure the same ball
around the weights the function applies to its unscaled input, W_eff = Q(W s) / s, whatever s is.

The subtlety in building "the same function twice" is the grid: Q(W s) and Q(W) * s differ in general (s
moves weights across rounding boundaries). Two constructions avoid it, each for a stated reason:
- power-of-two s (1/4 .. 4) on weights whose 8-bit codes are multiples of 4 within +-28, on one frozen
  per-channel grid: W s is then on that grid too (codes stay integers within +-112), so Q(W s) = W s
  exactly, and x / s, W s are exact in float: the smoothed layer is the unsmoothed QuantLinear, bit for bit;
- arbitrary s in [1/4, 4]: the stored weight is G / s for grid points G, so Q(W s) = G, and the reference is
  the float ``nn.Linear`` with weight G / s (whose slot is its own weight): equal up to float rounding.
"""

import copy

import pytest
import torch
from torch import nn

from bench.api import QuantSpec
from bench.metrics.sharpness import hessian_top_eig, hessian_trace, perturbable_weights, sharpness
from bench.quant.layers import DynamicActQuantizer, QuantLinear, quantize_model
from bench.quant.uniform import QParams, int_range

SIZES = (6, 8, 3)  # in -> hidden -> classes


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(SIZES[0], SIZES[1])
        self.fc2 = nn.Linear(SIZES[1], SIZES[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, SIZES[0], generator=g), torch.randint(0, SIZES[2], (32,), generator=g)


def _loss(x: torch.Tensor, y: torch.Tensor):
    return lambda model: nn.functional.cross_entropy(model(x), y)


def _on_grid(seed: int = 1) -> MLP:
    """An MLP whose 8-bit per-channel grids are frozen by hand and whose weights are codes (multiples of 4,
    |code| <= 28) times the row's step: on the grid with and without a power-of-two scale in 1/4 .. 4.
    Every value comes from ``seed``, none from the global generator."""
    g = torch.Generator().manual_seed(seed)
    model = quantize_model(MLP(), QuantSpec(8, granularity="per-channel"), keep_fp=())
    for layer in (model.fc1, model.fc2):
        step = torch.rand(layer.out_features, 1, generator=g) * 0.04 + 0.02
        codes = 4 * torch.randint(-7, 8, tuple(layer.weight.shape), generator=g).float()
        with torch.no_grad():
            layer.weight.copy_(codes * step)
            layer.bias.copy_(torch.randn(layer.out_features, generator=g) * 0.1)
        layer.weight_quantizer.freeze(layer.weight, QParams(step, torch.zeros_like(step), *int_range(8, True)))
    return model


def _powers_of_two(n: int, g: torch.Generator) -> torch.Tensor:
    return 2.0 ** torch.randint(-2, 3, (n,), generator=g).float()


def _smoothed_on_grid() -> tuple[nn.Module, nn.Module]:
    """(unsmoothed, smoothed) QuantLinear MLPs computing one function; the smoothed one keeps the stored W and
    gets s, so its forward is (x / s) @ Q(W s)^T = (x / s) @ (W s)^T, exactly x @ W^T."""
    reference = _on_grid()
    smoothed = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(2)
    for layer in (smoothed.fc1, smoothed.fc2):
        layer.input_scale = _powers_of_two(layer.in_features, g)
        assert torch.equal(layer.quantized_weight(), layer.weight * layer.input_scale)  # W s is on the grid
    return reference, smoothed


def _smoothed_vs_float() -> tuple[nn.Module, nn.Module]:
    """(float MLP with weights G / s, smoothed QuantLinear MLP storing G / s with input_scale s, s in [1/4, 4]):
    Q(W s) = G, so both compute x @ (G / s)^T up to float rounding."""
    smoothed = _on_grid()
    reference = MLP()
    g = torch.Generator().manual_seed(3)
    for name in ("fc1", "fc2"):
        layer, plain = getattr(smoothed, name), getattr(reference, name)
        grid_weight = layer.weight.detach().clone()  # G: on the frozen grid
        s = torch.rand(layer.in_features, generator=g) * 3.75 + 0.25
        with torch.no_grad():
            layer.weight.copy_(grid_weight / s)
            plain.weight.copy_(grid_weight / s)
            plain.bias.copy_(layer.bias)
        layer.input_scale = s
        assert torch.equal(layer.quantized_weight(), grid_weight)
    return reference, smoothed


PAIRS = {"power-of-two s vs unsmoothed": _smoothed_on_grid, "any s vs float Linear": _smoothed_vs_float}


@pytest.mark.parametrize("build", PAIRS.values(), ids=PAIRS.keys())
def test_same_function_same_sharpness_whatever_the_input_scale(build):
    """Tolerance 1e-3 relative (the issue asks < 1%): the two models differ by float rounding only, while a
    ball around Q(W s) would change the values by tens of percent for s in 1/4 .. 4."""
    reference, smoothed = build()
    x, y = _data()
    loss_fn = _loss(x, y)
    torch.testing.assert_close(smoothed(x), reference(x), rtol=1e-5, atol=1e-6)

    ref, out = sharpness(reference, loss_fn, rho=0.1, steps=5), sharpness(smoothed, loss_fn, rho=0.1, steps=5)
    assert ref["value"] > 1e-3
    assert out["base_loss"] == pytest.approx(ref["base_loss"], rel=1e-6)
    assert out["value"] == pytest.approx(ref["value"], rel=1e-3)

    eig_ref, eig = hessian_top_eig(reference, loss_fn, iters=10), hessian_top_eig(smoothed, loss_fn, iters=10)
    assert eig["value"] == pytest.approx(eig_ref["value"], rel=1e-3)
    trace_ref, trace = hessian_trace(reference, loss_fn, samples=5), hessian_trace(smoothed, loss_fn, samples=5)
    assert trace["value"] == pytest.approx(trace_ref["value"], rel=1e-3)


def test_slot_is_the_unsmoothed_weight_and_activation_quantization_stays():
    """The slot holds Q(W s) / s; the forward reads Q(W s) + e * s on x / s, with the activation quantizer
    applied to x / s as when the model is scored, and is bit-identical to the scored forward at e = 0."""
    _, model = _smoothed_vs_float()
    layer = model.fc1
    layer.act_quantizer = DynamicActQuantizer(4)
    x, _ = _data()
    scored, s = model(x), layer.input_scale
    wq = layer.quantized_weight().detach().clone()
    with perturbable_weights(model) as slots:
        assert [slot.name for slot in slots] == ["fc1", "fc2"]
        torch.testing.assert_close(slots[0].base, wq / s, rtol=0, atol=0)
        assert torch.equal(model(x), scored)
        delta = torch.randn(wq.shape, generator=torch.Generator().manual_seed(4)) * 0.01
        slots[0].place(delta)
        expected = nn.functional.linear(layer.act_quantizer(x / s), wq + delta * s, layer.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(model(x), scored)


def test_smoothed_model_is_restored_exactly():
    _, model = _smoothed_vs_float()
    model.fc2.act_quantizer = DynamicActQuantizer(8)
    model.fc1.weight.requires_grad_(False)  # mixed flags: each comes back as it was
    x, y = _data()
    scales = {name: getattr(model, name).input_scale for name in ("fc1", "fc2")}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scored = model(x).detach()

    sharpness(model, _loss(x, y), rho=0.1, steps=3)
    hessian_top_eig(model, _loss(x, y), iters=3)
    hessian_trace(model, _loss(x, y), samples=2)

    assert all(getattr(model, name).input_scale is s and not s.requires_grad for name, s in scales.items())
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert not any("quantized_weight" in m.__dict__ for m in model.modules() if isinstance(m, QuantLinear))
    assert torch.equal(model(x), scored)
