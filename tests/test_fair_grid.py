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
    """Per update: a teacher forward, two student forward/backward passes, a student and a generator step.
    Like zsaq, the student is a copy of the model handed in (which becomes the teacher)."""

    def __call__(self, model: nn.Module, steps: int) -> nn.Module:
        student = copy.deepcopy(model)  # carries the meter's hook along: its passes count
        optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)
        generator = nn.Linear(2, 2)
        generator_opt = torch.optim.SGD(generator.parameters(), lr=1e-3)
        ids = torch.randint(0, 100, (3, 8))
        for _ in range(steps):
            with torch.no_grad():
                model(input_ids=ids)
            for _ in range(2):
                student(input_ids=ids).logits.sum().backward()
            generator(torch.ones(1, 2))  # another model: not a pass of the task model
            optimizer.step()
            generator_opt.step()
        return student


def test_meter_counts_task_model_passes_examples_and_steps():
    model = tiny_bert()
    meter = MethodMeter(model)
    with meter:
        student = _SAMLike()(model, steps=3)
    cost = meter.cost.as_row()
    assert cost["forward_passes"] == 9 and cost["backward_passes"] == 6 and cost["examples"] == 27
    assert cost["optimizer_steps"] == 6 and cost["method_s"] > 0
    for after in (model, student):  # evaluation after the method is not its cost
        after(input_ids=torch.randint(0, 100, (1, 4))).logits.sum().backward()
    assert meter.cost.forward_passes == 9 and meter.cost.backward_passes == 6


def test_meter_watches_a_model_the_method_builds_from_the_context():
    meter = MethodMeter(tiny_bert())
    with meter:
        fresh = meter.watch(tiny_bert(seed=1))  # MethodContext.pretrained() goes through watch
        fresh(input_ids=torch.randint(0, 100, (2, 4))).logits.sum().backward()
    assert (meter.cost.forward_passes, meter.cost.backward_passes, meter.cost.examples) == (1, 1, 2)


@pytest.mark.parametrize("grad", [False, True])
def test_meter_counts_no_backward_for_a_no_grad_forward(grad):
    student = tiny_bert()
    with MethodMeter(student) as cost, torch.set_grad_enabled(grad):
        student(input_ids=torch.randint(0, 100, (2, 4)))
    assert (cost.forward_passes, cost.backward_passes) == (1, 0)


def test_cell_keys_are_frozen_so_old_run_dirs_resume():
    """The resume key of a cell is stored in every results.jsonl: its spelling must never change silently."""
    from bench.api import QuantSpec
    from bench.grid import Cell

    def key(spec):
        return Cell("rtn", {}, spec, "sst2", "minilm", 0, {"lr": 1}).key

    assert key(None) == "rtn|cfg=44136fa355b3|fp|sst2|minilm|seed=0|ft=1efe365887b5|limit=None"
    assert key(QuantSpec(4)).split("|")[2:7] == ["W4A32", "per-channel", "sym", "16lv", "sst2"]
    grouped = QuantSpec(2, a_bits=8, granularity="per-group", group_size=64, symmetric=False, embeddings=True)
    assert key(grouped).split("|")[2:8] == ["W2A8 g64 asym +emb", "per-group64", "asym", "4lv", "emb", "sst2"]
    assert key(QuantSpec(2, narrow=True)).split("|")[2:6] == ["W2A32 narrow", "per-channel", "sym", "3lv"]
