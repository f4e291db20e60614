"""Real CPU kernels for quantized Linears, so latency measures low-bit arithmetic, not fake-quant.

``build_latency_model`` swaps each ``QuantLinear`` for a module that runs a real torch kernel on the
layer's own grid, where torch has one, and says which ran:

- ``int8pack``: 8-bit weights, per-channel or per-tensor (the per-tensor scale is repeated per channel:
  the same grid), symmetric, or asymmetric with a rank-1 zero-point correction (see ``Int8PackLinear``)
  -> ``torch.ops.aten._weight_int8pack_mm``. Found by experiment on torch 2.13: the kernel wants its
  scales in the activation dtype and is fast only in bfloat16 (float32/float16 take a reference path
  ~10x slower than FP32), so activations and scales are cast to bfloat16; and it crashes the process
  (segmentation fault) unless ``in_features`` is a multiple of 16, so other layers stay simulated.
- ``int4pack``: 4-bit weights, symmetric or asymmetric, any granularity ->
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` after ``_convert_weight_to_int4pack_for_cpu``. The
  kernel computes ``w = (u - 8) * scale + zero`` per group of ``g`` input columns, with ``u`` in [0, 15]
  and bfloat16 activations, scales and zeros (the only fast dtype). Our grid ``w = (q - zp) * s`` maps
  onto it exactly with ``u = q - qmin`` and ``zero = (8 + qmin - zp) * s``. A per-channel, per-tensor or
  per-group grid is written as kernel groups of the largest ``g`` in {256, 128, 64, 32} dividing both
  our group size and ``in_features`` (each scale repeated): hidden 576 with group 128 runs as kernel
  group 64, the ragged last group of 64 being one kernel group. Found by experiment: the kernel rejects
  other group sizes, ``in_features`` not divisible by ``g`` and ``out_features`` not divisible by 16.

Precision: the only change from the fake-quant layer is bfloat16 rounding of the activations, of the
scales and zeros, and of the kernel's output; ``KERNEL_RTOL`` bounds the relative error (Frobenius norm)
of a layer's output against the fake-quant layer, checked in the tests (measured: about 3e-3).

Everything else stays simulated and is counted as ``simulated``: 2/3/5/6/7-bit weights, 8-bit per-group
or with ``in_features`` not a multiple of 16, shapes the int4 kernel rejects, and every layer that
fake-quantizes its activations (``a_bits``). torch's dynamic int8 (``quantize_dynamic``) is not used:
it quantizes activations per tensor (one scale per call, 7-bit ``reduce_range`` on x86), not per token
like ``DynamicActQuantizer``, so it would time a different model. A simulated layer runs an FP32 matmul
on its precomputed dequantized weight: no speedup, and no fake-quant overhead either.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import torch
from torch import nn

from bench.quant.export import QuantizedWeight, is_packable, quantize_linear
from bench.quant.layers import OutlierQuantLinear, QuantLinear

INT4_GROUP_SIZES = (256, 128, 64, 32)  # accepted by _weight_int4pack_mm_for_cpu (torch 2.13)
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs out_features % 16 == 0
INT4_INNER_K_TILES = 2
INT8_K_MULTIPLE = 16  # _weight_int8pack_mm (bf16) segfaults on torch 2.13 unless in_features % 16 == 0
KERNEL_DTYPE = torch.bfloat16  # the only activation dtype both kernels are fast for on CPU
KERNEL_RTOL = 1e-2  # relative output error (Frobenius) of a real-kernel layer vs the fake-quant layer


class _KernelLinear(nn.Module):
    """Shared input/output handling: smoothing, activation quantizer, 2-D reshape, bias in float."""

    kernel = ""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.act_quantizer = layer.act_quantizer
        bias = None if layer.bias is None else layer.bias.detach().clone()
        inv = None if layer.input_scale is None else layer.input_scale.detach().clone()
        self.register_buffer("bias", bias)
        self.register_buffer("input_scale", inv)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale
        x = self.act_quantizer(x)
        y = self.matmul(x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class SimulatedLinear(_KernelLinear):
    """No real kernel: an FP32 matmul on the dequantized weight (equal to the fake-quant layer's)."""

    kernel = "simulated"

    def __init__(self, layer: QuantLinear):
        super().__init__(layer)
        self.register_buffer("weight", layer.quantized_weight().detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # QuantLinear's own arithmetic: equal outputs
        if self.input_scale is not None:
            x = x / self.input_scale
        return nn.functional.linear(self.act_quantizer(x), self.weight, self.bias)


class Int8PackLinear(_KernelLinear):
    """8-bit per-channel weights on ``_weight_int8pack_mm`` (bfloat16 activations and scales).

    The kernel has no zero point. An asymmetric grid (codes in [0, 255]) is stored as ``q - 128`` in
    int8 with the zero point shifted alike, and ``x @ ((q - zp) * s)^T`` is computed as the kernel's
    ``x @ ((q - 128) * s)^T`` minus the rank-1 term ``rowsum(x) * (zp - 128) * s`` (exact algebra, one
    extra reduction over the input; the same bfloat16 scales in both terms).
    """

    kernel = "int8pack"

    def __init__(self, layer: QuantLinear, qw: QuantizedWeight):
        super().__init__(layer)
        offset = 0 if qw.symmetric else 128  # symmetric codes are signed already; asymmetric ones are in [0, 255]
        self.register_buffer("weight", (qw.int_codes() - offset).to(torch.int8).contiguous())
        rows = qw.scale.reshape(-1).expand(self.out_features)  # per-tensor: one scale for every row
        self.register_buffer("scales", rows.to(KERNEL_DTYPE).contiguous())
        correction = None
        if qw.zero_point is not None:
            zero = qw.zero_point.reshape(-1).expand(self.out_features).float() - offset
            correction = (zero * self.scales.float()).reshape(1, -1)
        self.register_buffer("zero_correction", correction)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        x = x2d.to(KERNEL_DTYPE).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        if self.zero_correction is None:
            return y
        return y.float() - x.float().sum(dim=1, keepdim=True) * self.zero_correction


class Int4PackLinear(_KernelLinear):
    """4-bit weights on ``_weight_int4pack_mm_for_cpu`` (bfloat16 activations, scales and zeros)."""

    kernel = "int4pack"

    def __init__(self, layer: QuantLinear, qw: QuantizedWeight, group: int):
        super().__init__(layer)
        self.group = group
        unsigned = (qw.int_codes() - qw.qmin).to(torch.int32).contiguous()
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, INT4_INNER_K_TILES))
        self.register_buffer("scales_and_zeros", _int4_scales_and_zeros(qw, group))

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        x = x2d.to(KERNEL_DTYPE).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_group={self.group}"


