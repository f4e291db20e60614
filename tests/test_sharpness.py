"""Sharpness and Hessian metrics against closed forms on quadratic losses, and on a tiny quantized BERT.

The quadratic "model" is one Linear whose flattened weight w enters L(w) = 0.5 w^T A w + b^T w, read
through the layer's forward (so a QuantLinear's forward weight is what the loss sees). With A known:
max over ||e|| <= rho of L(w* + e) - L(w*) at a minimum w* is 0.5 * lambda_max(A) * rho^2, the Hessian
is A everywhere, its top eigenvalue lambda_max(A) and its trace trace(A).
"""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.api import QuantSpec
from bench.metrics.sharpness import hessian_top_eig, hessian_trace, mean_loss, perturbable_weights, sharpness
from bench.quant.layers import QuantLinear, freeze, quantize_model
from bench.quant.uniform import QParams, int_range

sys.path.insert(0, str(Path(__file__).parent))
from tiny import padded_batches, tiny_bert  # noqa: E402

EIGS = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.0])  # PSD, singular, gap 2 at the top


class Holder(nn.Module):
    """The toy model: one bias-free 4 -> 2 Linear, i.e. 8 weights."""

    def __init__(self, weight: torch.Tensor | None = None):
        super().__init__()
        self.layer = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.zeros(2, 4) if weight is None else weight)


def _psd(eigs: torch.Tensor = EIGS, seed: int = 0) -> torch.Tensor:
    """Q diag(eigs) Q^T with a seeded random orthogonal Q: dense, so Hutchinson has real variance."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    a = q @ torch.diag(eigs.double()) @ q.T
    return ((a + a.T) / 2).float()


def quadratic(a: torch.Tensor, b: torch.Tensor | None = None):
    """loss_fn: 0.5 w^T A w + b^T w, w = the forward's weight (the layer applied to the identity)."""
    b = torch.zeros(len(a)) if b is None else b

    def loss_fn(model):
        w = model.layer(torch.eye(4)).T.flatten()
        return 0.5 * w @ a @ w + b @ w

    return loss_fn


# ---- sharpness on quadratics


def test_sharpness_is_zero_at_rho_zero_and_nonnegative():
    a = _psd()
    model = Holder(torch.randn(2, 4, generator=torch.Generator().manual_seed(1)))
    assert sharpness(model, quadratic(a), rho=0.0, steps=5)["value"] == 0.0
    for rho in (1e-3, 0.05, 1.0):
        assert sharpness(model, quadratic(a), rho=rho, steps=3)["value"] >= 0.0
    # a loss that does not depend on the weights: nothing to climb
    assert sharpness(model, lambda m: torch.tensor(1.0), rho=0.1)["value"] == 0.0


def test_sharpness_at_a_minimum_reaches_the_closed_form_from_below():
    """Gradient 0 at w* = 0: the ascent starts from a seeded random direction and converges to the top
    eigenvector. Tolerance: within 1e-3 relative after 50 steps (gap 2 at the top: the error shrinks
    geometrically); never above the true max beyond float32 rounding (1e-5 relative)."""
    a, rho = _psd(), 0.1
    true_max = 0.5 * EIGS.max().item() * rho**2
    out = sharpness(Holder(), quadratic(a), rho=rho, steps=50, seed=3)
    assert out["base_loss"] == 0.0
    assert true_max * (1 - 1e-3) <= out["value"] <= true_max * (1 + 1e-5)
    for steps in (1, 2, 5):  # fewer steps: a lower bound, already most of the way there
        value = sharpness(Holder(), quadratic(a), rho=rho, steps=steps, seed=3)["value"]
        assert 0.0 < value <= true_max * (1 + 1e-5)
    assert sharpness(Holder(), quadratic(a), rho=rho, steps=5)["value"] >= 0.5 * true_max


def test_sharper_quadratic_gives_larger_sharpness():
    flat, sharp = _psd(EIGS), _psd(EIGS * 4)
    w = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    b = -flat @ w.flatten()  # minimum of the flat one at w; the sharp one is also evaluated at w
    v_flat = sharpness(Holder(w), quadratic(flat, b), rho=0.05, steps=5)["value"]
    v_sharp = sharpness(Holder(w), quadratic(sharp, 4 * b), rho=0.05, steps=5)["value"]
    assert v_sharp > 2 * v_flat > 0


