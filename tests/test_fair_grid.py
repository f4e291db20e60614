"""The grid a fair comparison needs: the baseline (RTN) at every cell's exact grid, and the cost meter that
counts what every method spent the same way."""

import copy

import pytest
import torch
from tiny import tiny_bert
from torch import nn

from bench import plugins
from bench.metrics.cost import MethodMeter
from bench.runner import GridRequest, plan, role_method


def _plan(methods, **kw):
    request = GridRequest(methods=methods, bits=[2, 4], tasks=["sst2"], seeds=[0, 1], model="bert-tiny", **kw)
    cells, _ = plan(request, plugins.default())
    return cells


def _grid(cells, method):
    return sorted((c.bits_label, c.seed) for c in cells if c.method == method and not c.variant)


def test_roles_come_from_the_method_classes():
    loaded = plugins.default()
    assert role_method(loaded, "reference") == "fp32" and role_method(loaded, "baseline") == "rtn"


def test_baseline_is_added_at_every_grid_and_seed():
    cells = _plan(["zsaq", "prequant"])
    assert _grid(cells, "rtn") == _grid(cells, "zsaq") == _grid(cells, "prequant")
    assert {c.bits_label for c in cells if c.method == "rtn"} == {"W2A8", "W4A8"}  # zsaq's A8 grid, RTN included
    assert [c.seed for c in cells if c.method == "fp32"] == [0, 1]
    assert len({c.key for c in cells}) == len(cells)


def test_baseline_not_duplicated_and_droppable():
    assert len(_plan(["rtn", "gptq"])) == len({c.key for c in _plan(["rtn", "gptq"])})
    assert len([c for c in _plan(["rtn"]) if c.method == "rtn"]) == 4
    assert not [c for c in _plan(["gptq"], baseline=False) if c.method == "rtn"]
    # a tuned RTN is a contender, not the baseline: plain RTN still stands beside it
    tuned = _plan(["rtn"], settings={"rtn": {"clip": "mse"}})
    assert {c.variant for c in tuned if c.method == "rtn"} == {"clip=mse", ""}


class _SAMLike:
    """Two forward/backward passes and one optimizer step per update, plus a teacher forward (not counted)."""

    def __call__(self, student: nn.Module, steps: int) -> None:
        teacher = copy.deepcopy(student)  # carries the meter's hook along: it must not count
        optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)
        generator_opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1e-3)  # not the student's
        ids = torch.randint(0, 100, (3, 8))
        for _ in range(steps):
            with torch.no_grad():
                teacher(input_ids=ids)
            for _ in range(2):
                student(input_ids=ids).logits.sum().backward()
            optimizer.step()
            generator_opt.step()


def test_meter_counts_student_passes_examples_and_steps_only():
    student = tiny_bert()
    meter = MethodMeter(student)
    with meter:
        _SAMLike()(student, steps=3)
    cost = meter.cost.as_row()
    assert cost["forward_passes"] == 6 and cost["backward_passes"] == 6 and cost["examples"] == 18
    assert cost["optimizer_steps"] == 3 and cost["method_s"] > 0
    student(input_ids=torch.randint(0, 100, (1, 4)))  # after the method: hooks are gone
    assert meter.cost.forward_passes == 6


@pytest.mark.parametrize("grad", [False, True])
def test_meter_counts_no_backward_for_a_no_grad_forward(grad):
    student = tiny_bert()
    with MethodMeter(student) as cost, torch.set_grad_enabled(grad):
        student(input_ids=torch.randint(0, 100, (2, 4)))
    assert (cost.forward_passes, cost.backward_passes) == (1, 0)
