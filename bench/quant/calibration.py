"""Feeding calibration batches through a model and streaming each layer's inputs to a callback.

PTQ methods differ in what they accumulate from a layer's inputs (GPTQ: X^T X, AWQ: mean |x| per
channel, SmoothQuant and static activation quantizers: max |x|), not in how they get them; this is
the one place that runs the calibration forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from bench.quant.layers import QuantLinear

LINEAR_TYPES = (nn.Linear, QuantLinear)


class _StopForward(Exception):
    """Raised by a hook to skip the rest of the forward once the layers of interest have been seen."""


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks: the longest ``nn.ModuleList`` whose items contain Linear layers.

    Works for BERT (``encoder.layer``), Llama/Qwen (``model.layers``), OPT (``decoder.layers``) and random
    tiny configs of them alike, without an architecture table.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if all(any(isinstance(m, LINEAR_TYPES) for m in block.modules()) for block in module):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        return []
    return [(f"{best[0]}.{i}", block) for i, block in enumerate(best[1])]


def linear_layers(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Linear (or QuantLinear) layers under ``module``, by full name, in definition order."""
    out = {}
    for name, child in module.named_modules():
        if isinstance(child, LINEAR_TYPES):
            out[f"{prefix}.{name}" if prefix and name else prefix or name] = child
    return out


def _token_mask(batch: dict) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None  # BatchEncoding too
    return mask.bool() if mask is not None else None


@torch.no_grad()
def stream_inputs(
    model: nn.Module,
    batches: Iterable[dict],
    layers: dict[str, nn.Module],
    on_input: Callable[[str, torch.Tensor], None],
    *,
    stop_after: nn.Module | None = None,
) -> None:
    """Run ``model(**batch)`` on each batch and call ``on_input(name, x)`` for every layer in ``layers``.

    ``x`` is the layer's input flattened to (tokens, features) with padding tokens removed (where the
    batch has an attention mask), so statistics are over real tokens only. If ``stop_after`` is given,
    the forward pass stops once that module has run: later layers are not needed yet.
    """
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(name):
        def hook(_module, args):
            x = args[0].detach()
            mask = current_mask[0]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask]
            on_input(name, x.reshape(-1, x.shape[-1]))

        return hook

    def stop(_module, _args, _output):
        raise _StopForward

    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current_mask[0] = _token_mask(batch)
            try:
                model(**batch)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
