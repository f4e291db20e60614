"""GPTQ (Frantar et al. 2022): second-order post-training quantization from a few calibration samples.

Sequential, as in the reference code: the blocks are quantized one after the other, and each block's
Hessians are taken from inputs that flow through the already-quantized earlier blocks, while the block
itself runs in full precision (its layers' quantizers are bypassed during the pass). The inputs are carried
from block to block (``bench.quant.calibration.blockwise``), not recomputed from the model's input. Linears outside the
blocks (BERT's pooler, a decoder's input projection) are quantized in the same execution order: those
that run before the first block first, the rest last.

The grid is the cell's ``QuantSpec`` grid, per-group grids dynamic as in the reference code unless act-order
(see ``methods._gptq_solver``); ``clip`` picks its
range like RTN's (``--set gptq.clip=mse`` is GPTQ's own shrink search). Activations are quantized (A-bits)
in the forward as usual, but the Hessian is built from the float input of each layer, as GPTQ does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from bench.methods._gptq_solver import SharedHessians, gptq_layer
from torch import nn
from tqdm.auto import tqdm

from bench import hookimpl
from bench.api import Method, MethodContext, QuantSpec, added_setting, check_range
from bench.quant.calibration import Stream, blockwise, linear_layers, stream_inputs, transformer_blocks
from bench.quant.layers import QuantLinear, WeightQuantizer, float_layers, freeze, quantize_model


@dataclass(frozen=True)
class GPTQConfig:
    n_samples: int = 128
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    # per-group grids: None = the reference code's (dynamic: each group gridded on its error-updated columns;
    # static with act-order), True = every group's grid from the original weight (AutoGPTQ's static_groups)
    static_groups: bool | None = None
    clip: Literal["minmax", "mse"] = "minmax"
    # times each calibration sequence's first token counts in the Hessians (1 = the paper's token average; 0 leaves
    # it out). An extension: in a decoder the first token is the attention sink, whose error every later token reads
    first_token_weight: float = added_setting(1.0)

    def __post_init__(self):
        check_range(self, 1, None, "n_samples", "block_size")
        check_range(self, 0, None, "damp", "first_token_weight")
        if self.act_order and self.static_groups is False:
            raise ValueError(
                "static_groups=False: act_order=True needs static groups (the quantized layer stores groups of "
                "contiguous columns); leave static_groups unset or true"
            )


class GPTQ(Method):
    description = "GPTQ: column-wise second-order PTQ with calibration Hessians (dynamic groups, optional act-order)"
    data_used = "calibration"
    Config = GPTQConfig

    def quantize(self, model: nn.Module, spec: QuantSpec, context: MethodContext) -> nn.Module:
        cfg = self.config
        model = quantize_model(
            model, spec, keep_fp=context.keep_fp, weight_quantizer=partial(WeightQuantizer, clip=cfg.clip)
        )
        batches = _to_device(context.calibration_batches(cfg.n_samples, self.name), _model_device(model))
        blocks = transformer_blocks(model)
        inside = {n for block_name, block in blocks for n in linear_layers(block, block_name)}
        outside = {n: m for n, m in _quant_layers(model).items() if n not in inside}
        if blocks and outside:  # Linears that run before the first block (a decoder's input projection)
            before = _run_before(model, batches, outside, blocks[0][1])
            stream = partial(stream_inputs, model, batches, stop_after=blocks[0][1])
            self._quantize_group({n: outside.pop(n) for n in before}, stream)
        for name, block, stream in tqdm(blockwise(model, batches, blocks), total=len(blocks), desc="gptq", leave=False):
            self._quantize_group(_quant_layers(block, name), stream)
        self._quantize_group(outside, partial(stream_inputs, model, batches))  # the head, BERT's pooler
        return freeze(model)

    def _quantize_group(self, layers: dict, stream: Stream) -> None:
        """One calibration pass (``stream``) accumulating the Hessians of ``layers`` (run in float), then GPTQ
        on each."""
        if not layers:
            return
        cfg = self.config
        hessians = SharedHessians(cfg.first_token_weight)
        with float_layers(layers.values(), activations=False):  # the Hessian of the float input
            stream(layers, hessians.add, positions=True)
        for name, layer in layers.items():
            hessian = hessians.hessian(name)
            if hessian is None:
                continue  # never ran on calibration data: left to the final freeze (RTN on its grid)
            gptq_layer(
                layer,
                hessian,
                block_size=cfg.block_size,
                damp=cfg.damp,
                act_order=cfg.act_order,
                static_groups=cfg.static_groups,
            )


def _quant_layers(module: nn.Module, prefix: str = "") -> dict[str, QuantLinear]:
    return {n: m for n, m in linear_layers(module, prefix).items() if isinstance(m, QuantLinear)}


def _run_before(model: nn.Module, batches: list[dict], layers: dict, block: nn.Module) -> list[str]:
    """Names of ``layers`` that receive inputs before ``block`` finishes (one batch is enough to tell)."""
    seen: list[str] = []
    stream_inputs(model, batches[:1], layers, lambda name, _x: seen.append(name), stop_after=block)
    return list(dict.fromkeys(seen))


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _to_device(batches: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in batches]


@hookimpl
def register_methods(register):
    register("gptq", GPTQ)
