"""Static per-tensor activation quantization: one range per layer input, calibrated once, then fixed.

Per-token dynamic quantization (``DynamicActQuantizer``) recomputes a range for every token at run
time; a static quantizer fixes one range from calibration data, which is what integer kernels with a
precomputed activation scale need (SmoothQuant's W8A8 "O3" setting: static per-tensor activations).
The rounding is the shared one in ``bench.quant.uniform``: only the range is chosen here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bench.quant.calibration import stream_inputs
from bench.quant.layers import QuantLinear
from bench.quant.uniform import QParams, fake_quantize, int_range, range_qparams


class StaticActQuantizer(nn.Module):
    """Per-tensor fake-quantizer with a range observed on calibration inputs, then frozen.

    Calibrate with ``observe(x)`` on each calibration tensor (running min/max; a symmetric grid puts the signed
    extreme on its bottom code), then ``freeze()``. The grid covers the observed range widened to contain 0 (so
    0 stays exact); later inputs outside it are clipped, as in a deployed static kernel. Calling it before
    ``freeze`` is an error rather than a silent pass-through, so a missed calibration cannot look like a
    quantized result.
    """

    def __init__(self, bits: int, symmetric: bool = True):
        super().__init__()
        int_range(bits, symmetric)  # validates bits
        self.bits = int(bits)
        self.symmetric = symmetric
        self.register_buffer("lo", None)
        self.register_buffer("hi", None)
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    @property
    def frozen(self) -> bool:
        return self.scale is not None

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Widen the observed range to cover ``x`` (any shape)."""
        x = x.detach().float()
        lo, hi = x.amin().clamp_max(0), x.amax().clamp_min(0)  # symmetric grids orient by the signed extreme
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def freeze(self) -> None:
        """Fix scale and zero point from the observed range (per-tensor: shape (1, 1))."""
        if self.lo is None:
            raise RuntimeError("StaticActQuantizer.freeze: no calibration input was observed")
        qp = range_qparams(self.lo.reshape(1, 1), self.hi.reshape(1, 1), self.bits, self.symmetric)
        self.scale, self.zero_point = qp.scale.clone(), qp.zero_point.clone()

    def qparams(self) -> QParams:
        if not self.frozen:
            raise RuntimeError("StaticActQuantizer used before calibration: call observe(...) and freeze()")
        return QParams(self.scale, self.zero_point, *int_range(self.bits, self.symmetric))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qp = self.qparams()
        flat = x.reshape(1, -1)
        qp = QParams(qp.scale.to(x.dtype), qp.zero_point.to(x.dtype), qp.qmin, qp.qmax)
        return fake_quantize(flat, self.bits, symmetric=self.symmetric, granularity="per-tensor", qparams=qp).reshape(
            x.shape
        )

    def extra_repr(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        state = f", range=[{self.lo.item():.4g}, {self.hi.item():.4g}]" if self.lo is not None else ""
        return f"bits={self.bits}, {sym}, per-tensor static{state}{', frozen' if self.frozen else ''}"


def _layer_bits(layer: QuantLinear, bits: int | None) -> int:
    if bits is not None:
        return bits
    found = getattr(layer.act_quantizer, "bits", None)
    if found is None:
        raise ValueError("calibrate_static_activations: pass bits= (the layer has no activation quantizer to copy)")
    return int(found)


@torch.no_grad()
def calibrate_static_activations(
    model: nn.Module, batches: Iterable, bits: int | None = None, *, symmetric: bool = True
) -> dict[str, StaticActQuantizer]:
    """Install a calibrated, frozen ``StaticActQuantizer`` as the ``act_quantizer`` of every ``QuantLinear``.

    ``bits`` defaults to the bits of each layer's current activation quantizer (the cell's ``a_bits``).
    Ranges come from the inputs as the layer quantizes them (after division by ``input_scale``), over
    real tokens only (padding removed), in one calibration pass with float activations everywhere (the
    standard calibration: each range is measured on the unquantized activation it will quantize).
    Returns the installed quantizers by layer name.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    quantizers = {name: StaticActQuantizer(_layer_bits(layer, bits), symmetric) for name, layer in layers.items()}
    previous = {name: layer.act_quantizer for name, layer in layers.items()}

    def on_input(name: str, x: torch.Tensor) -> None:
        scale = layers[name].input_scale
        quantizers[name].observe(x if scale is None else x / scale)

    for layer in layers.values():
        layer.act_quantizer = nn.Identity()
    try:
        stream_inputs(model, batches, layers, on_input)
    finally:
        for name, layer in layers.items():
            layer.act_quantizer = previous[name]
    unseen = [name for name, q in quantizers.items() if q.lo is None]
    if unseen:
        raise RuntimeError(f"calibrate_static_activations: no calibration input reached {', '.join(unseen)}")
    for name, layer in layers.items():
        quantizers[name].freeze()
        layer.act_quantizer = quantizers[name].to(layer.weight.device)
    return quantizers