def _per_column_group(qw: QuantizedWeight, values: torch.Tensor, group: int) -> torch.Tensor:
    """(out, in // group): ``values`` (one per grouped-view row) for each kernel group of ``group`` columns."""
    out, k = qw.shape
    n = k // group
    if qw.granularity == "per-tensor":
        return values.reshape(1, 1).expand(out, n)
    if qw.granularity == "per-channel":
        return values.reshape(out, 1).expand(out, n)
    per_row = values.reshape(out, -1)  # our groups of group_size, the last one possibly ragged
    return per_row.repeat_interleave(qw.group_size // group, dim=1)[:, :n]


def _int4_scales_and_zeros(qw: QuantizedWeight, group: int) -> torch.Tensor:
    """The kernel's (in // group, out, 2) table: w = (u - 8) * scale + zero with u = q - qmin."""
    qp = qw.qparams()
    scale = qp.scale.float()
    zero = (8 + qw.qmin - qp.zero_point.float()) * scale
    table = torch.stack([_per_column_group(qw, scale, group), _per_column_group(qw, zero, group)], dim=-1)
    return table.transpose(0, 1).to(KERNEL_DTYPE).contiguous()


def int4_group(qw: QuantizedWeight) -> int | None:
    """The kernel group size that expresses ``qw``'s grid exactly, or None if the kernel cannot."""
    out, k = qw.shape
    if qw.bits != 4 or out % INT4_N_MULTIPLE:
        return None
    span = qw.group_size if qw.granularity == "per-group" else k
    need = math.gcd(span, k)  # kernel groups must tile both our groups and the (ragged) row end
    return next((g for g in INT4_GROUP_SIZES if need % g == 0), None)


class OutlierCorrected(nn.Module):
    """A real-kernel layer plus the full-precision outlier slices of an ``OutlierQuantLinear`` (PreQuant):
    y = kernel(x) + x[:, idx] @ delta^T for columns, y[:, idx] += x @ delta^T for rows, with delta the float
    slices minus their quantized values (a dense FP32 matmul over the few selected dims). Named after the
    kernel it wraps: the low-bit matmul is the real kernel, the correction is ~0.5% of the weights."""

    def __init__(self, inner: _KernelLinear, layer: OutlierQuantLinear):
        super().__init__()
        self.inner, self.kernel, self.dim = inner, inner.kernel, layer.dim
        self.register_buffer("index", layer.outlier_index.detach().clone())
        self.register_buffer("delta", layer.outlier_delta().clone())
        self.register_buffer("input_scale", None if layer.input_scale is None else layer.input_scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        xs = x if self.input_scale is None else x / self.input_scale
        if self.dim == 1:
            return y + nn.functional.linear(xs.index_select(-1, self.index), self.delta)
        return y.index_add(-1, self.index, nn.functional.linear(xs, self.delta))


def kernel_for(layer: nn.Module) -> nn.Module:
    """The real-kernel replacement of one ``QuantLinear`` (a ``SimulatedLinear`` when torch has none)."""
    if not is_packable(layer):
        return layer
    if isinstance(layer, OutlierQuantLinear) and isinstance(layer.act_quantizer, nn.Identity):
        inner = _real_kernel(layer)
        return inner if isinstance(inner, SimulatedLinear) else OutlierCorrected(inner, layer)
    return _real_kernel(layer)


def _real_kernel(layer: QuantLinear) -> nn.Module:
    if not isinstance(layer.act_quantizer, nn.Identity):
        return SimulatedLinear(layer)  # activation quantization has no matching CPU kernel (see module doc)
    qw = quantize_linear(layer)
    k = qw.shape[1]
    if qw.bits == 8 and qw.granularity in ("per-channel", "per-tensor") and k % INT8_K_MULTIPLE == 0:
        return Int8PackLinear(layer, qw)
    group = int4_group(qw)
    if group is not None:
        return Int4PackLinear(layer, qw, group)
    return SimulatedLinear(layer)


@torch.no_grad()
def build_latency_model(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, dict[str, int]]:
    """``model`` with every ``QuantLinear`` on a real kernel where torch has one, and the layer count per kernel.

    Returns ``(latency_model, kernels)``; ``kernels`` counts layers by the kernel that runs them:
    "int8pack", "int4pack", "simulated", and "fp32" for plain ``nn.Linear`` layers (kept heads).
    The latency model is for timing (and outputs within ``KERNEL_RTOL``), not for training: it holds no
    float weights of quantized layers. ``inplace=False`` leaves ``model`` untouched (a deep copy).
    """
    target = model if inplace else copy.deepcopy(model)
    kernels: Counter[str] = Counter()
    for name, module in list(target.named_modules()):
        if type(module) is nn.Linear:
            kernels["fp32"] += 1
        if not is_packable(module):
            continue
        replacement = kernel_for(module)
        kernels[replacement.kernel] += 1
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, child, replacement)
    return target.eval(), dict(kernels)


def kernel_label(kernels: dict[str, int]) -> str:
    """The model-level kernel: "fp32" when nothing is quantized, "simulated" if any quantized layer is,
    else the real kernels that ran joined by '+' (e.g. "int4pack")."""
    real = sorted(k for k, n in kernels.items() if n and k not in ("fp32", "simulated"))
    if kernels.get("simulated"):
        return "simulated"
    return "+".join(real) if real else "fp32"
