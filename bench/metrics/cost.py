"""What a method spent to make its model: one meter for every method, so the table can say who is
compute-matched.

Seconds alone mislead on a shared 2-core machine and cannot be compared across hosts; a count of
whole-model passes can. The runner wraps ``Method.quantize`` in ``MethodMeter``, which counts, on the
model the method was handed (the student), every forward pass of the whole model with the examples it
carried, every backward pass through its output, and every optimizer step that updates one of its
parameters (torch's global optimizer step hook: SQuAT's alternating weight and step-size updates are two
steps, a generator's own optimizer none). The same hooks for every method: zsaq's SAM step
counts two forward/backward passes where gan's AdamW step counts one, and GPTQ's block-by-block
calibration counts none (it never runs the whole model; its seconds say what it cost).
Passes of other models (a teacher, a generator) are not counted: a copy of the student made inside the
method carries the hooks along, so each hook checks that it fires on the student itself.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

# input names whose first dimension is the batch (HF models, and plain modules called with x)
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "x", "pixel_values")


@dataclass
class MethodCost:
    """The row's ``cost``: what ``Method.quantize`` spent, apart from evaluation, sharpness and latency."""

    method_s: float = 0.0  # wall seconds inside Method.quantize
    forward_passes: int = 0  # whole-model forward passes of the student
    backward_passes: int = 0  # backward passes through the student's output
    examples: int = 0  # examples (sequences) through those forward passes
    optimizer_steps: int = 0  # optimizer steps that updated a student parameter
    _handles: list = field(default_factory=list, repr=False)

    def as_row(self) -> dict:
        out = asdict(self)
        out.pop("_handles")
        out["method_s"] = round(self.method_s, 3)
        return out


def _batch_size(args: tuple, kwargs: dict) -> int:
    for name in _BATCH_INPUTS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    first = args[0] if args else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else 0


def _first_grad_tensor(output) -> torch.Tensor | None:
    """The output tensor a backward pass flows through (HF ModelOutput: its first tensor, the logits/loss)."""
    values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple | list) else [output]
    return next((v for v in values if isinstance(v, torch.Tensor) and v.requires_grad), None)


class MethodMeter:
    """Context manager: counts the student's passes and times the method; ``cost`` holds the result."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cost = MethodCost()

    def __enter__(self) -> MethodCost:
        model, cost = self.model, self.cost

        def on_forward(module, args, kwargs, output):
            if module is not model:  # a deep copy of the student (a teacher) shares this hook
                return
            cost.forward_passes += 1
            cost.examples += _batch_size(args, kwargs)
            tensor = _first_grad_tensor(output)
            if tensor is not None:
                tensor.register_hook(_count_backward)

        def _count_backward(grad):
            cost.backward_passes += 1
            return grad

        def on_step(optimizer, args, kwargs):
            student = {id(p) for p in model.parameters()}  # read now: methods add parameters (LSQ steps)
            if any(id(p) in student for group in optimizer.param_groups for p in group["params"]):
                cost.optimizer_steps += 1

        cost._handles.append(model.register_forward_hook(on_forward, with_kwargs=True))
        cost._handles.append(register_optimizer_step_post_hook(on_step))
        self._t0 = time.perf_counter()
        return cost

    def __exit__(self, *exc) -> None:
        self.cost.method_s = time.perf_counter() - self._t0
        for handle in self.cost._handles:
            handle.remove()
        self.cost._handles.clear()
