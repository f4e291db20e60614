"""GAN-only zero-shot QAT: ZSAQ's adversarial loop with a plain AdamW student step (no SAM).

It isolates what SAM adds (ZAQ / GENIE-style data-free QAT with a pre-trained LM generator). Same code as
``methods/zsaq.py``; only the default of ``student_optimizer`` differs, so every other setting (generator,
steps, lrs, ...) matches and the leaderboard compares like with like.
"""

from dataclasses import dataclass
from typing import Literal

from bench.methods.zsaq import ZSAQ, ZeroShotConfig

from bench import hookimpl


@dataclass(frozen=True)
class GanConfig(ZeroShotConfig):
    student_optimizer: Literal["sam", "adamw"] = "adamw"


class GanZeroShot(ZSAQ):
    description = "GAN-only zero-shot QAT (reimplementation): ZSAQ's generator loop, AdamW student (no SAM)"
    Config = GanConfig


@hookimpl
def register_methods(register):
    register("gan", GanZeroShot)
