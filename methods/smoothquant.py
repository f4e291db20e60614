"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, then quantize both.

Activations of transformers have a few input channels with outliers ~100x the rest; a per-token or
per-tensor activation grid then wastes nearly all its levels on them. SmoothQuant divides input channel j
by s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha) and multiplies the weight's column j by it: the product is
unchanged, and alpha (0.5 in the paper) balances how hard each side becomes to quantize.

Here s is ``QuantLinear.input_scale``: y = Q(x / s) @ Q(W * s)^T + b. As in the paper, only the Linears
that read a normalization layer's output are smoothed (``layers="norm"``: q/k/v, fc1/gate/up and BERT's
pooler, found by tensor identity on one forward pass); Linears reading one tensor share one s. For pre-LN
decoders (OPT, Llama) this is mathematically equal to folding 1/s into the LayerNorm's weight and bias,
as the paper deploys it; in post-LN BERT the LayerNorm output is also the residual, so a deployment
applies 1/s in the activation-quantization op instead (same numbers). ``layers="all"`` also smooths the
attention output projection and fc2/down, which have no LayerNorm to fold into (measured on MiniLM W8A8
with static per-tensor activations: smoothing fc2's sparse post-GELU input doubles its error, and the
last hidden state's relative error is 0.41 with "all" vs 0.21 with "norm").

SmoothQuant is meant for WxA8 (W8A8 in the paper): run it with ``--act-bits 8``. Without activation bits
the method still smooths and quantizes the weights, which only moves difficulty into the weights.
Statistics come from the full-precision model on ``n_samples`` calibration texts; static activation
ranges are symmetric per-tensor, as in the paper's W8A8 setting (reimplementation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bench import hookimpl
from bench.api import Method, MethodContext, QuantSpec, check_range
from bench.errors import BenchError
from bench.quant.act_static import calibrate_static_activations
from bench.quant.layers import QuantLinear, float_layers, freeze, quantize_model
from bench.quant.smoothing import (
    collect_channel_stats,
    norm_fed_layers,
    set_input_scale,
    shared_input_groups,
    smoothquant_scales,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength: 0 = all difficulty on activations, 1 = all on weights
    n_samples: int = 128  # calibration texts for max |x_j|
    # activation quantization when the cell has a_bits: per-token dynamic, or per-tensor static (calibrated)
    act_mode: Literal["dynamic", "static"] = "dynamic"
    # which Linears are smoothed: those reading a LayerNorm/RMSNorm output (the paper), every Linear, or none (the
    # paper's baseline: plain W8A8 with the same calibrated activation grid, so the smoothing's own effect shows)
    layers: Literal["norm", "all", "none"] = "norm"

    def __post_init__(self):
        check_range(self, 0, 1, "alpha")
        check_range(self, 1, None, "n_samples")


def smooth_model(model: nn.Module, batches: list, alpha: float, which: str = "norm") -> dict[str, torch.Tensor]:
    """Compute SmoothQuant scales on the current model and install them on its ``QuantLinear`` layers.

    ``which``: "norm" smooths the Linears that read a normalization layer's output, "all" every one.
    Statistics are taken with every Linear as it currently computes (call this before weights or
    activations are quantized to get the paper's FP statistics). Returns {layer name: s}.
    """
    if which not in ("norm", "all"):
        raise BenchError(f"smoothquant.layers={which!r}: choose norm or all")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if which == "norm":
        chosen = norm_fed_layers(model, batches[0], layers)
        layers = {n: m for n, m in layers.items() if n in chosen}
    stats = collect_channel_stats(model, batches, layers)
    scales = {}
    for group in shared_input_groups(stats):
        mods = [layers[n] for n in group]
        s = smoothquant_scales(stats[group[0]].absmax, [m.weight for m in mods], alpha)
        set_input_scale(mods, s)
        scales.update(dict.fromkeys(group, s))
    if not scales:
        log.warning(
            "smoothquant: no Linear was smoothed (none reads a LayerNorm/RMSNorm output; layers=all smooths all)"
        )
    return scales


class SmoothQuant(Method):
    description = (
        "SmoothQuant (calibration): smoothing s = max|X|^a / max|W|^(1-a) of the Linears after each LayerNorm, "
        "then RTN weights and per-token (or static per-tensor) activations; meant for WxA8: --act-bits 8 gives W8A8"
    )
    data_used = "calibration"
    Config = SmoothQuantConfig

    @torch.no_grad()
    def quantize(self, model: nn.Module, spec: QuantSpec, context: MethodContext) -> nn.Module:
        batches = context.calibration_batches(self.config.n_samples, self.name)
        model = quantize_model(model, spec, keep_fp=context.keep_fp)
        if self.config.layers != "none":
            with float_layers(m for m in model.modules() if isinstance(m, QuantLinear)):
                smooth_model(model, batches, self.config.alpha, self.config.layers)
        freeze(model)  # RTN on W * s
        if spec.a_bits and self.config.act_mode == "static":
            calibrate_static_activations(model, batches, spec.a_bits, symmetric=True)
        return model


@hookimpl
def register_methods(register):
    register("smoothquant", SmoothQuant)
