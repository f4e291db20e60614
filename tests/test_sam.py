"""SAM's step, checked on a quadratic whose gradients are known in closed form."""

import torch

from bench.training import sam_step


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
