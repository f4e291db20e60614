"""Real low-bit storage of a quantized Linear (or embedding table): integer codes packed into a bitstream, plus
the grid.

A ``QuantLinear`` trains and evaluates on a fake-quantized float weight; this module turns its grid into
what a deployment stores, so a model's size is counted from real bytes rather than ``bits * numel / 8``
arithmetic, and so the round trip (pack -> unpack) proves the stored form is the evaluated weight.

Format (one ``PackedWeight`` per layer):
- ``codes``: unsigned codes ``q - qmin`` of the (out, in) weight, row-major, as a little-endian bitstream
  of ``bits`` bits each (code i occupies bits ``i*bits .. i*bits+bits-1``; bit j of the stream is bit
  ``j % 8`` of byte ``j // 8``). 8 codes of 3 bits take 3 bytes; 2 codes of 4 bits take 1 byte. Group
  padding (a ragged last group) is not stored.
- ``scale``: one per row of the grouped view (``bench.quant.uniform.group_view``), kept in the grid's own
  float dtype (float32 for a float32 model). Casting it to float16 would move the dequantized values off
  the evaluated weight, so the round trip would stop being exact; a deployment that wants half-precision
  scales changes the model and must be evaluated as such.
- ``zero_point``: None for a symmetric grid (always 0: nothing to store); otherwise one integer per scale
  in the smallest integer dtype holding the grid's range (uint8 for bits <= 8).
- ``input_scale``: the smoothing vector (SmoothQuant/AWQ) when the layer has one, in its own dtype; the
  stored weight is the quantized ``W * s``, and a deployment folds ``1/s`` into the producer of ``x``.

``quantize_linear`` gives the same grid with the codes left unpacked (``QuantizedWeight``, what the real
kernels in ``bench.quant.kernels`` repack into their own layouts); ``pack_linear`` packs them;
``packed_nbytes`` counts the stored bytes from the grid alone (``bench.metrics.size`` uses it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from bench.quant.layers import QUANT_LAYERS, QuantLinear
from bench.quant.uniform import QParams, dequantize_int, group_view, quantize_int, ungroup


@dataclass(frozen=True)
class WeightGrid:
    """A layer's grid as stored: shape, bit width, scales and zero points (the codes live in subclasses)."""

    shape: tuple[int, int]  # (out_features, in_features)
    bits: int
    qmin: int
    qmax: int
    symmetric: bool
    granularity: str
    group_size: int
    scale: torch.Tensor  # (rows of the grouped view, 1), the grid's float dtype (exact round trip)
    zero_point: torch.Tensor | None  # same shape as scale, smallest integer dtype; None when symmetric
    input_scale: torch.Tensor | None  # smoothing vector (in_features,), or None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def codes_nbytes(self) -> int:
        """Bytes of the packed codes: ``ceil(numel * bits / 8)``."""
        return (self.numel * self.bits + 7) // 8

    def grid_nbytes(self) -> dict[str, int]:
        def size(t):
            return 0 if t is None else t.numel() * t.element_size()

        return {
            "scales": size(self.scale),
            "zero_points": size(self.zero_point),
            "input_scales": size(self.input_scale),
        }

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes + scales + zero points + input scale.

        The few scalars of metadata (shape, bits, grid) are not counted: a handful of bytes per layer.
        """
        return self.codes_nbytes + sum(self.grid_nbytes().values())

    def qparams(self) -> QParams:
        zero = torch.zeros_like(self.scale) if self.zero_point is None else self.zero_point.to(self.scale.dtype)
        return QParams(self.scale, zero, self.qmin, self.qmax)

    def int_codes(self) -> torch.Tensor:  # pragma: no cover - interface
        """Signed integer codes ``q`` (int16, shape ``shape``) on the grid [qmin, qmax]."""
        raise NotImplementedError

    def unpack(self) -> torch.Tensor:
        """The dequantized weight: bit-for-bit the grid value the fake-quantizer evaluates.

        The same float operations as ``fake_quantize`` ((q - zero) * scale on the grouped view, in the
        scale's dtype) on the same operands, so the result is identical, not merely close. (The layer's
        ``quantized_weight()`` is the straight-through form ``w + (wq - w).detach()``; the tests check with
        ``torch.equal`` that it is this same tensor, clipped grids included.)
        """
        like = torch.empty(self.shape, dtype=self.scale.dtype)
        grouped = group_view(self.int_codes().to(self.scale.dtype), self.granularity, self.group_size)
        return ungroup(dequantize_int(grouped, self.qparams()), like)


@dataclass(frozen=True, kw_only=True)
class QuantizedWeight(WeightGrid):
    """Integer codes kept unpacked (int16): what the real kernels repack into their own layouts."""

    q: torch.Tensor  # (out, in) int16

    def int_codes(self) -> torch.Tensor:
        return self.q

    def pack(self) -> PackedWeight:
        grid = {f.name: getattr(self, f.name) for f in fields(WeightGrid)}
        return PackedWeight(**grid, codes=pack_bits((self.q.to(torch.int32) - self.qmin), self.bits))


@dataclass(frozen=True, kw_only=True)
class PackedWeight(WeightGrid):
    """A quantized weight as stored: codes packed into a bitstream, plus its grid."""

    codes: torch.Tensor  # uint8 bitstream of (q - qmin), see the module docstring

    def int_codes(self) -> torch.Tensor:
        unsigned = unpack_bits(self.codes, self.bits, self.numel)
        return (unsigned.to(torch.int16) + self.qmin).reshape(self.shape)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Little-endian bitstream of unsigned ``codes`` (each < 2**bits) as uint8, ``ceil(n*bits/8)`` bytes.

    Eight codes make exactly ``bits`` bytes, so the stream is built eight codes at a time in an int64
    word (at most 56 bits for bits <= 7) and cut into bytes: no per-bit tensors, fast on 100 M weights.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must be in [0, {2**bits - 1}] to pack into {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    octets = nn.functional.pad(flat, (0, (-n) % 8)).reshape(-1, 8)
    words = (octets << (bits * torch.arange(8, dtype=torch.int64))).sum(dim=1)
    stream = (words[:, None] >> (8 * torch.arange(bits, dtype=torch.int64))) & 0xFF
    return stream.to(torch.uint8).reshape(-1)[: (n * bits + 7) // 8]


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``n`` unsigned codes (uint8) of the bitstream ``data``."""
    if data.numel() * 8 < n * bits:
        raise ValueError(f"{data.numel()} bytes hold fewer than {n} codes of {bits} bits")
    if bits == 8:
        return data.reshape(-1)[:n].to(torch.uint8)
    raw = data.reshape(-1).to(torch.int64)
    raw = nn.functional.pad(raw, (0, (-raw.numel()) % bits)).reshape(-1, bits)
    words = (raw << (8 * torch.arange(bits, dtype=torch.int64))).sum(dim=1)
    octets = (words[:, None] >> (bits * torch.arange(8, dtype=torch.int64))) & (2**bits - 1)
    return octets.reshape(-1)[:n].to(torch.uint8)


