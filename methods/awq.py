"""AWQ (Lin et al. 2023): activation-aware weight quantization.

Not all weights matter equally: the input channels with large activations carry most of the output, and
rounding their weights costs the most. AWQ scales those weight columns up before rounding (and the
inputs down by the same factor, y = Q(x / s) @ Q(W * s)^T + b, ``QuantLinear.input_scale``), which gives
them relatively finer steps. Per layer it searches s = mean|X_j|^alpha over alpha in {0, 1/grid, ...,
(grid-1)/grid}, normalized by sqrt(max(s) * min(s)), keeping the alpha with the least output error
||Q-layer(X) - X W^T||^2 on calibration inputs. Linears that read one tensor (q/k/v, gate/up) share one
s and their errors are summed (the paper searches on the attention/MLP output; summing the Linears'
errors is the simpler proxy used here). alpha = 0 is s = 1, plain round-to-nearest, so on the
calibration tokens the search never does worse than RTN.

Second step (``clip_search``): per row of each weight's quantization group, shrink the grid's range by a
factor in {1, 1 - 1/grid, ..., 0.55} (AWQ's max shrink 0.5) and keep the factor with the least squared
error of that group's contribution to the output, sum_t (x_t,group . (Q(w) - w))^2, on up to
``CLIP_TOKENS`` tokens of the (smoothed, float) inputs; the chosen grid is frozen into the layer's
``WeightQuantizer``. (AutoAWQ skips q/k in this step; here every Linear gets it.)

Blocks are processed in order, each on inputs produced by the already-quantized earlier blocks (the
current block runs in float while its inputs are recorded); Linears outside the repeated blocks
(BERT's pooler) are handled last. The inputs are carried from block to block
(``bench.quant.calibration.blockwise``), as AutoAWQ does. Reimplementation, after the paper and the AutoAWQ
reference code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from bench import hookimpl
from bench.api import Method, MethodContext, QuantSpec, check_range
from bench.quant.calibration import Stream, blockwise, linear_layers, stream_inputs, transformer_blocks
from bench.quant.layers import QuantLinear, float_layers, freeze, quantize_model
from bench.quant.smoothing import (
    ChannelStats,
    awq_scales,
    set_input_scale,
    shared_input_groups,
    weight_channel_mean,
)
from bench.quant.uniform import QParams, dequantize_int, group_view, quantize_int, shrink_search, ungroup

CLIP_TOKENS = 512  # tokens used by the clip search (AutoAWQ: n_sample_token=512)
CLIP_MAX_SHRINK = 0.5  # the clip search tries range factors down to 1 - CLIP_MAX_SHRINK (exclusive)


@dataclass(frozen=True)
class AWQConfig:
    n_samples: int = 128  # calibration texts
    grid: int = 20  # alpha in {0, 1/grid, ..., (grid-1)/grid}; also the clip search's step 1/grid
    clip_search: bool = True  # AWQ's second step: per-group range shrink minimizing output error
    duo_scaling: bool = False  # s = mean|X|^a / mean|W_normalized|^(1-a) (AutoAWQ's option) instead of mean|X|^a
    max_tokens: int = 4096  # calibration tokens kept per layer for the searches (evenly subsampled)

    def __post_init__(self):
        check_range(self, 1, None, "n_samples", "grid", "max_tokens")


# --------------------------------------------------------------------------- calibration inputs


def _evenly(x: torch.Tensor, k: int) -> torch.Tensor:
    """At most ``k`` rows of ``x``, evenly spaced (deterministic subsample)."""
    if x.shape[0] <= k:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, k, device=x.device).round().long()]


def collect_inputs(
    stream: Stream, batches: int, layers: dict[str, nn.Module], max_tokens: int
) -> tuple[dict[str, ChannelStats], dict[str, torch.Tensor]]:
    """Per-channel statistics over all calibration tokens ``stream`` feeds (from ``batches`` batches) and a
    subsample of at most ``max_tokens`` inputs."""
    stats = {name: ChannelStats() for name in layers}
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    per_batch = -(-max_tokens // max(batches, 1))

    def on_input(name: str, x: torch.Tensor) -> None:
        stats[name].update(x)
        chunks[name].append(_evenly(x, per_batch).float())

    stream(layers, on_input)
    samples = {name: _evenly(torch.cat(c), max_tokens) for name, c in chunks.items() if c}
    return stats, samples


# --------------------------------------------------------------------------- searches


def _output_error(layers: list[QuantLinear], x: torch.Tensor, refs: list[torch.Tensor]) -> float:
    return sum(
        (m(x.to(m.weight.dtype)).float() - ref).pow(2).mean().item() for m, ref in zip(layers, refs, strict=True)
    )


@torch.no_grad()
def search_scale(
    layers: list[QuantLinear], x: torch.Tensor, act_absmean: torch.Tensor, grid: int, duo_scaling: bool = False
) -> tuple[float, list[float]]:
    """Install on ``layers`` (sharing input ``x``) the AWQ scale with the least summed output error.

    Returns the chosen alpha and the error of every alpha tried (index i is alpha = i / grid). The weight
    grids follow W * s (unfrozen quantizers), so each candidate is quantized exactly as RTN would.
    """
    refs = [nn.functional.linear(x.to(m.weight.dtype), m.weight, m.bias).float() for m in layers]
    w_mean = None
    if duo_scaling:
        wq = layers[0].weight_quantizer
        w_mean = weight_channel_mean([m.weight for m in layers], wq.granularity, wq.group_size)
    errors, best = [], None
    for i in range(grid):
        s = awq_scales(act_absmean, i / grid, w_mean)
        set_input_scale(layers, s)
        errors.append(_output_error(layers, x, refs))
        if best is None or errors[-1] < errors[best[0]]:
            best = (i, s)
    set_input_scale(layers, best[1])
    return best[0] / grid, errors


def _row_output_error(x: torch.Tensor, delta: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """Squared output error each row of the grouped weight view causes: sum_t (x_t,group . delta_row)^2.

    Shape (rows of ``group_view(delta)``, 1): per-tensor one row, per-channel one per output, per-group one
    per (output, group) in ``group_view``'s order.
    """
    if granularity == "per-tensor":
        return (x @ delta.T).pow(2).sum().reshape(1, 1)
    width = delta.shape[1] if granularity == "per-channel" else group_size
    pad = (-delta.shape[1]) % width
    xg = nn.functional.pad(x, (0, pad)).reshape(x.shape[0], -1, width)
    dg = nn.functional.pad(delta, (0, pad)).reshape(delta.shape[0], -1, width)
    return torch.einsum("tgk,ogk->tog", xg, dg).pow(2).sum(0).reshape(-1, 1)


@torch.no_grad()
def search_clip(layer: QuantLinear, x: torch.Tensor, grid: int) -> QParams:
    """Freeze ``layer``'s weight grid at the per-row range shrink with the least output error on ``x``."""
    wq = layer.weight_quantizer
    w = layer.effective_weight().detach().float()
    xs = _evenly(x if layer.input_scale is None else x / layer.input_scale, CLIP_TOKENS).float()
    grouped = group_view(w, wq.granularity, wq.group_size)
    lo, hi = grouped.amin(1, keepdim=True).clamp_max(0), grouped.amax(1, keepdim=True).clamp_min(0)

    def output_error(qp: QParams) -> torch.Tensor:
        delta = ungroup(dequantize_int(quantize_int(grouped, qp), qp), w) - w
        return _row_output_error(xs, delta, wq.granularity, wq.group_size)

    best = shrink_search(
        lo, hi, wq.bits, wq.symmetric, output_error, grid=grid, max_shrink=CLIP_MAX_SHRINK, narrow=wq.narrow
    )
    dtype = layer.weight.dtype
    best = QParams(best.scale.to(dtype), best.zero_point.to(dtype), best.qmin, best.qmax)
    wq.freeze(layer.effective_weight(), best)
    return best