def test_one_step_is_sams_perturbation_away_from_a_minimum():
    """steps=1: e = rho * g / ||g||, SAM's own estimate, computed here by hand."""
    a, rho = _psd(), 0.05
    b = torch.randn(8, generator=torch.Generator().manual_seed(4))
    w = torch.randn(8, generator=torch.Generator().manual_seed(5))
    loss = quadratic(a, b)
    g = a @ w + b
    w_adv = w + rho * g / g.norm()
    expected = (0.5 * w_adv @ a @ w_adv + b @ w_adv) - (0.5 * w @ a @ w + b @ w)
    out = sharpness(Holder(w.view(2, 4)), loss, rho=rho, steps=1)
    assert out["value"] == pytest.approx(expected.item(), rel=1e-4)
    assert out["value"] <= sharpness(Holder(w.view(2, 4)), loss, rho=rho, steps=10)["value"] + 1e-7


def test_sharpness_is_deterministic_for_a_seed():
    a = _psd()
    first = sharpness(Holder(), quadratic(a), rho=0.1, steps=3, seed=7)
    second = sharpness(Holder(), quadratic(a), rho=0.1, steps=3, seed=7)
    assert first["value"] == second["value"]
    assert set(first) == {"value", "rho", "steps", "base_loss", "seconds"}
    assert (first["rho"], first["steps"]) == (0.1, 3)


# ---- Hessian metrics on quadratics


def test_hessian_top_eig_of_a_quadratic_is_lambda_max():
    a = _psd()
    w = torch.randn(2, 4, generator=torch.Generator().manual_seed(6))  # anywhere: the Hessian is A
    out = hessian_top_eig(Holder(w), quadratic(a), iters=200, tol=1e-9)
    assert out["value"] == pytest.approx(EIGS.max().item(), rel=1e-5)
    assert out["converged"] and out["iters"] < 200
    default = hessian_top_eig(Holder(w), quadratic(a))  # iters=20, tol=1e-3
    assert default["value"] == pytest.approx(EIGS.max().item(), rel=1e-2)
    assert default == {**hessian_top_eig(Holder(w), quadratic(a)), "seconds": default["seconds"]}


def test_hessian_trace_of_a_quadratic_is_close_to_trace_a():
    """Hutchinson is unbiased with variance 2 * sum_{i != j} A_ij^2 per sample; allow 4 standard errors."""
    a = _psd()
    samples = 400
    off = a - torch.diag(torch.diag(a))
    stderr = math.sqrt(2 * off.pow(2).sum().item() / samples)
    out = hessian_trace(Holder(), quadratic(a), samples=samples, seed=0)
    assert abs(out["value"] - a.trace().item()) <= 4 * stderr
    assert out["stderr"] == pytest.approx(stderr, rel=0.3)
    assert hessian_trace(Holder(), quadratic(a), samples=samples, seed=0)["value"] == out["value"]
    diagonal = torch.diag(EIGS)  # Rademacher vectors make the estimate exact for a diagonal Hessian
    assert hessian_trace(Holder(), quadratic(diagonal), samples=3)["value"] == pytest.approx(EIGS.sum().item())


# ---- quantized weights: Q(w) + e, never Q(w + e)


def _quantized_holder(weight: torch.Tensor) -> Holder:
    model = freeze(quantize_model(Holder(weight), QuantSpec(4, granularity="per-tensor"), keep_fp=()))
    assert isinstance(model.layer, QuantLinear)
    return model


def test_perturbation_reaches_the_forward_although_requantizing_would_erase_it():
    """Weights on the 4-bit grid (step 0.1) and rho = 0.02 < step/2: Q(w + e) = Q(w) for every e in the
    ball, so a re-quantizing metric would read 0; perturbing Q(w) directly finds 0.5 * lambda_max * rho^2."""
    codes = torch.tensor([[7.0, -3.0, 2.0, 0.0], [-7.0, 5.0, -1.0, 4.0]])
    model = _quantized_holder(codes * 0.1)
    layer, rho, a = model.layer, 0.02, _psd()
    step = torch.full((1, 1), 0.1)  # pinned: the test is about the perturbation, not how min-max picks a step
    layer.weight_quantizer.freeze(layer.weight, QParams(step, torch.zeros_like(step), *int_range(4, True)))
    wq = layer.quantized_weight().detach()
    torch.testing.assert_close(wq, codes * 0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        e = torch.randn(2, 4, generator=g)
        e *= rho / e.norm()
        assert torch.equal(layer.weight_quantizer(layer.weight + e), wq)  # re-quantizing erases e

    b = -a @ wq.flatten()  # minimum at Q(w)
    out = sharpness(model, quadratic(a, b), rho=rho, steps=50)
    true_max = 0.5 * EIGS.max().item() * rho**2
    assert true_max * (1 - 1e-3) <= out["value"] <= true_max * (1 + 1e-3)


def test_metrics_are_measured_at_the_quantized_weights():
    w = torch.randn(2, 4, generator=torch.Generator().manual_seed(8))
    model = _quantized_holder(w)
    wq = model.layer.quantized_weight().detach().flatten()
    assert not torch.equal(wq, w.flatten())
    a = _psd()
    out = sharpness(model, quadratic(a), rho=0.01, steps=1)
    assert out["base_loss"] == pytest.approx((0.5 * wq @ a @ wq).item(), rel=1e-6)
    # the Hessian is taken through the fixed grid (not the STE), so it is exactly A
    assert hessian_top_eig(model, quadratic(a), iters=200, tol=1e-9)["value"] == pytest.approx(8.0, rel=1e-5)


def test_context_makes_quantized_weight_perturbable_and_restores_exactly():
    model = _quantized_holder(torch.randn(2, 4, generator=torch.Generator().manual_seed(9)))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(10))
    before_out, before_w = model.layer(x), model.layer.weight.detach().clone()
    wq = model.layer.quantized_weight().detach()
    with perturbable_weights(model) as slots:
        assert [s.name for s in slots] == ["layer"]
        torch.testing.assert_close(slots[0].base, wq, rtol=0, atol=0)
        delta = torch.full((2, 4), 0.01)
        slots[0].place(delta)
        torch.testing.assert_close(model.layer(x), x @ (wq + delta).T)
    assert torch.equal(model.layer(x), before_out)
    assert torch.equal(model.layer.weight, before_w)
    assert "quantized_weight" not in model.layer.__dict__


