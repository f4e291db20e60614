"""SQuAT: Sharpness- and Quantization-Aware Training (Wang et al., arXiv 2210.07171). Reimplementation: no
official code exists; every open choice is a setting below.

LSQ QAT from the fine-tuned FP model with KD from it (the ``lsq`` method's core, ``methods._qat``), where each
update alternates two objectives (``SQuATUpdate`` below):

1. sharpness objective on the weights, step sizes frozen: a SAM step (``bench.training.sam_step``): ascend
   by e = rho * g/||g||, take the gradient of the QAT loss there, restore, update the latent weights (with
   ``perturb=quantized`` the forward at the ascent point reads Q(w) + e, the grid frozen);
2. step-size objective on the LSQ step sizes, weights frozen: one plain gradient step of the QAT loss.

Open choices, as settings: ``rho`` (SAM radius, 0.05 as SAM/ZSAQ), ``perturb`` (``quantized``: e moves the
quantized weights Q(w) + e, the point the leaderboard's sharpness column measures; ``latent``: e moves the
float weights before rounding, Q(w + e), which rounds most small perturbations away; ZSAQ has the same
setting with the same default, through the same ``sam_step``), ``schedule`` (``step``:
both phases on every batch, the default; ``alternate``: one phase per batch; ``epoch``: whole epochs), and the
shared QAT fields (lr for weights, ``step_lr`` for step sizes, epochs, examples, KD weight/temperature).

Cost: a ``step``-schedule batch is three forward/backward passes (two for SAM, one for the step sizes) plus
the teacher's forward, against LSQ's one: about 2.5x LSQ's training time on the same data. Paper-scale
training: ``--set squat.epochs=3 --set squat.max_train_examples=0`` (GPU advised).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from bench.methods._qat import Distilled, QATConfig, QATMethod, split_parameters
from torch import nn

from bench import hookimpl
from bench.api import check_range
from bench.quant import LSQQuantizer, QuantLinear
from bench.training import ClipThenStep, frozen, gradient_step, sam_step


@dataclass(frozen=True)
class SQuATConfig(QATConfig):
    rho: float = 0.05  # SAM radius (L2 norm of the perturbation over all weights)
    perturb: Literal["quantized", "latent"] = "quantized"
    schedule: Literal["step", "alternate", "epoch"] = "step"

    def __post_init__(self):
        super().__post_init__()
        check_range(self, 0, None, "rho")


def lsq_layers(model: nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear) and isinstance(m.weight_quantizer, LSQQuantizer)]


def _rng_states() -> tuple:
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return cpu, cuda


def _set_rng_states(states: tuple) -> None:
    cpu, cuda = states
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class SQuATUpdate:
    """SQuAT's alternating update (a ``train_loop`` step function).

    - ``weight_phase``: the sharpness objective on the weights, step sizes frozen: one ``sam_step`` (ascend to
      w + e with e = rho * g/||g||, take the gradient there, restore w, step). ``perturb="quantized"`` moves the
      quantized weights (the forward reads Q(w) + e, ``bench.training.perturb_quantized``), ``"latent"`` the
      float weights before rounding (Q(w + e)). Both loss evaluations see the same dropout masks (the RNG state
      is replayed), so their gap is the perturbation's.
    - ``step_size_phase``: the plain objective on the step sizes, weights frozen: one gradient step.
    - ``schedule``: ``"step"`` runs both phases on every batch (weights, then step sizes); ``"alternate"``
      alternates them batch by batch; ``"epoch"`` alternates whole epochs (weights first; needs epochs >= 2).
    """

    def __init__(self, objective: Distilled, model: nn.Module, config, steps_per_epoch: int):
        self.objective, self.config, self.steps_per_epoch = objective, config, max(1, steps_per_epoch)
        self.weights, self.steps = split_parameters(model)
        self.layers = lsq_layers(model)
        self.calls = 0
        self.gaps: list[float] = []  # loss at w + e minus loss at w, per weight phase

    def weight_phase(self, model: nn.Module, batch: dict, optimizer, teacher_logits=None) -> float:
        cfg = self.config
        states = _rng_states()

        def closure() -> torch.Tensor:
            _set_rng_states(states)
            return self.objective(model, batch, teacher_logits)

        with frozen(self.steps):
            loss, perturbed = sam_step(
                self.weights,
                closure,
                ClipThenStep(optimizer, self.weights, cfg.max_grad_norm),
                rho=cfg.rho,
                quantized=self.layers if cfg.perturb == "quantized" else (),
            )
        self.gaps.append(perturbed - loss)
        return loss

    def step_size_phase(self, model: nn.Module, batch: dict, optimizer, teacher_logits=None) -> float:
        with frozen(self.weights):
            loss = self.objective(model, batch, teacher_logits)
            return gradient_step(loss, self.steps, optimizer, self.config.max_grad_norm)

    def __call__(self, model: nn.Module, batch: dict, optimizer) -> float:
        index, self.calls = self.calls, self.calls + 1
        teacher_logits = self.objective.teacher_logits(batch)
        schedule = self.config.schedule
        if schedule == "step":
            loss = self.weight_phase(model, batch, optimizer, teacher_logits)
            self.step_size_phase(model, batch, optimizer, teacher_logits)
            return loss
        phase = index if schedule == "alternate" else index // self.steps_per_epoch
        if phase % 2 == 0:
            return self.weight_phase(model, batch, optimizer, teacher_logits)
        return self.step_size_phase(model, batch, optimizer, teacher_logits)


class SQuAT(QATMethod):
    description = (
        "SQuAT: LSQ QAT + KD alternating a SAM step on weights (steps frozen) and a step-size step "
        "(weights frozen) (reimplementation)"
    )
    data_used = "labeled"
    Config = SQuATConfig

    def update(self, objective, model, steps_per_epoch):
        self._update = SQuATUpdate(objective, model, self.config, steps_per_epoch)
        return self._update

    def quantize(self, model, spec, context):
        model = super().quantize(model, spec, context)
        gaps = self._update.gaps
        if gaps:  # the training-time sharpness SAM saw: loss at w + e minus loss at w, mean over weight phases
            context.report["sam_gap_mean"] = round(sum(gaps) / len(gaps), 6)
        return model


@hookimpl
def register_methods(register):
    register("squat", SQuAT)
