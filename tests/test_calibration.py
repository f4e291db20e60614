"""Block-by-block calibration (``blockwise``) feeds each block's layers what a forward from the model's input would
(``stream_inputs``), with the earlier blocks as they were left: the shortcut GPTQ and AWQ take must not change
what they calibrate on."""

import logging
from functools import partial

import pytest
import torch
from tiny import llama_config, padded_batches, tiny_bert
from torch import nn
from transformers import LlamaForCausalLM

from bench.quant.calibration import blockwise, linear_layers, stream_inputs, transformer_blocks


class _ResidualAround(nn.Module):
    """Blocks whose residual sits outside them (x = x + block(x)): a block's output is not the next one's input."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(vocab_size=100, num_hidden_layers=3)).eval()  # use_cache: True


def _inputs(stream, layers: dict) -> dict[str, torch.Tensor]:
    seen: dict[str, list] = {name: [] for name in layers}
    stream(layers, lambda name, x: seen[name].append(x.clone()))
    return {name: torch.cat(xs) for name, xs in seen.items()}


@pytest.mark.parametrize(
    "make, batches, replays",
    [
        (tiny_bert, padded_batches(3, seed=1), True),  # padding tokens left out
        (_tiny_llama, padded_batches(3, seed=2), True),  # a KV cache in the call, position embeddings as kwargs
        (_ResidualAround, [{"x": torch.randn(4, 5, 16)} for _ in range(2)], False),
    ],
)
def test_each_block_sees_what_a_forward_from_the_input_gives_it_with_the_earlier_blocks_as_left(
    make, batches, replays, caplog
):
    model = make()
    blocks = transformer_blocks(model)
    assert len(blocks) >= 2
    with caplog.at_level(logging.INFO, logger="bench.quant.calibration"):
        steps = blockwise(model, batches, blocks)
        for name, block, stream in steps:
            layers = linear_layers(block, name)
            got = _inputs(stream, layers)
            want = _inputs(partial(stream_inputs, model, batches, stop_after=block), layers)
            assert got.keys() == want.keys()
            for layer in got:
                torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
            with torch.no_grad():  # "quantize" the block before the next one reads its outputs
                for layer in layers.values():
                    layer.weight.mul_(0.5).add_(0.01)
    assert ("calibrating each block from the model's input" in caplog.text) is not replays


def test_a_block_called_twice_per_forward_falls_back_to_the_whole_model():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

        def forward(self, x):
            for layer in [self.layers[0], *self.layers]:
                x = layer(x)
            return x

    model = Shared()
    (_, _, stream), *_ = blockwise(model, [{"x": torch.randn(2, 8)}], transformer_blocks(model))
    assert stream.func is stream_inputs


def test_recording_computes_the_blocks_on_the_first_batch_only_and_restores_them():
    model, batches = _tiny_llama(), padded_batches(3, seed=2)
    blocks = transformer_blocks(model)
    computed = {name: 0 for name, _ in blocks}
    for name, block in blocks:
        block.mlp.register_forward_hook(lambda *_a, name=name: computed.__setitem__(name, computed[name] + 1))
    for _ in blockwise(model, batches, blocks):  # no stream: the recording pass, then each block's advance
        pass
    assert list(computed.values()) == [1 + len(batches)] * (len(blocks) - 1) + [1]  # the last one is not advanced
    assert all("forward" not in block.__dict__ for _, block in blocks)


def _positions(stream, layers: dict) -> dict[str, torch.Tensor]:
    seen: dict[str, list] = {name: [] for name in layers}

    def record(name, x, position):
        assert position.shape == (x.shape[0],)
        seen[name].append(position)

    stream(layers, record, positions=True)
    return {name: torch.cat(p) for name, p in seen.items()}


@pytest.mark.parametrize("left_padded", [False, True])
def test_positions_count_each_sequences_real_tokens_from_zero_wherever_the_padding_sits(left_padded):
    batches = padded_batches(2, seed=3)  # rows 0-3 padded from position 11
    if left_padded:
        batches = [{k: v.flip(1) for k, v in b.items()} for b in batches]
    want = torch.cat(
        [
            torch.arange(16)[m.bool()] - (5 if left_padded and i < 4 else 0)
            for b in batches
            for i, m in enumerate(b["attention_mask"])
        ]
    )
    model = _tiny_llama()
    blocks = transformer_blocks(model)
    for name, block, stream in blockwise(model, batches, blocks):  # the replayed blocks and the whole-model pass
        layers = linear_layers(block, name)
        for got in (_positions(stream, layers), _positions(partial(stream_inputs, model, batches), layers)):
            for position in got.values():
                assert torch.equal(position, want)
