"""The quantization-aware-training core shared by ``lsq`` and ``squat`` (one loop, one objective, two updates).

Both start from the task's fine-tuned FP model, swap every Linear (but the task head) for a ``QuantLinear``
with bench.quant's ``LSQQuantizer`` (learnable step per row/group, gradient scale 1/sqrt(N*Qp), STE), and
train on the task's labeled data with knowledge distillation from the FP model they started from:

    loss = kd_weight * KD(student logits, teacher logits) + (1 - kd_weight) * task loss

KD is ``bench.training.distill_loss`` (KL at ``kd_temperature``, MSE for a single regression output); the task
loss is the task's own (cross-entropy, MSE, causal-LM). Training runs through ``bench.training.train_loop``
(AdamW, linear warm-up/decay, gradient clipping) with two parameter groups: the weights (every trainable
parameter of the model but the steps: Linear weights, biases, LayerNorms, embeddings, head) at ``lr``, and the
LSQ step sizes at ``step_lr`` without weight decay.

- ``lsq``: plain LSQ QAT, one joint gradient step on weights and step sizes per batch (the train_loop default).
- ``squat``: the same, but each update is SQuAT's alternation (``methods/squat.py``, ``SQuATUpdate``): a SAM
  step on the weights with the step sizes frozen, and a plain step on the step sizes with the weights frozen.

Budget defaults fit the 2-core CPU this benchmark is developed on (one epoch over 1,500 training examples of
the task, batch and length of the task's fine-tune recipe: 47 steps on SST-2); they are budget choices, not
the papers' (full GLUE training sets, several epochs): ``--set lsq.epochs=3 --set lsq.max_train_examples=0``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bench.api import Method, MethodContext, QuantSpec, check_range
from bench.quant import LSQQuantizer, quantize_model
from bench.training import distill_loss, train_loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QATConfig:
    """Settings of the LSQ-based QAT methods (``--set lsq.lr=3e-5``; the same fields for ``squat``).

    Defaults are CPU budget choices (see the module docstring); lr values were checked on MiniLM/SST-2 so
    that W2 does not collapse.
    """

    epochs: int = 1
    max_train_examples: int | None = 1500  # None: the task recipe's cap (the FP fine-tune's examples); 0: all
    batch_size: int | None = None  # None: the task recipe's (32 for GLUE)
    lr: float = 5e-5  # weights (AdamW)
    step_lr: float = 1e-4  # LSQ step sizes (AdamW, no weight decay)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    kd_weight: float = 1.0  # loss = kd_weight * KD + (1 - kd_weight) * task loss; 0 = no teacher
    kd_kind: Literal["kl", "mse"] = "kl"
    kd_temperature: float = 1.0

    def __post_init__(self):
        check_range(self, 0, None, "epochs", "max_train_examples", "lr", "step_lr", "weight_decay", "max_grad_norm")
        check_range(self, 1, None, "batch_size")
        check_range(self, 0, 1, "warmup_ratio", "kd_weight")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature={self.kd_temperature!r}: must be positive")


def model_inputs(batch: dict) -> dict:
    """A labeled batch without its labels: what a model (the teacher) is called with."""
    return {k: v for k, v in batch.items() if k != "labels"}


class Distilled:
    """The QAT objective on one batch: KD from ``teacher`` mixed with the task loss by ``kd_weight``."""

    def __init__(self, task, teacher: nn.Module | None, config: QATConfig):
        self.task, self.teacher, self.config = task, teacher, config

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> torch.Tensor | None:
        if self.teacher is None or self.config.kd_weight == 0:
            return None
        return self.teacher(**model_inputs(batch)).logits

    def __call__(self, model: nn.Module, batch: dict, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if teacher_logits is None:
            teacher_logits = self.teacher_logits(batch)
        if teacher_logits is None:
            return self.task.loss(model, batch)
        if cfg.kd_weight >= 1:
            logits = model(**model_inputs(batch)).logits
            return distill_loss(logits, teacher_logits, kind=cfg.kd_kind, temperature=cfg.kd_temperature)
        captured: list[torch.Tensor] = []  # the task's own loss call, with its logits caught: one forward
        handle = model.register_forward_hook(lambda _m, _a, out: captured.append(out.logits))
        try:
            task_loss = self.task.loss(model, batch)
        finally:
            handle.remove()
        kd = distill_loss(captured[-1], teacher_logits, kind=cfg.kd_kind, temperature=cfg.kd_temperature)
        return cfg.kd_weight * kd + (1 - cfg.kd_weight) * task_loss


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, step sizes): the LSQ steps of every QuantLinear, and every other trainable parameter."""
    steps = [m.step for m in model.modules() if isinstance(m, LSQQuantizer)]
    ids = {id(p) for p in steps}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return weights, steps


class QATMethod(Method):
    """LSQ QAT from the fine-tuned FP model with KD; subclasses choose the per-batch update (``update``)."""

    data_used = "labeled"
    Config = QATConfig

    def update(self, objective: Distilled, model: nn.Module, steps_per_epoch: int) -> Callable | None:
        """The per-batch update for ``train_loop`` (None: its default joint gradient step on ``objective``)."""
        return None

    def quantize(self, model: nn.Module, spec: QuantSpec, context: MethodContext) -> nn.Module:
        cfg = self.config
        teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kd_weight > 0 else None
        model = quantize_model(model.requires_grad_(True), spec, keep_fp=context.keep_fp, weight_quantizer=LSQQuantizer)
        weights, steps = split_parameters(model)
        objective = Distilled(context.task, teacher, cfg)
        budget = dict(examples=cfg.max_train_examples, batch_size=cfg.batch_size)
        steps_per_epoch = context.steps_per_epoch(method=self.name, **budget)
        losses = train_loop(
            model,
            lambda epoch: context.train_batches(epoch, method=self.name, **budget),
            objective,
            epochs=cfg.epochs,
            steps_per_epoch=steps_per_epoch,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_ratio=cfg.warmup_ratio,
            params=[{"params": weights, "lr": cfg.lr}, {"params": steps, "lr": cfg.step_lr, "weight_decay": 0.0}],
            max_grad_norm=cfg.max_grad_norm,
            desc=f"{self.name} W{spec.w_bits}",
            step=self.update(objective, model, steps_per_epoch),
        )
        context.report.update(
            train_steps=len(losses),
            first_loss=round(losses[0], 5) if losses else None,
            last_loss=round(losses[-1], 5) if losses else None,
            lsq_layers=len(steps),
        )
        return model.eval()
