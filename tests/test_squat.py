"""SQuAT and LSQ: each SQuAT phase moves only its own parameter kind, SAM acts on the quantized weights, the
schedules, LSQ's gradient scale per row, and the shared QAT core (KD objective, joint LSQ update)."""

import copy
import math

import pytest
import torch
from bench.methods._qat import Distilled, split_parameters
from bench.methods.lsq_qat import LSQ
from bench.methods.squat import SQuAT, SQuATConfig, SQuATUpdate, lsq_layers
from test_prequant import _Classify, _context, _labeled
from tiny import tiny_bert
from torch import nn

from bench.api import QuantSpec
from bench.quant import DEFAULT_KEEP_FP, LSQQuantizer, QuantLinear, quantize_model
from bench.training import perturb_quantized


def _setup(bits=2, **config):
    teacher = tiny_bert(0).requires_grad_(False)
    model = quantize_model(tiny_bert(0), QuantSpec(bits), keep_fp=DEFAULT_KEEP_FP, weight_quantizer=LSQQuantizer)
    cfg = SQuATConfig(**config)
    update = SQuATUpdate(Distilled(_Classify(), teacher, cfg), model, cfg, steps_per_epoch=2)
    weights, steps = split_parameters(model)
    optimizer = torch.optim.AdamW(
        [{"params": weights, "lr": 1e-2}, {"params": steps, "lr": 1e-2, "weight_decay": 0.0}], lr=1e-2
    )
    return model.train(), update, optimizer


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_step_size_phase_changes_only_step_sizes():
    model, update, optimizer = _setup()
    before = _snapshot(model)
    update.step_size_phase(model, _labeled(1)[0], optimizer)
    changed = _changed(model, before)
    steps = {n for n in before if n.endswith("weight_quantizer.step")}
    assert len(steps) == 13 and changed == steps  # every step size moved, nothing else


@pytest.mark.parametrize("perturb", ["quantized", "latent"])
def test_weight_phase_changes_only_weights_and_is_sharpness_aware(perturb):
    model, update, optimizer = _setup(perturb=perturb)
    before = _snapshot(model)
    update.weight_phase(model, _labeled(1)[0], optimizer)
    changed = _changed(model, before)
    assert not any(n.endswith(".step") for n in changed)  # step sizes frozen
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert linear_weights <= changed and "classifier.weight" in changed
    assert update.gaps[-1] > 0  # the loss at Q(w) + e is above the loss at Q(w)


def test_sam_gap_is_exactly_zero_at_rho_zero_same_dropout_both_times():
    model, update, optimizer = _setup(rho=0.0)
    update.weight_phase(model, _labeled(1)[0], optimizer)
    assert update.gaps == [0.0]  # dropout masks replayed: the two loss evaluations see the same network


def test_sam_perturbs_the_quantized_weights_with_the_ste_mask():
    model, _, _ = _setup(bits=2)
    layer = lsq_layers(model)[0]
    w0 = layer.weight.detach().clone()
    q0 = layer.weight_quantizer(w0).detach()
    with perturb_quantized([layer]):
        assert torch.equal(layer.quantized_weight(), q0)
        e = torch.full_like(w0, 1e-3)
        with torch.no_grad():
            layer.weight.add_(e)
        mask = layer.weight_quantizer.clip_mask(w0)
        assert 0 < mask.mean() < 1  # some weights lie outside the 2-bit range at LSQ's init
        torch.testing.assert_close(layer.quantized_weight(), q0 + mask * e)  # Q(w0) + e, not Q(w0 + e)
        layer.quantized_weight().sum().backward()
        assert torch.equal(layer.weight.grad, mask)  # LSQ's straight-through gradient
        with torch.no_grad():
            layer.weight.sub_(e)
    assert "quantized_weight" not in layer.__dict__  # restored: the LSQ forward again
    assert torch.equal(layer.quantized_weight(), q0)


@pytest.mark.parametrize(
    "schedule,expected",
    [("step", ["w", "s", "w", "s", "w", "s"]), ("alternate", ["w", "s", "w"]), ("epoch", ["w", "w", "s"])],
)
def test_schedules(schedule, expected):
    model, update, optimizer = _setup(schedule=schedule)
    calls = []
    update.weight_phase = lambda *a: calls.append("w") or 0.0
    update.step_size_phase = lambda *a: calls.append("s") or 0.0
    for batch in _labeled(3):
        update(model, batch, optimizer)
    assert calls == expected


def test_lsq_step_gradient_scale_per_row():
    """g = 1/sqrt(N * Qp) with N = weights sharing a step: a row of in_features for per-channel grids."""
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(48, 4), None)
    lsq = LSQQuantizer(QuantSpec(3), layer.weight)
    w = layer.weight.detach().requires_grad_(True)
    lsq(w).sum().backward()
    s = lsq.step.detach()
    v = w.detach() / s
    inside = (v > -4) & (v < 3)
    raw = torch.where(inside, torch.round(v) - v, torch.where(v <= -4, -4.0, 3.0)).sum(1, keepdim=True)
    torch.testing.assert_close(lsq.step.grad, raw / math.sqrt(48 * 3))
    assert lsq.grad_factor(w) == 1 / math.sqrt(48 * 3)


def test_lsq_method_updates_weights_and_steps_jointly_with_kd():
    context = _context(_labeled(2))
    fp = tiny_bert(0)
    model = LSQ(LSQ.Config(lr=1e-2, step_lr=1e-2)).quantize(copy.deepcopy(fp), QuantSpec(2), context)
    layers = lsq_layers(model)
    assert len(layers) == 13 and context.report["train_steps"] == 2
    init = LSQQuantizer(QuantSpec(2), fp.bert.encoder.layer[0].attention.self.query.weight)
    assert not torch.equal(layers[0].weight_quantizer.step, init.step)  # steps learned
    assert not torch.equal(layers[0].weight, fp.bert.encoder.layer[0].attention.self.query.weight)  # weights too
    assert context.report["first_loss"] < 1.0  # KD from the model it started from: small at the start


def test_squat_method_reports_its_training_sharpness():
    context = _context(_labeled(2))
    SQuAT(SQuATConfig(lr=1e-3, step_lr=1e-3)).quantize(tiny_bert(0), QuantSpec(2), context)
    assert context.report["train_steps"] == 2 and context.report["sam_gap_mean"] > 0


def test_distilled_mixes_kd_and_task_loss_with_one_forward():
    teacher = tiny_bert(0).eval()
    student = tiny_bert(1).eval()
    batch = _labeled(1)[0]
    kd_only = Distilled(_Classify(), teacher, SQuATConfig(kd_weight=1.0))(student, batch)
    ce_only = Distilled(_Classify(), teacher, SQuATConfig(kd_weight=0.0))(student, batch)
    mixed = Distilled(_Classify(), teacher, SQuATConfig(kd_weight=0.25))(student, batch)
    torch.testing.assert_close(mixed, 0.25 * kd_only + 0.75 * ce_only)
    assert Distilled(_Classify(), teacher, SQuATConfig())(teacher, batch).abs() < 1e-6  # teacher = student: 0
