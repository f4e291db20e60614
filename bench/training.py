"""The one training-loop helper: fine-tuning, QAT and PEFT methods all step through it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (dropout off: as deployed, as calibrated, as timed) inside, then back in the mode it
    came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def frozen(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` off for ``params`` inside (they get no gradient, so the optimizer skips them)."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


class ClipThenStep:
    """An optimizer view that clips the gradient norm of ``params`` before each step (for ``sam_step``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_norm: float | None):
        self.optimizer, self.params, self.max_norm = optimizer, params, max_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        if self.max_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.max_norm)
        self.optimizer.step()


def gradient_step(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer, max_norm: float | None) -> float:
    """One plain update: backward, clip ``params``' gradient norm, step, clear gradients (``train_loop``'s
    default, the plain student step of the zero-shot methods, SQuAT's step-size phase)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ClipThenStep(optimizer, params, max_norm).step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train_loop(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable],
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    *,
    epochs: int,
    steps_per_epoch: int,
    lr: float,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    params: Iterable[torch.nn.Parameter] | Iterable[dict] | None = None,
    max_grad_norm: float | None = 1.0,
    desc: str = "train",
    step: Callable[[torch.nn.Module, object, torch.optim.Optimizer], float] | None = None,
) -> list[float]:
    """AdamW with linear warm-up/decay over ``epochs``; ``batches(epoch)`` yields that epoch's batches.

    ``params``: the parameters to train (default: all that require grad), or AdamW parameter groups
    (dicts with ``params`` and their own ``lr``/``weight_decay``; the schedule scales every group's lr).
    ``step(model, batch, optimizer) -> loss`` replaces the default update (loss, backward, clip to
    ``max_grad_norm``, optimizer step) for methods whose update is more than one gradient step (SAM,
    alternating phases); the loop still owns the optimizer, the schedule and the progress bar.

    Returns the per-step losses so callers (and tests) can see that training happened.
    """
    from transformers import get_linear_schedule_with_warmup  # lazy: transformers costs `bench list` ~2 s

    groups = _param_groups(model, params)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * steps_per_epoch)
    schedule = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total), total)
    model.train()
    losses: list[float] = []
    with tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) as bar:
        for epoch in range(epochs):
            for batch in batches(epoch):
                if step is not None:
                    loss = step(model, batch, optimizer)
                else:
                    loss = gradient_step(loss_fn(model, batch), params, optimizer, max_grad_norm)
                schedule.step()
                losses.append(loss.item() if isinstance(loss, torch.Tensor) else float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update()
    model.eval()
    if losses:
        log.info("%s: %d steps, first loss %.4f, last loss %.4f", desc, len(losses), losses[0], losses[-1])
    else:  # epochs=0 or an empty training split: the model is returned as it came
        log.info("%s: no training steps (%d epochs of %d steps)", desc, epochs, steps_per_epoch)
    return losses


def _param_groups(model: torch.nn.Module, params) -> list[dict]:
    """AdamW groups of the trainable parameters: one group, or the caller's groups (frozen ones dropped)."""
    items = list(params if params is not None else model.parameters())
    if not items or not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
    return [g for g in groups if g["params"]]


@contextmanager
def perturb_quantized(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Inside, each quantized layer (``QuantLinear``/``QuantEmbedding``) reads Q(w0) + m * (w - w0), w0 its
    weight on entry and m its quantizer's straight-through mask (``clip_mask``: 1 inside the grid's range, 0
    where clipped; 1 everywhere for ``WeightQuantizer``, whose STE passes every weight).

    At w = w0 the forward is exactly Q(w0) with the usual STE gradient; a perturbation e of the weights moves
    the *quantized* weight to Q(w0) + m * e with the grid held where w0 put it, instead of re-rounding w0 + e
    (which gives Q(w0) back for most small e, or grid noise: a min-max grid also follows w0 + e). That is the
    point the sharpness metric measures, so SAM's ascent and the leaderboard's sharpness look at the same
    weights. Q(w0) is recomputed from the detached w0 at every forward, so a learned grid (LSQ's step) that
    requires grad still gets its gradient; one that is frozen gets none. On exit the layers' own forward is
    back.
    """
    saved = []
    try:
        for layer in layers:
            if getattr(layer, "input_scale", None) is not None or hasattr(layer, "outlier_index"):
                # Q(w0 * s), float outlier columns: the forward reads more than Q(weight); not handled here
                raise ValueError(f"perturb_quantized: {type(layer).__name__} is smoothed or has float outliers")
            quantizer = layer.weight_quantizer
            w0 = layer.weight.detach().clone()
            mask = quantizer.clip_mask(w0) if hasattr(quantizer, "clip_mask") else 1.0
            saved.append(layer)
            layer.quantized_weight = lambda layer=layer, w0=w0, mask=mask: (
                layer.weight_quantizer(w0) + mask * (layer.weight - w0)
            )
        yield
    finally:
        for layer in saved:
            layer.__dict__.pop("quantized_weight", None)


def sam_step(
    params: list[torch.nn.Parameter],
    closure: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    rho: float,
    quantized: Iterable[nn.Module] = (),
) -> tuple[float, float]:
    """One SAM update (Foret et al. 2021): ascend by e = rho * g/||g|| (g the gradient at the weights w),
    take the gradient there, restore w bit for bit, and let ``optimizer`` step with that gradient.

    ``closure`` zero-grads nothing and returns the loss at the current weights (it is called twice).

    Where e lands (the perturbation space) is the caller's choice, the one thing SAM leaves open for a
    quantized model. ``quantized`` lists layers whose weights are in ``params`` and whose *quantized* weight
    moves: during the step they read Q(w0) + e with the grid frozen (``perturb_quantized``), the point the
    sharpness metric measures; the optimizer still updates the latent w through the STE. Every other
    parameter, and a quantized layer not listed, moves as a float: the forward of such a layer reads
    Q(w + e), which re-rounds e (on MiniLM W4 at rho 0.05, |Q(w+e) - Q(w)| is 14-17 rho with cosine < 0.1
    to e: mostly rounding noise). ZSAQ's student step and SQuAT's weight phase both call this; their ``perturb``
    setting (``quantized`` by default, ``latent``) decides what they pass. Returns ``(loss at w, loss at the
    ascent point)``.
    """
    params = [p for p in params if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    with perturb_quantized(quantized):
        loss = closure()
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else torch.tensor(0.0)
        saved = [p.detach().clone() for p in params]  # restored by copy: (w + e) - e is not always w
        with torch.no_grad():
            torch._foreach_add_(params, torch._foreach_mul(grads, rho / (norm + 1e-12)))
        optimizer.zero_grad(set_to_none=True)
        perturbed = closure()
        perturbed.backward()
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), perturbed.item()


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    kind: str = "kl",
    temperature: float = 1.0,
    detach_teacher: bool = True,
) -> torch.Tensor:
    """Teacher-student discrepancy on output logits (last dim = classes or vocabulary), averaged per position.

    ``kl``: KL(teacher || student) of the softmax distributions at ``temperature`` (times T^2, Hinton's
    scaling, so gradients keep their size); ``mse``: mean squared error of the raw outputs. A single
    output (a regression head, STS-B) always uses MSE: it has no distribution. Used by knowledge
    distillation (SQuAT, LSQ) and as the adversarial objective of the zero-shot methods (ZSAQ, GAN), whose
    generator ascends it through both models (``detach_teacher=False``).
    """
    if detach_teacher:
        teacher = teacher.detach()
    if kind == "mse" or student.shape[-1] == 1:
        return torch.nn.functional.mse_loss(student, teacher)
    if kind != "kl":
        raise ValueError(f"unknown discrepancy {kind!r}; choose from kl, mse")
    t = temperature
    log_p_student = torch.log_softmax(student.flatten(0, -2) / t, dim=-1)
    log_p_teacher = torch.log_softmax(teacher.flatten(0, -2) / t, dim=-1)
    return torch.nn.functional.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t