# --------------------------------------------------------------------------- the method


def _pending(scope: dict[str, nn.Module]) -> dict[str, QuantLinear]:
    return {n: m for n, m in scope.items() if isinstance(m, QuantLinear) and not m.weight_quantizer.frozen}


def quantize_stage(layers: dict[str, QuantLinear], stream: Stream, batches: int, config: AWQConfig) -> dict:
    """Search scales (and clips) for ``layers`` (not yet frozen) on the inputs ``stream`` feeds them, then
    freeze them."""
    if not layers:
        return {}
    with float_layers(layers.values()):
        stats, samples = collect_inputs(stream, batches, layers, config.max_tokens)
    report = {}
    for group in shared_input_groups(stats):
        mods = [layers[n] for n in group]
        alpha, _ = search_scale(mods, samples[group[0]], stats[group[0]].absmean, config.grid, config.duo_scaling)
        for name, m in zip(group, mods, strict=True):
            if config.clip_search:
                search_clip(m, samples[group[0]], config.grid)
            else:
                m.weight_quantizer.freeze(m.effective_weight())
            report[name] = alpha
    return report


class AWQ(Method):
    description = (
        "AWQ (calibration): per-channel scales s = mean|X|^a with a searched per layer (grid of 20) to minimize "
        "output error, then per-group range-shrink search; RTN grid; weight-only (activations per the cell)"
    )
    data_used = "calibration"
    Config = AWQConfig

    @torch.no_grad()
    def quantize(self, model: nn.Module, spec: QuantSpec, context: MethodContext) -> nn.Module:
        batches = context.calibration_batches(self.config.n_samples, self.name)
        model = quantize_model(model, spec, keep_fp=context.keep_fp)
        alphas, n = {}, len(batches)
        for name, block, stream in blockwise(model, batches, transformer_blocks(model)):
            alphas.update(quantize_stage(_pending(linear_layers(block, name)), stream, n, self.config))
        rest = partial(stream_inputs, model, batches)  # the Linears outside the blocks (BERT's pooler)
        alphas.update(quantize_stage(_pending(dict(model.named_modules())), rest, n, self.config))
        context.report["alphas"] = alphas  # the searched exponent per layer, in the row (method_info)
        return freeze(model)  # layers no calibration token reached: plain RTN


@hookimpl
def register_methods(register):
    register("awq", AWQ)
