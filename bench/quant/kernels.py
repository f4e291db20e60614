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
- ``int8-gemm``: quantized activations (``a_bits``: ``DynamicActQuantizer`` per token, or a frozen
  ``StaticActQuantizer`` per tensor) with 2..8-bit per-channel/per-tensor weights, any shape -> uint8
  activation codes x int8 weight codes on oneDNN's int8 GEMM (``torch.ops.onednn.qlinear_pointwise``, the
  op inductor's x86 int8 lowering calls), int32 accumulation, fp32 output; zero points and the per-token
  scale are applied after it (see ``Int8GemmLinear``). Smoothed layers (``input_scale``) divide x by s before
  quantizing, as every kernel here does (a deployment folds 1/s into the op producing x). Measured on this
  CPU (torch 2.13, AVX2, no VNNI; 1 thread, p50, M x K x N): ``torch._int_mm`` is exact but slower than
  FP32 (1x2048x2048: 3.3 ms vs 1.4; 128x2048x2048: 564 ms vs 29), so it is not used; oneDNN and fbgemm
  (``quantized::linear_*``) run 128x384x1536 in 1.9-2.1 ms vs FP32 4.1; at 1 token fbgemm is faster
  (1x2048x2048: 0.9 ms, oneDNN 2.2, FP32 2.4), at 128 tokens it is not (whole MiniLM W4A8: 171 ms vs
  oneDNN's 161), and it needs the qint8 tensors torch 2.13 deprecates (pytorch#184982): oneDNN it is.

Precision: the only change from the fake-quant layer is bfloat16 rounding of the activations, of the
scales and zeros, and of the kernel's output; ``KERNEL_RTOL`` bounds the relative error (Frobenius norm)
of a layer's output against the fake-quant layer, checked in the tests (measured: about 3e-3). The
int8 GEMM uses the scored model's own integer codes, so only float32 rounding differs:
``INT8_GEMM_RTOL`` = 1e-5 (measured below 1e-6). A whole model agrees as closely only while no activation
lands within float rounding of a code boundary: then the two round it to neighbouring codes, and the gap
grows layer by layer, as it does between the fake-quant model in float32 and in float64 (MiniLM, 128
tokens, last hidden state: kernel vs fake-quant 3.9e-2 at W8A8, 4.8e-2 at W4A8; float64 vs float32
fake-quant 3.8e-2 and 4.8e-2; every layer on the same input within 4e-7; the tiny test BERT: 2.5e-7).

Everything else stays simulated and is counted as ``simulated``: 2/3/5/6/7-bit weights without
activation quantization, 8-bit per-group or with ``in_features`` not a multiple of 16, shapes the int4
kernel rejects, per-group weights with quantized activations (oneDNN's int8 GEMM takes one scale per
output channel: a group grid would need one GEMM per group), PreQuant's outlier layers with quantized
activations (their float slices multiply Q(x)), and activation quantizers other than the two above.
torch's dynamic int8 (``quantize_dynamic``) is not used: it quantizes activations per tensor (one scale
per call, 7-bit ``reduce_range`` on x86), not per token like ``DynamicActQuantizer``, so it would time a
different model. A simulated layer runs an FP32 matmul on its precomputed dequantized weight: no speedup,
and no fake-quant overhead either.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import torch
from torch import nn

from bench.quant.act_static import StaticActQuantizer
from bench.quant.export import QuantizedWeight, is_packable, quantize_linear
from bench.quant.layers import (
    DynamicActQuantizer,
    OutlierQuantLinear,
    QuantLinear,
    QuantTiedHead,
    outlier_corrected,
    replace_module,
)
from bench.quant.uniform import QParams, compute_qparams, group_view, ungroup

INT4_GROUP_SIZES = (256, 128, 64, 32)  # accepted by _weight_int4pack_mm_for_cpu (torch 2.13)
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs out_features % 16 == 0
INT4_INNER_K_TILES = 2
INT8_K_MULTIPLE = 16  # _weight_int8pack_mm (bf16) segfaults on torch 2.13 unless in_features % 16 == 0
KERNEL_DTYPE = torch.bfloat16  # the only activation dtype both kernels are fast for on CPU
KERNEL_RTOL = 1e-2  # relative output error (Frobenius) of a real-kernel layer vs the fake-quant layer
INT8_GEMM_RTOL = 1e-5  # the same for Int8GemmLinear: integer arithmetic, only float32 rounding differs
# oneDNN's u8 x s8 -> fp32 linear (what inductor's x86 int8 lowering calls); absent in builds without mkldnn
ONEDNN_INT8 = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


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
            y = y.add_(self.bias)  # y is a fresh kernel output: in place saves an output-sized allocation
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


