"""The one uniform quantizer every method uses: b-bit integer grid, min-max ranges, STE gradient.

Conventions (checked against ``torch.fake_quantize_per_channel_affine`` in the tests):
- symmetric: integers in [-2^(b-1), 2^(b-1)-1], zero point 0, scale = max|w| / (2^(b-1)-1)
  (the absmax convention of LLM.int8/ZeroQuant/SmoothQuant: the largest weight is exact);
- asymmetric: integers in [0, 2^b-1], scale = (max-min) / (2^b-1), zero point = round(-min/scale),
  with the range widened to contain 0 (as torch's observers and GPTQ do) so 0 stays exact;
- per-group: each row is cut into groups of ``group_size`` input columns; a last group shorter than
  that (hidden sizes like 576 with group 128) is quantized as a ragged group of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8


@dataclass(frozen=True)
class QParams:
    scale: torch.Tensor  # broadcastable to the grouped tensor
    zero_point: torch.Tensor  # integer-valued float tensor, same shape as scale
    qmin: int
    qmax: int


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def group_view(w: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """Reshape ``w`` (out, in) so that each row of the result shares one scale.

    per-tensor -> (1, N); per-channel -> (out, in); per-group -> (out * n_groups, group_size), the
    last group zero-padded (zeros never change a range that already contains 0).
    """
    if granularity == "per-tensor":
        return w.reshape(1, -1)
    if granularity == "per-channel":
        return w.reshape(w.shape[0], -1)
    if granularity == "per-group":
        rows = w.reshape(w.shape[0], -1)
        pad = (-rows.shape[1]) % group_size
        if pad:
            rows = torch.nn.functional.pad(rows, (0, pad))
        return rows.reshape(-1, group_size)
    raise ValueError(f"unknown granularity {granularity!r}")


def ungroup(grouped: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of ``group_view``: drop the padding and restore ``like``'s shape."""
    return grouped.reshape(like.shape[0], -1)[:, : like[0].numel()].reshape(like.shape)


def minmax_qparams(grouped: torch.Tensor, bits: int, symmetric: bool) -> QParams:
    """Scale and zero point per row of ``grouped`` from its min and max."""
    qmin, qmax = int_range(bits, symmetric)
    g = grouped.detach()
    if symmetric:
        scale = (g.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(EPS)
        zero = torch.zeros_like(scale)
    else:
        lo = g.amin(dim=1, keepdim=True).clamp_max(0)
        hi = g.amax(dim=1, keepdim=True).clamp_min(0)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return QParams(scale, zero, qmin, qmax)


def quantize_int(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes (as float) of ``x`` on the grid ``qp``; rounding is half-to-even like torch's."""
    return torch.clamp(torch.round(x / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)


def dequantize_int(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    return (q - qp.zero_point) * qp.scale


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    granularity: str = "per-channel",
    group_size: int = 128,
) -> torch.Tensor:
    """Quantize-dequantize ``w`` with a straight-through gradient (identity in the backward pass)."""
    grouped = group_view(w, granularity, group_size)
    qp = minmax_qparams(grouped, bits, symmetric)
    wq = ungroup(dequantize_int(quantize_int(grouped, qp), qp), w)
    return w + (wq - w).detach()
