"""Feeding calibration batches through a model and streaming each layer's inputs to a callback.

PTQ methods differ in what they accumulate from a layer's inputs (GPTQ: X^T X, AWQ: mean |x| per
channel, SmoothQuant and static activation quantizers: max |x|), not in how they get them; this is
the one place that runs the calibration forward passes: the whole model at once (``stream_inputs``), or
block after block for the sequential methods (``blockwise``), each block on the outputs of the blocks
already quantized before it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial

import torch
from torch import nn

from bench.quant.layers import QuantLinear, float_layers
from bench.training import eval_mode

log = logging.getLogger(__name__)

LINEAR_TYPES = (nn.Linear, QuantLinear)
# (layer name, its input as (tokens, features)[, each token's position in its sequence with positions=True])
OnInput = Callable[..., None]
Stream = Callable[..., None]  # (layers, on_input, *, positions=False): feeds calibration inputs to on_input


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


def _input_hooks(layers: dict[str, nn.Module], on_input: OnInput, mask: list, positions: bool = False) -> list:
    """Pre-hooks calling ``on_input`` with each layer's input flattened to (tokens, features), the padding
    tokens of ``mask[0]`` (the current batch's attention mask, when it has one) left out. Layers that read one
    tensor (q/k/v) are handed one ``x`` object, so a consumer can tell they share it. With ``positions``, the
    call is ``on_input(name, x, position)``: each row's position among its sequence's real tokens (0 = the first
    real token, wherever padding sits), or None where the input has no (batch, sequence) axes."""
    last: list = [None, None, None]  # the last input tensor seen, the x made of it, its rows' positions

    def make_hook(name):
        def hook(_module, args):
            if args[0] is not last[0]:
                x, position = args[0].detach(), None
                if x.dim() == 3:
                    position = torch.arange(x.shape[1], device=x.device).expand(x.shape[:2])
                    if mask[0] is not None and tuple(x.shape[:2]) == tuple(mask[0].shape):
                        position = (mask[0].cumsum(1) - 1).to(x.device)[mask[0]]
                        x = x[mask[0]]
                    position = position.reshape(-1)
                last[:] = [args[0], x.reshape(-1, x.shape[-1]), position]
            if positions:
                on_input(name, last[1], last[2])
            else:
                on_input(name, last[1])

        return hook

    return [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]


@torch.no_grad()
def stream_inputs(
    model: nn.Module,
    batches: Iterable[dict],
    layers: dict[str, nn.Module],
    on_input: OnInput,
    *,
    stop_after: nn.Module | None = None,
    positions: bool = False,
) -> None:
    """Run ``model(**batch)`` on each batch and call ``on_input(name, x)`` for every layer in ``layers``.

    ``x`` is the layer's input flattened to (tokens, features) with padding tokens removed (where the
    batch has an attention mask), so statistics are over real tokens only. If ``stop_after`` is given,
    the forward pass stops once that module has run: later layers are not needed yet. ``positions`` adds each
    row's position in its sequence as a third argument (GPTQ's ``first_token_weight`` needs it: flattening
    loses it).
    """
    current_mask: list[torch.Tensor | None] = [None]

    def stop(_module, _args, _output):
        raise _StopForward

    handles = _input_hooks(layers, on_input, current_mask, positions)
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        with eval_mode(model):
            for batch in batches:
                current_mask[0] = _token_mask(batch)
                try:
                    model(**batch)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def blockwise(
    model: nn.Module, batches: list[dict], blocks: list[tuple[str, nn.Module]]
) -> Iterator[tuple[str, nn.Module, Stream]]:
    """Yield ``(name, block, stream)`` for each block in order; ``stream(layers, on_input[, positions=True])``
    feeds the block's layers their inputs on the calibration batches (as ``stream_inputs`` does), with every
    earlier block as the caller left it when it asked for the next one (quantized, for GPTQ and AWQ).

    The block's inputs are carried from block to block, as the GPTQ and AWQ reference codes do: one forward of
    each block but the last to advance them, plus one per ``stream`` call (2L - 1 block forwards for L blocks),
    instead of a forward from the model's input for each block (~L^2/2). That needs each block's output to be
    the next block's input (a residual inside the block, as in every HF transformer), which one model forward
    checks; where it is not so (a residual around the blocks), each ``stream`` runs the model from its input,
    stopping after the block.
    """
    replay = _BlockReplay.capture(model, batches, blocks) if blocks else None
    if replay is None and blocks:
        log.info("blocks do not chain output -> input: calibrating each block from the model's input")
    for i, (name, block) in enumerate(blocks):
        if replay is None:
            yield name, block, partial(stream_inputs, model, batches, stop_after=block)
        else:
            yield name, block, partial(replay.stream, i)
            if i + 1 < len(blocks):
                replay.advance(i)


class _BlockReplay:
    """Each calibration batch's inputs of every block, recorded in one forward pass: the first block's hidden
    states, and the other arguments of each block's call (masks, position embeddings; a KV cache dropped), which
    do not change when earlier blocks are quantized. The hidden states then advance one block at a time."""

    def __init__(self, blocks: list[nn.Module], calls: list[list[tuple]], hidden: list, masks: list):
        self.blocks, self.calls, self.hidden, self.masks = blocks, calls, hidden, masks

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, batches: list[dict], blocks: list[tuple[str, nn.Module]]):
        """The replay, or None when a block's input is not the previous block's output (or no batch reached
        the blocks).

        Only the first batch runs the blocks (in float): it shows that they chain, and that each returns a
        plain tensor, so nothing but the hidden states flows from block to block. The other batches then pass
        through them unchanged: their calls are recorded without computing them."""
        modules = [block for _, block in blocks]
        calls: list[list[tuple]] = []
        hidden, masks, last_output, chained, plain = [], [], [None], [True], [True]

        def before(i):
            def hook(_module, args, kwargs):
                x, call = _without_hidden(args, kwargs)
                if x is None or (i > 0 and not (last_output[0] is x or torch.equal(last_output[0], x))):
                    chained[0] = False
                if i == 0:
                    hidden.append(x)
                calls[-1].append(call)

            return hook

        def after(i):
            def hook(_module, _args, output):
                plain[0] = plain[0] and isinstance(output, torch.Tensor)
                last_output[0] = _hidden_output(output)
                if i == len(modules) - 1:
                    raise _StopForward

            return hook

        handles = [m.register_forward_pre_hook(before(i), with_kwargs=True) for i, m in enumerate(modules)]
        handles += [m.register_forward_hook(after(i)) for i, m in enumerate(modules)]
        quantized = [m for block in modules for m in block.modules() if isinstance(m, QuantLinear)]
        try:
            with eval_mode(model), float_layers(quantized), contextlib.ExitStack() as passing:
                for b, batch in enumerate(batches):
                    calls.append([])
                    masks.append(_token_mask(batch))
                    try:
                        model(**batch)
                    except _StopForward:
                        pass
                    if len(calls[-1]) != len(modules) or not chained[0]:
                        return None
                    if b == 0 and plain[0]:
                        for block in modules:
                            passing.enter_context(_passing_through(block))
        finally:
            for handle in handles:
                handle.remove()
        return cls(modules, calls, hidden, masks) if hidden else None

    def _outputs(self, i: int, mask: list | None = None) -> Iterator[tuple[int, object]]:
        """Block ``i`` run on each batch's current inputs (``mask[0]`` set to the batch's attention mask first)."""
        with eval_mode(self.blocks[i]):
            for b, call in enumerate(self.calls):
                if mask is not None:
                    mask[0] = self.masks[b]
                args, kwargs = _with_hidden(*call[i], self.hidden[b])
                yield b, self.blocks[i](*args, **kwargs)

    @torch.no_grad()
    def stream(self, i: int, layers: dict[str, nn.Module], on_input: OnInput, *, positions: bool = False) -> None:
        mask: list[torch.Tensor | None] = [None]
        handles = _input_hooks(layers, on_input, mask, positions)
        try:
            for _ in self._outputs(i, mask):
                pass
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def advance(self, i: int) -> None:
        """Block ``i``'s outputs, as the block is now, become block ``i + 1``'s inputs."""
        for b, output in self._outputs(i):
            self.hidden[b] = _hidden_output(output)


@contextlib.contextmanager
def _passing_through(block: nn.Module) -> Iterator[None]:
    """``block`` returns its hidden-states input unchanged (its hooks still run): a call recorded, not computed."""
    own = block.__dict__.get("forward")  # an instance-level forward (accelerate's hooks) is put back

    def forward(*args, **kwargs):
        return _without_hidden(args, kwargs)[0]

    block.forward = forward
    try:
        yield
    finally:
        if own is None:
            del block.forward
        else:
            block.forward = own


def _without_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, tuple]:
    """A block call's hidden states and the rest of the call (a KV cache dropped: replayed calls must not grow
    it)."""
    from transformers.cache_utils import Cache  # lazy: transformers costs `bench list` ~2 s

    kwargs = {k: None if isinstance(v, Cache) or k in _CACHES else v for k, v in kwargs.items()}
    if args:
        return args[0], (None, args[1:], kwargs)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], ("hidden_states", (), {**kwargs, "hidden_states": None})
    return None, (None, (), kwargs)


def _with_hidden(slot, args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if slot is None:
        return (hidden, *args), kwargs
    return args, {**kwargs, slot: hidden}


def _hidden_output(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


_CACHES = ("past_key_values", "past_key_value", "layer_past", "cache")  # a legacy tuple cache is no Cache
