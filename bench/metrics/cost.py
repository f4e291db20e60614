"""What a method spent to make its model: one meter for every method, so the table can say who is
compute-matched.

Seconds alone mislead on a shared 2-core machine and cannot be compared across hosts; a count of
whole-model passes can. The runner wraps ``Method.quantize`` in ``MethodMeter``, which counts passes of
the task model: the model the method was handed and every copy of it (the hook travels with
``copy.deepcopy``, so a student copied from it and a teacher alike), plus any model the method asks the
context for (``MethodContext.pretrained``, PreQuant's start). It counts every forward pass of such a
whole model with the examples it carried, every backward pass through its output, and every optimizer
step the method takes (any optimizer: a generator's included). The same hooks for every method: a SAM
step costs two student forward/backward passes where an AdamW step costs one; GPTQ's block-by-block
calibration counts no whole-model pass (its seconds say what it cost). Passes of other models (a
generator LM) are not counted; their time is in the seconds.
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
    forward_passes: int = 0  # whole-model forward passes of the task model (student, teacher: any copy)
    backward_passes: int = 0  # backward passes through those passes' outputs
    examples: int = 0  # examples (sequences) through those forward passes
    optimizer_steps: int = 0  # optimizer steps taken inside the method (every optimizer)
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
    """Context manager: counts the task model's passes and times the method; ``cost`` holds the result.

    The hooks stay on copies the method made (the returned student among them) but count only while the meter
    is active, so evaluation, sharpness and latency passes after the method are never counted.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.cost = MethodCost()
        self.active = False
        # plain functions, not bound methods: copy.deepcopy of a module copies its hooks, and a bound method
        # would be copied with its meter, while a function is shared, so every copy counts here
        meter = self

        def on_forward(module, args, kwargs, output) -> None:
            if meter.active:
                meter.cost.forward_passes += 1
                meter.cost.examples += _batch_size(args, kwargs)
                tensor = _first_grad_tensor(output)
                if tensor is not None:
                    tensor.register_hook(on_backward)

        def on_backward(grad: torch.Tensor) -> torch.Tensor:
            if meter.active:
                meter.cost.backward_passes += 1
            return grad

        def on_step(optimizer, args, kwargs) -> None:
            if meter.active:
                meter.cost.optimizer_steps += 1

        self._on_forward, self._on_step = on_forward, on_step

    def watch(self, model: nn.Module) -> nn.Module:
        """Count ``model``'s passes too (a model the method obtained from the context); returns it."""
        self.cost._handles.append(model.register_forward_hook(self._on_forward, with_kwargs=True))
        return model

    def __enter__(self) -> MethodCost:
        self.watch(self.model)
        self.cost._handles.append(register_optimizer_step_post_hook(self._on_step))
        self.active, self._t0 = True, time.perf_counter()
        return self.cost

    def __exit__(self, *exc) -> None:
        self.cost.method_s = time.perf_counter() - self._t0
        self.active = False
        for handle in self.cost._handles:
            handle.remove()
        self.cost._handles.clear()
