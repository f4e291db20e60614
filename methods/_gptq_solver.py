"""GPTQ (Frantar et al. 2022) on one layer: quantize W column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's output error.

The layer-wise objective is ||X W^T - X Q^T||^2, whose Hessian in each row of W is H = 2/n * sum x x^T over
the calibration tokens x. The loop follows the reference implementation (IST-DASLab/gptq): damping of
``damp`` * mean(diag H), dead inputs zeroed, optional act-order, blocks of ``block_size`` columns with lazy
batch updates, and the upper Cholesky factor of H^-1 in place of repeated inverse updates.

Grids: per-tensor and per-channel grids are computed once from the original weight, as in the reference code.
Per-group grids are "dynamic" by default, as the reference code computes them: each group's scale and zero point
come from the group's columns as they are when GPTQ reaches its first column, i.e. after the error feedback of
every column before it, so the grid covers the weights it rounds. "Static" groups (AutoGPTQ's ``static_groups``)
take every group's grid from the original weight before any update: the only choice with act-order, whose
permuted column order would otherwise mix groups; without act-order they clip the updated weights at the original
ranges. (On SmolLM2-135M W4 g128 neither beat RTN's perplexity: static 23.20, dynamic 23.63, RTN 23.13. The loss
is in v_proj: the token-average Hessian underweights the attention-sink first token; counting it 64 times,
``SharedHessians(first_token_weight=64)``, gives 20.58 on 3 seeds; results/published/README.md, ptq-smollm2.)
Either way the grouping is
exactly the layer's ``WeightQuantizer``'s (ragged last group included), the result lies on the grid the layer is
frozen with, and rounding goes through ``quantize_int``/``dequantize_int``, the one uniform quantizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.quant.uniform import QParams, dequantize_int, group_view, quantize_int, ungroup


class HessianAccumulator:
    """Accumulates H = 2/n * sum x x^T over a layer's input tokens, fed one batch at a time.

    The sum is kept in float32 as in the reference code (each batch's x^T x is one BLAS call, half the time of
    float64 on CPU) and divided only when read; the 2/n scale does not change GPTQ's result, it only makes
    ``damp`` relative to a mean. The solver itself works in float64.
    """

    def __init__(self, features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(features, features, device=device, dtype=dtype)
        self.tokens = 0.0

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add inputs ``x`` of shape (tokens, features), token i counted ``weights[i]`` times (default once)."""
        x = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=self.sum.dtype)
        if weights is None:
            self.sum.addmm_(x.T, x)
            self.tokens += x.shape[0]
        else:
            weights = weights.to(device=self.sum.device, dtype=self.sum.dtype)
            self.sum.addmm_((x * weights[:, None]).T, x)
            self.tokens += weights.sum().item()

    @property
    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer: cannot build its Hessian")
        return self.sum * (2.0 / self.tokens)


class SharedHessians:
    """The Hessians of several layers fed by one calibration pass, one accumulator per distinct input: the
    layers that read the same tensor (q/k/v, gate/up) have the same Hessian, summed once.

    ``add(name, x[, position])`` is an ``on_input`` callback: the calibration hooks hand every layer reading one
    tensor the same ``x`` object, which is how sharing is recognized.

    ``first_token_weight`` counts each sequence's first token (``position == 0``) that many times: in a decoder it
    is the attention sink most heads attend to, so its rounding error reaches every later token, yet a token
    average gives it 1/length of the weight (an extension, not in the GPTQ paper; 1 is the paper's Hessian).
    """

    def __init__(self, first_token_weight: float = 1.0):
        self.first_token_weight = first_token_weight
        self.by_layer: dict[str, HessianAccumulator] = {}
        self._last: tuple[torch.Tensor, HessianAccumulator] | None = None

    def add(self, name: str, x: torch.Tensor, position: torch.Tensor | None = None) -> None:
        if self._last is not None and x is self._last[0]:
            if self.by_layer.setdefault(name, self._last[1]) is self._last[1]:
                return  # already summed for the layer that read it first
        accumulator = self.by_layer.get(name)
        if accumulator is None:
            accumulator = self.by_layer[name] = HessianAccumulator(x.shape[-1], x.device)
        weights = None
        if self.first_token_weight != 1.0 and position is not None:
            weights = torch.where(position == 0, self.first_token_weight, 1.0)
        accumulator.add(x, weights)
        self._last = (x, accumulator)

    def hessian(self, name: str) -> torch.Tensor | None:
        """The layer's Hessian, or None if no calibration token reached it."""
        accumulator = self.by_layer.get(name)
        return accumulator.hessian if accumulator is not None and accumulator.tokens else None