def test_frozen_layer_holds_no_copy_of_its_quantized_weight_while_measured():
    """Memory: the evaluation before leaves each frozen layer's Q(w) cached; while measured, a layer holds its float
    weight, the leaf and its gradient, and Q(w) is recomputed when needed (SmolLM2: 0.4 GB less per copy)."""
    model = _quantized_holder(torch.randn(2, 4, generator=torch.Generator().manual_seed(9)))
    with torch.no_grad():
        scored = model.layer.quantized_weight().clone()
    assert "_qcache" in model.layer.__dict__
    with perturbable_weights(model) as slots:
        assert "_qcache" not in model.layer.__dict__ and not isinstance(slots[0].held, torch.Tensor)
        slots[0].place(torch.full((2, 4), 0.01))
        assert torch.equal(slots[0].base, scored) and "_qcache" not in model.layer.__dict__
    out = sharpness(model, quadratic(_psd()), rho=0.01, steps=2)
    with torch.no_grad():
        assert torch.equal(model.layer.quantized_weight(), scored)
    assert out["base_loss"] == pytest.approx((0.5 * scored.flatten() @ _psd() @ scored.flatten()).item(), rel=1e-6)


# ---- a tiny random quantized BERT


def _labeled_batches():
    batches = padded_batches(2, seed=1)
    g = torch.Generator().manual_seed(2)
    return [{**b, "labels": torch.randint(0, 2, (b["input_ids"].shape[0],), generator=g)} for b in batches]


def _tiny_quantized(spec: QuantSpec):
    model = freeze(quantize_model(tiny_bert(), spec))
    model.train()
    model.bert.embeddings.eval()  # mixed modes: each module's own mode must come back
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    return model


def _snapshot(model, batch):
    model_modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(**batch).logits.clone()
    model.train(was)
    for n, m in model.named_modules():
        m.training = model_modes[n]
    return model_modes, flags, state, out


def _assert_unchanged(model, batch, snapshot):
    modes, flags, state, out = snapshot
    after = _snapshot(model, batch)
    assert after[0] == modes
    assert after[1] == flags
    assert state.keys() == after[2].keys() and all(torch.equal(state[k], after[2][k]) for k in state)
    assert torch.equal(after[3], out)
    assert all(p.grad is None for p in model.parameters())
    assert not any("quantized_weight" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(4, a_bits=8, granularity="per-group", group_size=16)])
def test_tiny_quantized_bert_runs_deterministically_and_is_left_unchanged(spec):
    model, batches = _tiny_quantized(spec), _labeled_batches()
    loss_fn = mean_loss(batches)
    snapshot = _snapshot(model, batches[0])
    with perturbable_weights(model) as slots:
        names = [s.name for s in slots]
    assert "bert.encoder.layer.0.attention.self.query" in names and "classifier" in names
    assert not any("embeddings" in n or "LayerNorm" in n for n in names)
    assert len(names) == 2 * 6 + 1 + 1  # 6 Linears per layer, the pooler, the FP classifier

    first = sharpness(model, loss_fn, rho=0.05, steps=3, seed=1)
    _assert_unchanged(model, batches[0], snapshot)
    assert sharpness(model, loss_fn, rho=0.05, steps=3, seed=1)["value"] == first["value"] > 0
    assert math.isfinite(first["base_loss"])

    eig = hessian_top_eig(model, loss_fn, iters=4, seed=1)
    trace = hessian_trace(model, loss_fn, samples=3, seed=1)
    _assert_unchanged(model, batches[0], snapshot)
    assert hessian_top_eig(model, loss_fn, iters=4, seed=1)["value"] == eig["value"]
    assert hessian_trace(model, loss_fn, samples=3, seed=1)["value"] == trace["value"]
    assert math.isfinite(eig["value"]) and math.isfinite(trace["value"])


