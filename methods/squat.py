"""SQuAT: Sharpness- and Quantization-Aware Training (Wang et al., arXiv 2210.07171). Reimplementation: no
official code exists; every open choice is a setting below.

LSQ QAT from the fine-tuned FP model with KD from it (the ``lsq`` method's core, ``methods._qat``), where each
update alternates two objectives (``methods._qat.SQuATUpdate``):

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

from bench.methods._qat import QATConfig, QATMethod, SQuATUpdate

from bench import hookimpl
from bench.api import check_range


@dataclass(frozen=True)
class SQuATConfig(QATConfig):
    rho: float = 0.05  # SAM radius (L2 norm of the perturbation over all weights)
    perturb: Literal["quantized", "latent"] = "quantized"
    schedule: Literal["step", "alternate", "epoch"] = "step"

    def __post_init__(self):
        super().__post_init__()
        check_range(self, 0, None, "rho")


class SQuAT(QATMethod):
    description = (
        "SQuAT: LSQ QAT + KD alternating a SAM step on weights (steps frozen) and a step-size step "
        "(weights frozen) (reimplementation)"
    )
    data_used = "labeled"
    Config = SQuATConfig
    name = "squat"

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
