"""Typed --set overrides of method settings and fine-tune recipes."""

from dataclasses import dataclass
from typing import Literal

import pytest

from bench.api import apply_overrides
from bench.errors import BenchError


@dataclass
class Cfg:
    rho: float = 0.05
    steps: int = 10
    sam: bool = True
    discrepancy: Literal["kl", "mse"] = "kl"
    generator: str | None = None


def test_values_converted_to_declared_types():
    cfg = apply_overrides(
        "zsaq", Cfg(), {"rho": "0.1", "steps": "3", "sam": "false", "discrepancy": "mse", "generator": "none"}
    )
    assert cfg == Cfg(rho=0.1, steps=3, sam=False, discrepancy="mse", generator=None)
    assert apply_overrides("zsaq", Cfg(), {"generator": "opt-125m"}).generator == "opt-125m"
    assert apply_overrides("zsaq", Cfg(), {}) == Cfg()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"rhoo": "1"}, "unknown setting of 'zsaq' 'rhoo' (did you mean 'rho'?)"),
        ({"steps": "1.5"}, "zsaq.steps='1.5': expected int"),
        ({"sam": "maybe"}, "expected a boolean"),
        ({"discrepancy": "kll"}, "unknown value for zsaq.discrepancy 'kll' (did you mean 'kl'?)"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(BenchError) as info:
        apply_overrides("zsaq", Cfg(), overrides)
    assert message in str(info.value)