def test_model_is_restored_when_the_loss_fails():
    model, batches = _tiny_quantized(QuantSpec(4)), _labeled_batches()
    snapshot = _snapshot(model, batches[0])
    good, calls = mean_loss(batches), []

    def flaky(m):
        calls.append(1)
        if len(calls) == 2:  # fails while the weights are perturbed
            raise RuntimeError("boom")
        return good(m)

    with pytest.raises(RuntimeError, match="boom"):
        sharpness(model, flaky, rho=0.5, steps=3)
    _assert_unchanged(model, batches[0], snapshot)


def test_float_model_and_non_finite_loss():
    model, batches = tiny_bert(), _labeled_batches()
    original = copy.deepcopy(model.state_dict())
    assert sharpness(model, mean_loss(batches), steps=2)["value"] >= 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    with pytest.raises(ValueError, match="not finite|nan"):
        sharpness(model, lambda m: torch.tensor(float("nan")), steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_values_on_the_accelerator():
    model, batches = _tiny_quantized(QuantSpec(4)), _labeled_batches()
    cpu = sharpness(model, mean_loss(batches), steps=2, seed=0)
    model.cuda()
    gpu = sharpness(model, mean_loss(batches), steps=2, seed=0)
    assert all(p.is_cuda for p in model.parameters())
    assert gpu["value"] == pytest.approx(cpu["value"], rel=1e-2, abs=1e-6)
    assert hessian_top_eig(model, mean_loss(batches), iters=3)["value"] != 0.0


def test_lazy_batchwise_loss_gives_the_same_values():
    """The per-batch form (one graph alive at a time) and the single-tensor form measure the same thing."""
    model, batches = _tiny_quantized(QuantSpec(4)), _labeled_batches()
    whole, lazy = mean_loss(batches), mean_loss(batches, lazy=True)
    a, b = sharpness(model, whole, steps=3), sharpness(model, lazy, steps=3)
    assert b["base_loss"] == pytest.approx(a["base_loss"], rel=1e-6)
    assert b["value"] == pytest.approx(a["value"], rel=1e-3, abs=1e-7)
    eig_a, eig_b = hessian_top_eig(model, whole, iters=4), hessian_top_eig(model, lazy, iters=4)
    assert eig_b["value"] == pytest.approx(eig_a["value"], rel=1e-3)
    tr_a, tr_b = hessian_trace(model, whole, samples=3), hessian_trace(model, lazy, samples=3)
    assert tr_b["value"] == pytest.approx(tr_a["value"], rel=1e-3)


def test_large_models_recompute_activations_with_the_same_value(monkeypatch):
    """From RECOMPUTE_ABOVE parameters the backward recomputes each decoder layer (Hugging Face gradient
    checkpointing, switched on for the measured layers only): the same sharpness, layers really replayed, and
    the model left as it was (eval mode, checkpointing off)."""
    from tiny import tiny_llama

    from bench.metrics import sharpness as module

    model, _ = tiny_llama()
    ids = torch.randint(0, 30522, (2, 16), generator=torch.Generator().manual_seed(0))
    loss_fn = mean_loss(
        [{"input_ids": ids[:1], "labels": ids[:1]}, {"input_ids": ids[1:], "labels": ids[1:]}], lazy=True
    )
    plain = sharpness(model, loss_fn, steps=3)
    calls = []  # the layer's MLP runs inside its forward, so a replay of the checkpointed layer calls it again
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    monkeypatch.setattr(module, "RECOMPUTE_ABOVE", 0)
    recomputed = sharpness(model, loss_fn, steps=3)
    assert recomputed["value"] == pytest.approx(plain["value"], rel=1e-5)
    assert recomputed["base_loss"] == pytest.approx(plain["base_loss"], rel=1e-6)
    # 4 loss evaluations x 2 batches forward, and each of the 3 backward passes x 2 batches replays the layer
    assert len(calls) == 4 * 2 + 3 * 2
    assert not model.is_activation_checkpointing and not model.training
    assert not any(m.training for m in model.modules())