def expand_qparams(qparams: QParams, like: torch.Tensor, granularity: str, group_size: int) -> QParams:
    """The grid of each weight entry, as (out, in) scale and zero-point tensors.

    ``qparams`` holds one scale per row of ``group_view(like, granularity, group_size)``; spreading it over
    the entries lets each column be rounded with its own row/group's grid, whatever the grouping, and lets
    act-order permute the grid with the columns.
    """
    grouped = group_view(like, granularity, group_size)
    scale = ungroup(qparams.scale.expand(grouped.shape), like)
    zero = ungroup(qparams.zero_point.expand(grouped.shape), like)
    return QParams(scale, zero, qparams.qmin, qparams.qmax)


def inverse_hessian_cholesky(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, computed in float64 for stability.

    Row i of this factor, divided by its diagonal, is exactly the update GPTQ applies to the remaining
    columns after quantizing column i (the reference code's trick that replaces per-column inverse updates).
    """
    h = h.to(torch.float64).clone()
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qp: QParams) -> torch.Tensor:
    col_qp = QParams(scale, zero, qp.qmin, qp.qmax)
    return dequantize_int(quantize_int(w, col_qp), col_qp)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    qparams: QParams,
    granularity: str,
    group_size: int,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    regroup: Callable[[torch.Tensor], QParams] | None = None,
) -> tuple[torch.Tensor, QParams]:
    """GPTQ-quantized copy of ``weight`` (out, in), dequantized (float32), and the grid it lies on.

    ``qparams`` is the grid of ``group_view(weight, granularity, group_size)`` computed from the original weight.
    ``regroup`` (per-group granularity without act-order only) makes groups dynamic: it maps a group's current
    columns (out, <= group_size) to their grid (one row per output), called as GPTQ reaches the group; the returned
    grid is then assembled from those. ``hessian`` is (in, in); it is not modified.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if regroup is not None and (act_order or granularity != "per-group"):
        raise ValueError("dynamic groups (regroup) need per-group granularity without act-order")
    w = weight.detach().to(torch.float32).clone()
    grid = expand_qparams(qparams, weight.detach().to(torch.float32), granularity, group_size)
    scale, zero = grid.scale.to(torch.float32).clone(), grid.zero_point.to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, scale, zero = w[:, perm], scale[:, perm], zero[:, perm]
        h = h[perm][:, perm]

    hinv = inverse_hessian_cholesky(h, damp).to(torch.float32)
    groups = _DynamicGroups(regroup, group_size, scale, zero, qparams) if regroup is not None else None
    q = _blocked_pass(w, hinv, scale, zero, grid, block_size, groups)

    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q, (groups.qparams() if groups is not None else qparams)


class _DynamicGroups:
    """Per-group grids computed as the column loop reaches each group: writes them into the loop's entrywise
    ``scale``/``zero`` and keeps them, one per (output, group), for the layer to be frozen with."""

    def __init__(self, regroup, group_size: int, scale: torch.Tensor, zero: torch.Tensor, initial: QParams):
        self.regroup, self.size, self.scale, self.zero = regroup, group_size, scale, zero
        rows, groups = scale.shape[0], -(-scale.shape[1] // group_size)
        self.group_scale = initial.scale.reshape(rows, groups).clone()
        self.group_zero = initial.zero_point.reshape(rows, groups).clone()
        self.qmin, self.qmax = initial.qmin, initial.qmax

    def starts(self, column: int) -> bool:
        return column % self.size == 0

    def set(self, column: int, current: torch.Tensor) -> None:
        """The group starting at ``column``, whose columns are now ``current`` (out, <= size), gets its grid."""
        qp = self.regroup(current)
        g, end = column // self.size, column + current.shape[1]
        self.scale[:, column:end] = qp.scale.reshape(-1, 1).to(self.scale.dtype)
        self.zero[:, column:end] = qp.zero_point.reshape(-1, 1).to(self.zero.dtype)
        self.group_scale[:, g] = qp.scale.reshape(-1).to(self.group_scale.dtype)
        self.group_zero[:, g] = qp.zero_point.reshape(-1).to(self.group_zero.dtype)

    def qparams(self) -> QParams:
        return QParams(self.group_scale.reshape(-1, 1), self.group_zero.reshape(-1, 1), self.qmin, self.qmax)


def _blocked_pass(
    w: torch.Tensor,
    hinv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    grid: QParams,
    block_size: int,
    groups: _DynamicGroups | None = None,
) -> torch.Tensor:
    """The column loop with lazy batch updates: within a block, rank-1 updates on the block only; the
    columns after it get the block's accumulated errors in one matmul (the reference code's speed-up).

    A dynamic group is gridded on its columns as the unblocked algorithm would have them at its first column:
    the block's own columns as updated so far, and any columns past the block with the block's pending updates
    applied (the same as the reference code's whenever blocks and groups align, as at their defaults of 128)."""
    columns = w.shape[1]
    q = torch.zeros_like(w)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if groups is not None and groups.starts(i1 + i):
                end = min(i1 + i + groups.size, columns)
                current = w1[:, i : end - i1]
                if end > i2:  # the group runs past the block: add the block's pending updates to those columns
                    beyond = w[:, i2:end] - err1[:, :i] @ hinv[i1 : i1 + i, i2:end]
                    current = torch.cat([current, beyond], dim=1)
                groups.set(i1 + i, current)
            col = w1[:, i]
            qcol = _round(col, scale[:, i1 + i], zero[:, i1 + i], grid)
            q[:, i1 + i] = qcol
            err = (col - qcol) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q


def gptq_layer(
    layer,
    hessian: torch.Tensor,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool | None = None,
):
    """Run GPTQ on a ``QuantLinear`` in place: its weight becomes the quantized one and its quantizer is
    frozen on the grid used, so the layer's forward reproduces the GPTQ weight exactly.

    ``static_groups``: None = static with act-order, dynamic without (the reference code's); only per-group grids
    differ. Smoothed layers (``input_scale`` set by SmoothQuant/AWQ) are not supported: their effective weight is
    W * s and their Hessian would have to be taken over x / s; run GPTQ before smoothing, or extend this.
    """
    if getattr(layer, "input_scale", None) is not None:
        raise ValueError(
            "GPTQ on a smoothed QuantLinear (input_scale set) is not supported; it expects input_scale None"
        )
    static = act_order if static_groups is None else static_groups
    if act_order and not static:
        raise ValueError("GPTQ with act-order needs static groups (the layer stores groups of contiguous columns)")
    quantizer = layer.weight_quantizer
    weight = layer.weight.data
    dynamic = not static and quantizer.granularity == "per-group"
    wq, qparams = gptq_quantize(
        weight,
        hessian,
        quantizer.qparams(weight.float()),
        quantizer.granularity,
        quantizer.group_size,
        block_size=block_size,
        damp=damp,
        act_order=act_order,
        regroup=quantizer.qparams if dynamic else None,
    )
    layer.weight.data = wq.to(dtype=weight.dtype, device=weight.device)
    quantizer.freeze(layer.weight.data, qparams)
    return layer