def _smallest_int_dtype(lo: int, hi: int) -> torch.dtype:
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return torch.int64


def is_packable(layer: nn.Module) -> bool:
    """A ``QuantLinear`` or ``QuantEmbedding`` whose weight quantizer describes a uniform grid (bits, granularity,
    qparams). A table is packed like a Linear's (out, in) weight: one row per token, the same grid rules."""
    wq = getattr(layer, "weight_quantizer", None)
    return isinstance(layer, QUANT_LAYERS) and all(
        hasattr(wq, a) for a in ("qparams", "bits", "symmetric", "granularity", "group_size")
    )


def _grid(layer: QuantLinear, w: torch.Tensor, qp: QParams) -> dict:
    """The ``WeightGrid`` fields of ``layer`` for weight ``w`` on grid ``qp``."""
    wq = layer.weight_quantizer
    rows = group_view(w, wq.granularity, wq.group_size).shape[0]
    scale = qp.scale.detach().clone().reshape(rows, 1)
    zero = qp.zero_point.detach().reshape(rows, 1)
    if not torch.equal(zero, zero.round()):
        raise ValueError("zero points must be integers to be stored as integers")
    if wq.symmetric and not bool(zero.any()):
        zero_point = None  # a symmetric grid's zero point is 0: nothing to store
    else:
        zero_point = zero.to(_smallest_int_dtype(int(zero.min()), int(zero.max())))
    return dict(
        shape=(int(w.shape[0]), int(w.shape[1])),
        bits=int(wq.bits),
        qmin=int(qp.qmin),
        qmax=int(qp.qmax),
        symmetric=bool(wq.symmetric),
        granularity=wq.granularity,
        group_size=int(wq.group_size),
        scale=scale,
        zero_point=zero_point,
        input_scale=None if layer.input_scale is None else layer.input_scale.detach().clone(),
    )


def _check(layer: nn.Module) -> None:
    if not is_packable(layer):
        raise TypeError(f"{type(layer).__name__} has no uniform weight quantizer to pack")


@torch.no_grad()
def quantize_linear(layer: QuantLinear) -> QuantizedWeight:
    """``layer``'s integer codes and grid: its quantizer's ``qparams`` on ``effective_weight()``."""
    _check(layer)
    wq = layer.weight_quantizer
    w = layer.effective_weight().detach()
    qp = wq.qparams(w)
    q = ungroup(quantize_int(group_view(w, wq.granularity, wq.group_size), qp), w)  # padding dropped
    return QuantizedWeight(**_grid(layer, w, qp), q=q.to(torch.int16))


def pack_linear(layer: QuantLinear) -> PackedWeight:
    """Pack ``layer``'s quantized weight into its stored form (bitstream codes + grid)."""
    return quantize_linear(layer).pack()


@torch.no_grad()
def packed_nbytes(layer: QuantLinear) -> dict[str, int]:
    """``pack_linear(layer)``'s bytes by part (codes, scales, zero_points, input_scales) without packing.

    Only the grid is computed (the codes' size does not depend on their values), so counting a 100 M
    parameter model takes a moment; the tests check it against real packing.
    """
    _check(layer)
    w = layer.effective_weight().detach()
    grid = WeightGrid(**_grid(layer, w, layer.weight_quantizer.qparams(w)))
    return {"codes": grid.codes_nbytes, **grid.grid_nbytes()}


def pack_model(model: nn.Module) -> dict[str, PackedWeight]:
    """Every packable ``QuantLinear`` of ``model``, packed, by module name."""
    return {name: pack_linear(m) for name, m in model.named_modules() if is_packable(m)}
