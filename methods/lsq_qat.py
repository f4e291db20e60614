"""LSQ: plain quantization-aware training with learned step sizes (Esser et al., ICLR 2020) and knowledge
distillation from the fine-tuned FP model (as KDLSQ-BERT does). Reimplementation.

The baseline SQuAT is measured against: the same quantizer, objective, data, budget and loop
(``methods._qat``), with one joint gradient step on weights and step sizes per batch -- no SAM, no
alternation -- so the leaderboard isolates what SQuAT's alternating sharpness-aware update adds.
"""

from __future__ import annotations

from bench.methods._qat import QATConfig, QATMethod

from bench import hookimpl


class LSQ(QATMethod):
    description = (
        "LSQ QAT (learned step sizes, grad scale 1/sqrt(N*Qp)) from the fine-tuned FP model with KD from it; "
        "joint weight+step updates (reimplementation)"
    )
    data_used = "labeled"
    Config = QATConfig


@hookimpl
def register_methods(register):
    register("lsq", LSQ)
