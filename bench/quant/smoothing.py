"""Per-input-channel smoothing scales shared by SmoothQuant and AWQ.

Both methods rescale a Linear's input channels: y = (x / s) @ (W * s)^T, exact in float, installed as
``QuantLinear.input_scale``. They differ only in how s is chosen:
- SmoothQuant (Xiao et al. 2023): s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha), one fixed alpha, to move
  activation outliers into the weights so both quantize well (W8A8);
- AWQ (Lin et al. 2023): s_j = mean|X_j|^alpha (optionally / mean|W_:,j|^(1-alpha)), alpha searched per
  layer to minimize the quantized output error, protecting the weights of salient input channels.
Linears that read the same tensor (q/k/v of one attention, gate/up of one MLP) share one s, as in both
papers: one division of the shared input is what a deployment folds into the op that produced it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from bench.quant.calibration import stream_inputs
from bench.quant.uniform import group_view, ungroup

# Floor of every scale (and of weight maxima): SmoothQuant's reference code clamps at 1e-5, AWQ's at 1e-4.
SCALE_FLOOR = 1e-5


@dataclass
class ChannelStats:
    """Running per-input-channel statistics of a layer's input: max |x_j|, sum |x_j| and token count."""

    absmax: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    count: int = 0

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().reshape(-1, x.shape[-1])
        amax, asum = a.amax(0), a.sum(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.abssum = asum if self.abssum is None else self.abssum + asum
        self.count += a.shape[0]

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.count, 1)

    def same_input_as(self, other: ChannelStats) -> bool:
        """True when both layers saw identical inputs (same statistics to the bit on every token)."""
        return (
            self.count == other.count
            and self.absmax.shape == other.absmax.shape
            and torch.equal(self.absmax, other.absmax)
            and torch.equal(self.abssum, other.abssum)
        )


def collect_channel_stats(
    model: nn.Module, batches: Iterable, layers: dict[str, nn.Module], *, stop_after: nn.Module | None = None
) -> dict[str, ChannelStats]:
    """Per-channel statistics of each layer's input over the calibration tokens (padding excluded)."""
    stats = {name: ChannelStats() for name in layers}
    stream_inputs(model, batches, layers, lambda name, x: stats[name].update(x), stop_after=stop_after)
    return stats


def shared_input_groups(stats: dict[str, ChannelStats]) -> list[list[str]]:
    """Layer names grouped by identical input, in first-seen order (q/k/v together, a lone fc2 alone).

    Identical statistics over every calibration token only happen for one and the same tensor, so this
    finds the sharing from data, without an architecture table.
    """
    groups: list[list[str]] = []
    for name, st in stats.items():
        if st.absmax is None:
            continue
        for group in groups:
            if stats[group[0]].same_input_as(st):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Norm")  # nn.LayerNorm, LlamaRMSNorm, Qwen2RMSNorm, T5LayerNorm, ...


def _reads_channels_of(x: torch.Tensor, out: torch.Tensor) -> bool:
    """``x`` is ``out``, or a view of it that keeps its last (channel) dimension: BERT's pooler reads out[:, 0]."""
    if x is out:
        return True
    root = out if out._base is None else out._base
    return x._base is root and x.shape[-1] == out.shape[-1] and x.stride(-1) == out.stride(-1)


@torch.no_grad()
def norm_fed_layers(model: nn.Module, batch: dict, layers: dict[str, nn.Module]) -> set[str]:
    """Names of ``layers`` whose input is a normalization layer's output (LayerNorm, RMSNorm), or a slice of it.

    Those are the Linears SmoothQuant smooths (q/k/v, fc1/gate/up, BERT's pooler): 1/s folds into the
    norm's affine weights. Found by tensor identity on one forward pass, so no architecture table is needed;
    inputs computed from a norm's output (the attention output projection, fc2/down) are not.
    """
    outputs: list[torch.Tensor] = []
    found: set[str] = set()

    def on_norm(_module, _args, out):
        if isinstance(out, torch.Tensor):
            outputs.append(out)

    def on_layer(name):
        def hook(_module, args):
            if any(_reads_channels_of(args[0], out) for out in outputs):
                found.add(name)

        return hook

    handles = [m.register_forward_hook(on_norm) for m in model.modules() if _is_norm(m)]
    handles += [layer.register_forward_pre_hook(on_layer(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        model(**dict(batch))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return found


def weight_channel_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """max |W_:,j| over the rows of all ``weights`` (which share their input channels)."""
    return torch.cat([w.detach().abs().float() for w in weights], dim=0).amax(0)


def weight_channel_mean(weights: list[torch.Tensor], granularity: str, group_size: int) -> torch.Tensor:
    """AWQ's w_mean for duo scaling: mean over rows of |W| normalized by the max of its quantization group."""
    normalized = []
    for w in weights:
        grouped = group_view(w.detach().abs().float(), granularity, group_size)
        grouped = grouped / (grouped.amax(1, keepdim=True) + 1e-6)
        normalized.append(ungroup(grouped, w))
    return torch.cat(normalized, dim=0).mean(0)


def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha), floored so no channel divides by 0."""
    w_max = weight_channel_absmax(weights).clamp_min(SCALE_FLOOR)
    s = act_absmax.float().pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp_min(SCALE_FLOOR)


def awq_scales(act_absmean: torch.Tensor, alpha: float, weight_mean: torch.Tensor | None = None) -> torch.Tensor:
    """AWQ's s_j = mean|X_j|^alpha (duo scaling: / w_mean_j^(1-alpha)), normalized by sqrt(max * min).

    The normalization (AWQ's reference code) centres s around 1 on a log scale, so the weight grid's
    range is not blown up by an overall factor; alpha = 0 gives s = 1, i.e. plain round-to-nearest.
    """
    s = act_absmean.float().pow(alpha)
    if weight_mean is not None:
        s = s / (weight_mean.float().pow(1 - alpha) + 1e-4)
    s = s.clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def set_input_scale(layers: list[nn.Module], s: torch.Tensor) -> None:
    """Install ``s`` as the ``input_scale`` of each (Quant)Linear in ``layers``."""
    for layer in layers:
        layer.input_scale = s.detach().to(device=layer.weight.device, dtype=layer.weight.dtype).clone()
