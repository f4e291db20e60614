"""LSQ (Esser et al., ICLR 2020): a weight quantizer whose step size is learned with the weights.

Used by the QAT methods (SQuAT, LSQ, ZSAQ students). Forward values are exactly those of the uniform
quantizer with scale = step and zero point 0 (symmetric grid), so export and size accounting treat an
LSQ layer like any other. Gradients follow the paper: straight-through for rounding, zero for weights
clipped outside the grid, and the step-size gradient scaled by g = 1/sqrt(N * Qp), N being the number
of weights that share the step (a whole row for per-channel, a group for per-group).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.api import QuantSpec
from bench.errors import BenchError
from bench.quant.uniform import QParams, group_view, int_range, ungroup


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass (bit-exact, so exported grids match); gradient multiplied by ``factor``."""
    scaled = x * factor
    return x.detach() + (scaled - scaled.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class LSQQuantizer(nn.Module):
    """Symmetric uniform quantizer with a learnable step size per row (or group, or tensor).

    Pass the class itself as ``quantize_model(..., weight_quantizer=LSQQuantizer)``.
    """

    frozen = True  # its grid is explicit (the step), never re-derived from the weight

    def __init__(self, spec: QuantSpec, weight: torch.Tensor):
        super().__init__()
        if not spec.symmetric:
            raise BenchError("LSQ learns a symmetric grid; drop --asymmetric for LSQ-based methods")
        self.bits = spec.w_bits
        self.symmetric = True
        self.narrow = spec.narrow
        self.granularity = spec.granularity
        self.group_size = spec.group_size
        self.qmin, self.qmax = int_range(self.bits, True, self.narrow)
        grouped = group_view(weight.detach(), self.granularity, self.group_size)
        self.step = nn.Parameter(2 * grouped.abs().mean(dim=1, keepdim=True) / math.sqrt(self.qmax))

    def grad_factor(self, weight: torch.Tensor) -> float:
        per_step = group_view(weight, self.granularity, self.group_size).shape[1]
        return 1.0 / math.sqrt(per_step * self.qmax)

    def qparams(self, w: torch.Tensor | None = None) -> QParams:
        step = self.step.detach().abs().clamp_min(1e-8)
        return QParams(step, torch.zeros_like(step), self.qmin, self.qmax)

    def freeze(self, w: torch.Tensor, qparams: QParams | None = None) -> None:
        """Nothing to freeze: the learned step is the grid (kept for the WeightQuantizer interface)."""

    def clip_mask(self, w: torch.Tensor) -> torch.Tensor:
        """1.0 where ``w`` lies inside the grid's range (the straight-through gradient passes), 0.0 where clipped."""
        v = group_view(w.detach(), self.granularity, self.group_size) / self.step.detach().abs().clamp_min(1e-8)
        return ungroup(((v >= self.qmin) & (v <= self.qmax)).to(w.dtype), w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        grouped = group_view(w, self.granularity, self.group_size)
        step = scale_grad(self.step, self.grad_factor(w)).abs().clamp_min(1e-8)
        codes = round_ste(torch.clamp(grouped / step, self.qmin, self.qmax))
        return ungroup(codes * step, w)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, sym, {self.granularity}, group_size={self.group_size}, learnable step"
