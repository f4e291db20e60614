"""SAM's step, checked on a quadratic whose gradients are known in closed form, and in the quantized space."""

import torch
from torch import nn

from bench.api import QuantSpec
from bench.quant import LSQQuantizer, QuantLinear, WeightQuantizer
from bench.training import perturb_quantized, sam_step


def test_sam_step_visits_the_worse_point_at_distance_rho_and_steps_with_its_gradient():
    a = torch.tensor([3.0, 1.0])  # L(w) = 0.5 * sum(a * w^2): gradient a * w
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    start = w.detach().clone()
    seen = []

    def closure():
        seen.append(w.detach().clone())
        return 0.5 * (a * w**2).sum()

    rho, lr = 0.05, 0.1
    loss, perturbed = sam_step([w], closure, torch.optim.SGD([w], lr=lr), rho=rho)
    assert len(seen) == 2 and torch.equal(seen[0], start)
    g = a * start
    expected_e = rho * g / g.norm()
    assert torch.allclose(seen[1] - start, expected_e, atol=1e-6)
    assert abs((seen[1] - start).norm().item() - rho) < 1e-6
    assert perturbed > loss  # the ascent point is worse
    # restored, then stepped with the gradient taken at w + e (not at w)
    assert torch.allclose(w.detach(), start - lr * a * (start + expected_e), atol=1e-6)
    assert w.grad is None


def test_sam_with_rho_zero_is_the_base_optimizer():
    w = torch.nn.Parameter(torch.tensor([0.5, 2.0]))
    start = w.detach().clone()
    sam_step([w], lambda: (w**2).sum(), torch.optim.SGD([w], lr=0.1), rho=0.0)
    assert torch.allclose(w.detach(), start - 0.1 * 2 * start)


def test_distill_loss_is_kl_of_teacher_to_student_and_mse_for_one_output():
    import torch.nn.functional as F

    from bench.training import distill_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 7, 5, generator=g), torch.randn(4, 7, 5, generator=g)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    reference = (p * (p.log() - q.log())).sum(-1).mean()  # mean over the 28 positions
    assert torch.allclose(distill_loss(s, t), reference, atol=1e-6)
    assert distill_loss(t, t).abs() < 1e-6
    one = torch.randn(6, 1, generator=g)
    assert torch.allclose(distill_loss(one, one + 1), torch.tensor(1.0))


def _quant_layer(quantizer=WeightQuantizer) -> QuantLinear:
    torch.manual_seed(0)
    linear = nn.Linear(16, 4)
    return QuantLinear(linear, quantizer(QuantSpec(2), linear.weight))


def test_sam_step_on_quantized_layers_moves_the_quantized_weight_with_the_grid_frozen():
    """``quantized=[layer]``: the forward reads Q(w0) + e at the ascent point (not Q(w0 + e)), ||e|| = rho, the
    gradient taken there updates the latent weight through the STE, and the layer's own forward is back."""
    layer = _quant_layer()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
    w0 = layer.weight.detach().clone()
    q0 = layer.weight_quantizer(w0).detach()
    seen = []

    def loss_at(q):
        return 0.5 * ((torch.nn.functional.linear(x, q, layer.bias) - y) ** 2).sum()

    def closure():
        seen.append(layer.quantized_weight().detach().clone())
        return 0.5 * ((layer(x) - y) ** 2).sum()

    rho, lr = 0.05, 0.1
    params = [layer.weight]
    sam_step(params, closure, torch.optim.SGD(params, lr=lr), rho=rho, quantized=[layer])
    assert torch.equal(seen[0], q0)
    q = q0.clone().requires_grad_(True)
    loss_at(q).backward()  # the STE gradient at w0 is the gradient at Q(w0)
    e = rho * q.grad / q.grad.norm()
    torch.testing.assert_close(seen[1], q0 + e)  # Q(w0) + e with the grid w0 gave
    assert not torch.allclose(seen[1], layer.weight_quantizer(w0 + e))  # re-rounding would differ
    ascent = (q0 + e).requires_grad_(True)
    loss_at(ascent).backward()
    torch.testing.assert_close(layer.weight.detach(), w0 - lr * ascent.grad)  # stepped with the gradient there
    assert "quantized_weight" not in layer.__dict__


def test_sam_step_restores_the_weights_bit_for_bit():
    layer = _quant_layer()
    w0 = layer.weight.detach().clone()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    for quantized in ([layer], []):  # quantized or latent space
        optimizer = torch.optim.SGD([layer.weight], lr=0.0)
        sam_step([layer.weight], lambda: layer(x).pow(2).sum(), optimizer, rho=0.3, quantized=quantized)
        assert torch.equal(layer.weight, w0)


def test_perturb_quantized_keeps_a_learned_step_trainable():
    """Inside, LSQ's step still gets its gradient when it requires one (ZSAQ's ``lsq`` student trains it in its
    SAM step); SQuAT freezes steps in its weight phase, so there it gets none."""
    layer = _quant_layer(LSQQuantizer)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    layer(x).pow(2).sum().backward()
    expected = layer.weight_quantizer.step.grad.clone()
    layer.zero_grad(set_to_none=True)
    with perturb_quantized([layer]):
        layer(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight_quantizer.step.grad, expected)
