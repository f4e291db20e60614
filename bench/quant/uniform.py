"""The one uniform quantizer every method uses: b-bit integer grid, min-max ranges, STE gradient.

Conventions (checked against ``torch.fake_quantize_per_channel_affine`` in the tests). At b bits every
grid has 2^b usable levels, whatever the method, so that methods are compared on equal grids:
- symmetric (default): zero point 0 (a scale-only grid, what the int8/int4 kernels take), integers in
  [-2^(b-1), 2^(b-1)-1], scale = -m / 2^(b-1) with m the row's signed extreme (its entry of largest |w|): the
  extreme lands exactly on the code -2^(b-1), and the sign of the scale turns that extra code toward the
  row's heavier side (llama.cpp's Q4_0/Q8_0 rule). So all 2^b levels are used: at 2 bits a Gaussian row has
  4 levels, {-2, -1, 0, 1} * |s|, mean squared error 3x lower than the ternary grid. GPTQ's sym convention
  (scale 2 max|w| / (2^b - 1)) reaches its bottom code only on the exact extreme, a rounding tie: measured on
  Gaussian rows it uses 3.5 levels of 4 on average, so it is not used here;
- symmetric ``narrow``: integers in [-(2^(b-1)-1), 2^(b-1)-1] (2^b - 1 levels: ternary at 2 bits), scale =
  max|w| / (2^(b-1)-1), +-max|w| exact. The absmax convention of LLM.int8/ZeroQuant/SmoothQuant and what
  several BERT papers mean by "2-bit"; only as an explicit option (``QuantSpec.narrow``), never a default;
- asymmetric: integers in [0, 2^b-1], scale = (max-min) / (2^b-1), zero point = round(-min/scale),
  with the range widened to contain 0 (as torch's observers and GPTQ do) so 0 stays exact;
- per-group: each row is cut into groups of ``group_size`` input columns; a last group shorter than
  that (hidden sizes like 576 with group 128) is quantized as a ragged group of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

EPS = 1e-8
CLIPS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QParams:
    scale: torch.Tensor  # broadcastable to the grouped tensor
    zero_point: torch.Tensor  # integer-valued float tensor, same shape as scale
    qmin: int
    qmax: int


def int_range(bits: int, symmetric: bool, narrow: bool = False) -> tuple[int, int]:
    """The integer codes of a ``bits``-bit grid: 2^b of them, or 2^b - 1 for the ``narrow`` symmetric grid."""
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits}")
    if narrow and not symmetric:
        raise ValueError("the narrow grid is symmetric only")
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return (-qmax if narrow else -qmax - 1), qmax
    return 0, 2**bits - 1


def levels(bits: int, symmetric: bool, narrow: bool = False) -> int:
    """How many distinct values the grid can represent (recorded in every result row)."""
    qmin, qmax = int_range(bits, symmetric, narrow)
    return qmax - qmin + 1


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


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, narrow: bool = False) -> QParams:
    """Grid for the per-row range [lo, hi] (lo <= 0 <= hi, already clipped).

    Symmetric grids have zero point 0. The full one puts the row's signed extreme (lo or hi, whichever is
    larger in magnitude; lo on a tie) on the code qmin = -2^(b-1): scale = -extreme / 2^(b-1), negative when
    the extreme is hi. The narrow one puts +-max(|lo|, hi) on +-qmax.
    """
    qmin, qmax = int_range(bits, symmetric, narrow)
    if symmetric:
        if narrow:
            scale = (torch.maximum(-lo, hi) / qmax).clamp_min(EPS)
        else:
            magnitude = torch.maximum(-lo, hi).clamp_min(EPS) / -qmin
            scale = torch.where(-lo >= hi, magnitude, -magnitude)
        return QParams(scale, torch.zeros_like(scale), qmin, qmax)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return QParams(scale, zero, qmin, qmax)


def compute_qparams(
    grouped: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip: str = "minmax",
    *,
    narrow: bool = False,
    percentile: float = 99.99,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> QParams:
    """Scale and zero point per row of ``grouped``, with the row's range chosen by ``clip``.

    - ``minmax``: the full range (nothing clipped);
    - ``percentile``: the ``percentile``-th percentile of w and its mirror;
    - ``mse``: GPTQ's search -- shrink the min-max range by 1 - i/grid for i < max_shrink*grid and keep,
      per row, the range with the least sum |w - q(w)|^norm (norm 2.4 as in the GPTQ reference code).
    """
    if clip not in CLIPS:
        raise ValueError(f"unknown clip {clip!r}; choose from {', '.join(CLIPS)}")
    g = grouped.detach()
    lo, hi = g.amin(dim=1, keepdim=True).clamp_max(0), g.amax(dim=1, keepdim=True).clamp_min(0)
    if clip == "percentile":
        lo = torch.quantile(g.float(), 1 - percentile / 100, dim=1, keepdim=True).to(g.dtype).clamp_max(0)
        hi = torch.quantile(g.float(), percentile / 100, dim=1, keepdim=True).to(g.dtype).clamp_min(0)
    if clip != "mse":
        return range_qparams(lo, hi, bits, symmetric, narrow)
    error = functools.partial(_clip_error, g, norm=norm)
    return shrink_search(lo, hi, bits, symmetric, error, grid=grid, max_shrink=max_shrink, narrow=narrow)


def shrink_search(
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    symmetric: bool,
    error: Callable[[QParams], torch.Tensor],
    *,
    grid: int = 100,
    max_shrink: float = 0.8,
    narrow: bool = False,
) -> QParams:
    """Per row, the range [lo, hi] * (1 - i/grid), i < max_shrink * grid, whose grid has the least ``error``.

    ``error(qparams)`` returns one value per row (shape like the scale): the rounding error for MSE
    clipping, the layer-output error for AWQ's clip search.
    """
    best = range_qparams(lo, hi, bits, symmetric, narrow)
    best_err = error(best)
    for i in range(1, int(max_shrink * grid)):
        shrink = 1 - i / grid
        candidate = range_qparams(lo * shrink, hi * shrink, bits, symmetric, narrow)
        err = error(candidate)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = QParams(
            torch.where(better, candidate.scale, best.scale),
            torch.where(better, candidate.zero_point, best.zero_point),
            best.qmin,
            best.qmax,
        )
    return best


def _clip_error(g: torch.Tensor, qp: QParams, norm: float) -> torch.Tensor:
    return (dequantize_int(quantize_int(g, qp), qp) - g).abs().pow(norm).sum(dim=1, keepdim=True)


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
    clip: str = "minmax",
    narrow: bool = False,
    qparams: QParams | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``w`` with a straight-through gradient (identity in the backward pass).

    ``qparams`` (per row of the grouped view) skips the range computation: frozen or learned grids.
    """
    grouped = group_view(w, granularity, group_size)
    qp = qparams if qparams is not None else compute_qparams(grouped, bits, symmetric, clip, narrow=narrow)
    wq = ungroup(dequantize_int(quantize_int(grouped, qp), qp), w)
    return w + (wq - w).detach()