def _int8_rows(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A per-channel/per-tensor grid as int8 codes centred on 0, one float scale per row and the shifted zero.

    Returns ``(codes, scale, zero)`` with ``(q - zp) * s == (codes - zero) * scale`` exactly: symmetric codes are
    kept as they are (zero None: the grid's zero point is 0); asymmetric codes in [0, 2^b - 1] are shifted by
    2^(b-1) into [-2^(b-1), 2^(b-1) - 1], and their zero point alike. Neither int8 kernel has a weight zero point,
    so its term is applied apart (rank-1, see the classes). A per-tensor scale is repeated for every row (the
    same grid); scales keep their sign (the default symmetric grid has negative ones).
    """
    out = qw.shape[0]
    offset = 0 if qw.symmetric else 2 ** (qw.bits - 1)
    codes = (qw.int_codes() - offset).to(torch.int8).contiguous()
    scale = qw.scale.reshape(-1).expand(out).float().contiguous()
    zero = None if qw.zero_point is None else qw.zero_point.reshape(-1).expand(out).float() - offset
    return codes, scale, zero


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
        codes, scale, zero = _int8_rows(qw)
        self.register_buffer("weight", codes)
        self.register_buffer("scales", scale.to(KERNEL_DTYPE))
        correction = None if zero is None else (zero * self.scales.float()).reshape(1, -1)
        self.register_buffer("zero_correction", correction)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        x = x2d.to(KERNEL_DTYPE).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        if self.zero_correction is None:
            return y
        return y.float() - x.float().sum(dim=1, keepdim=True) * self.zero_correction


def act_codes(quantizer: nn.Module, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation quantizer's grid on ``x2d`` (tokens x features) as unsigned codes: ``(u, scale, zero)``
    with ``quantizer(x) == (u - zero) * scale`` up to the fake-quantizer's straight-through float rounding.

    The same grid as the fake-quantizer (``compute_qparams`` per token for ``DynamicActQuantizer``, the frozen
    per-tensor grid for ``StaticActQuantizer``) and ``quantize_int``'s float operations in the same order
    (round half to even), so every code is the one the scored model uses; done in place, because allocating
    a fresh activation-sized tensor per step was measured up to 5x slower here (128 x 1536, a loaded machine).
    Codes are shifted by ``-qmin`` into [0, 2^b - 1] (a symmetric static grid: zero 2^(b-1)); ``u`` is float,
    ``scale`` and ``zero`` are (tokens, 1) or (1, 1).
    """
    if isinstance(quantizer, DynamicActQuantizer):
        qp = compute_qparams(x2d, quantizer.bits, symmetric=False)
    else:
        grid = quantizer.qparams()
        qp = QParams(grid.scale.to(x2d.dtype), grid.zero_point.to(x2d.dtype), grid.qmin, grid.qmax)
    u = (x2d / qp.scale).round_().add_(qp.zero_point).clamp_(qp.qmin, qp.qmax)  # quantize_int, in place
    return (u.sub_(qp.qmin) if qp.qmin else u), qp.scale, qp.zero_point - qp.qmin


def int8_gemm_serves(layer: QuantLinear, qw: QuantizedWeight) -> bool:
    """Whether ``Int8GemmLinear`` computes ``layer`` exactly: oneDNN present, a per-token dynamic or frozen
    per-tensor static activation grid of at most 8 bits, and one weight scale per output row."""
    act = layer.act_quantizer
    grid_ok = isinstance(act, DynamicActQuantizer) or (isinstance(act, StaticActQuantizer) and act.frozen)
    return (
        ONEDNN_INT8
        and grid_ok
        and int(act.bits) <= 8
        and qw.granularity in ("per-channel", "per-tensor")
        and not isinstance(layer, OutlierQuantLinear)  # its float slices would multiply Q(x): no kernel pairs them
    )


class Int8GemmLinear(_KernelLinear):
    """W(2..8)A(2..8): uint8 activation codes x int8 weight codes on oneDNN's int8 GEMM, int32 accumulation.

    With the activation grid ``x = (u - za) * sx`` (per token or per tensor) and the weight grid
    ``w = (c - zw) * sw`` (per row; ``_int8_rows``), the layer's ``Q(x) @ Q(W)^T`` is exactly
    ``sx * (G - za * wsum - rowsum(u) * zw * sw)`` with ``G = (u @ c^T) * sw`` the kernel's output and
    ``wsum = sw * rowsum(c - zw)`` precomputed: two rank-1 corrections (the second only for asymmetric weights)
    and a per-token rescale, then the bias in float.

    Exactness: without VNNI (this AVX2 CPU) x86 int8 GEMMs add adjacent u8 x s8 products into int16 with
    saturation (``vpmaddubsw``), so full-range codes go wrong: measured, 255 * 127 + 255 * 127 came out as 32767
    (oneDNN and fbgemm alike). A pair is safe when ``max(u) * 2 * max|c| <= 32767``: A8 with W2..W7 (|c| <= 64)
    is; A8 with W8 is split as ``u = 2 * (u >> 1) + (u & 1)``, both halves stacked as one GEMM of twice the
    tokens (the weight is read once, so a 1-token call costs little more; 128 tokens twice the arithmetic).
    A VNNI CPU would not need the split; it is kept everywhere, being exact everywhere.
    """

    kernel = "int8-gemm"

    def __init__(self, layer: QuantLinear, qw: QuantizedWeight):
        super().__init__(layer)
        self.act = layer.act_quantizer
        self.act_quantizer = nn.Identity()  # quantized inside ``matmul``, as integer codes
        codes, scale, zero = _int8_rows(qw)
        centred = codes.float() if zero is None else codes.float() - zero.reshape(-1, 1)
        self.register_buffer("weight", codes)
        self.register_buffer("scales", scale)
        self.register_buffer("kernel_zeros", torch.zeros_like(scale, dtype=torch.long))
        self.register_buffer("wsum", (scale * centred.sum(dim=1)).reshape(1, -1))
        self.register_buffer("zero_correction", None if zero is None else (zero * scale).reshape(1, -1))
        pair_bound = (2 ** int(self.act.bits) - 1) * 2 * 2 ** (qw.bits - 1)  # max |u1 c1 + u2 c2|
        self.split = pair_bound > torch.iinfo(torch.int16).max
        self._pack()

    def _pack(self) -> torch.Tensor:
        """oneDNN's packed weight (an opaque tensor: neither copyable nor saved, so rebuilt after a copy)."""
        self.__dict__["_packed"] = torch.ops.onednn.qlinear_prepack(self.weight, None)
        return self.__dict__["_packed"]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_packed", None)
        return state

    def _gemm(self, u: torch.Tensor) -> torch.Tensor:
        packed = self.__dict__.get("_packed")
        packed = self._pack() if packed is None else packed
        args = (1.0, 0, packed, self.scales, self.kernel_zeros, None, 1.0, 0, torch.float32, "none", [], "")
        return torch.ops.onednn.qlinear_pointwise(u, *args)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        u, sx, za = act_codes(self.act, x2d)
        codes = u.to(torch.uint8).contiguous()
        if self.split:  # u = 2 (u >> 1) + (u & 1): two halves of at most 127, one GEMM over both
            halves = self._gemm(torch.cat([codes >> 1, codes & 1]))
            g = halves[len(codes) :].add_(halves[: len(codes)], alpha=2)
        else:
            g = self._gemm(codes)
        g.addcmul_(za, self.wsum, value=-1)  # in place, as below: the kernel's output is ours to reuse
        if self.zero_correction is not None:
            g.addcmul_(u.sum(dim=1, keepdim=True), self.zero_correction, value=-1)
        return g.mul_(sx)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act.extra_repr()}, split={self.split}"


class Int4PackLinear(_KernelLinear):
    """2- to 4-bit weights on ``_weight_int4pack_mm_for_cpu`` (bfloat16 activations, scales and zeros). Codes of
    fewer than 4 bits sit in the kernel's 4-bit slots (u = q - c in [0, 15], c per group: ``_int4_offsets``) and
    map onto its (u - 8) * scale + zero exactly: a W3/W2 cell runs, and is timed at, the 4-bit kernel's speed."""

    kernel = "int4pack"

    def __init__(self, layer: QuantLinear, qw: QuantizedWeight, group: int):
        super().__init__(layer)
        self.group = group
        offset = _int4_offsets(qw)
        codes = qw.int_codes().to(torch.int32)
        unsigned = ungroup(group_view(codes, qw.granularity, qw.group_size) - offset.to(torch.int32), codes)
        self.register_buffer(
            "weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), INT4_INNER_K_TILES)
        )
        self.register_buffer("scales_and_zeros", _int4_scales_and_zeros(qw, group, offset))

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


def _int4_offsets(qw: QuantizedWeight) -> torch.Tensor:
    """Per grouped-view row, the c that stores q as the kernel's u = q - c in [0, 15]: the one nearest zp - 8.

    The kernel computes (u - 8) * scale + zero, zero = (8 + c - zp) * scale, with scale and zero in bfloat16;
    their rounding errors cancel badly when |8 + c - zp| is large next to a weight's |q - zp| (2-bit codes:
    1.5% of the output with c = qmin). With this c the zero is exactly 0 for every symmetric grid of <= 4 bits
    and every asymmetric one of <= 3 bits; 4-bit asymmetric codes fill all 16 slots (c = qmin = 0)."""
    zero_point = qw.qparams().zero_point
    return (zero_point.round() - 8).clamp(qw.qmax - 15, qw.qmin)


def _int4_scales_and_zeros(qw: QuantizedWeight, group: int, offset: torch.Tensor) -> torch.Tensor:
    """The kernel's (in // group, out, 2) table: w = (u - 8) * scale + zero with u = q - offset."""
    qp = qw.qparams()
    scale = qp.scale.float()
    zero = (8 + offset.float() - qp.zero_point.float()) * scale
    table = torch.stack([_per_column_group(qw, scale, group), _per_column_group(qw, zero, group)], dim=-1)
    return table.transpose(0, 1).to(KERNEL_DTYPE).contiguous()


def int4_group(qw: QuantizedWeight) -> int | None:
    """The kernel group size that expresses ``qw``'s grid exactly, or None if the kernel cannot."""
    out, k = qw.shape
    if qw.bits > 4 or out % INT4_N_MULTIPLE:
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
        xs = x if self.input_scale is None else x / self.input_scale
        return outlier_corrected(self.inner(x), xs, self.index, self.delta, self.dim)


def kernel_for(layer: nn.Module) -> nn.Module:
    """The real-kernel replacement of one ``QuantLinear`` or ``QuantTiedHead`` (a ``SimulatedLinear`` when torch
    has none); anything else, embedding tables included (a row lookup, no matmul), is returned as it is."""
    if isinstance(layer, QuantTiedHead):
        return _real_kernel(layer)
    if not isinstance(layer, QuantLinear) or not is_packable(layer):
        return layer
    if isinstance(layer, OutlierQuantLinear) and isinstance(layer.act_quantizer, nn.Identity):
        inner = _real_kernel(layer)
        return inner if isinstance(inner, SimulatedLinear) else OutlierCorrected(inner, layer)
    return _real_kernel(layer)


def _real_kernel(layer: QuantLinear | QuantTiedHead) -> nn.Module:
    qw = quantize_linear(layer.table if isinstance(layer, QuantTiedHead) else layer)
    if not isinstance(layer.act_quantizer, nn.Identity):
        return Int8GemmLinear(layer, qw) if int8_gemm_serves(layer, qw) else SimulatedLinear(layer)
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
    "int8pack", "int4pack", "int8-gemm", "simulated", and "fp32" for plain ``nn.Linear`` layers (kept heads). An LM
    head tied to a quantized table runs a kernel on the table's codes; the table's lookups stay as scored.
    The latency model is for timing (and layer outputs within ``KERNEL_RTOL``), not for training: it holds no
    float weights of quantized layers. ``inplace=False`` leaves ``model`` untouched: a copy of its modules that
    shares its tensors, read only (parameters, buffers, cached quantized weights), so building it costs the
    kernels' packed weights, not a second model (SmolLM2-135M: ~1 GB of float weights and caches).
    """
    target = model if inplace else copy.deepcopy(model, memo=_shared_tensors(model))
    kernels: Counter[str] = Counter()
    for name, module in list(target.named_modules()):
        if type(module) is nn.Linear:
            kernels["fp32"] += 1
        replacement = kernel_for(module)
        if replacement is module:
            continue
        kernels[replacement.kernel] += 1
        replace_module(target, name, replacement)
    return target.eval(), dict(kernels)


def _shared_tensors(model: nn.Module) -> dict[int, torch.Tensor]:
    """A ``copy.deepcopy`` memo under which ``model``'s tensors are shared, not copied: its parameters, buffers and
    the quantized weights its layers cached (``_qcache``)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [m.__dict__["_qcache"][1] for m in model.modules() if "_qcache" in m.__dict__]
    return {id(t): t for t in tensors}


def kernel_label(kernels: dict[str, int]) -> str:
    """The model-level kernel: "fp32" when nothing is quantized, "simulated" if any quantized layer is,
    else the real kernels that ran joined by '+' (e.g. "int4pack")."""
    real = sorted(k for k, n in kernels.items() if n and k not in ("fp32", "simulated"))
    if kernels.get("simulated"):
        return "simulated"
    return "+".join(real) if real else "fp32"
