"""Quantized layers and the model surgery that installs them.

A ``QuantLinear`` keeps the original float weight as its parameter and fake-quantizes it on every
forward, so QAT methods train through the straight-through estimator and PTQ methods can edit the
float weight (GPTQ, AWQ) before freezing it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from bench.api import QuantSpec
from bench.quant.uniform import CLIPS, QParams, compute_qparams, fake_quantize, group_view, int_range

log = logging.getLogger(__name__)

# Kept in full precision unless the user says otherwise: task heads and LM heads (standard practice in
# the BERT/OPT quantization papers: they are tiny next to the body and dominate the output error).
DEFAULT_KEEP_FP = ("classifier", "classifier.*", "score", "lm_head", "qa_outputs", "cls.*")


class WeightQuantizer(nn.Module):
    """Uniform fake-quantizer for a weight, per the cell's ``QuantSpec``.

    Until frozen, the grid follows the weight (``clip`` picks the range); ``freeze`` stores scale and
    zero point as buffers, so methods that edit weights on a fixed grid (GPTQ, AWQ) and the exporter all
    see one grid, and evaluation does not recompute ranges every forward.
    """

    def __init__(self, spec: QuantSpec, weight: torch.Tensor | None = None, *, clip: str = "minmax"):
        super().__init__()
        if clip not in CLIPS:
            raise ValueError(f"unknown clip {clip!r}; choose from {', '.join(CLIPS)}")
        self.bits = spec.w_bits
        self.symmetric = spec.symmetric
        self.narrow = spec.narrow
        self.granularity = spec.granularity
        self.group_size = spec.group_size
        self.clip = clip
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    @property
    def frozen(self) -> bool:
        return self.scale is not None

    def qparams(self, w: torch.Tensor) -> QParams:
        """The grid for ``w`` (per row of its grouped view): the frozen one, or computed from ``w``."""
        if self.frozen:
            return QParams(self.scale, self.zero_point, *int_range(self.bits, self.symmetric, self.narrow))
        return self._grid_of(w)

    def _grid_of(self, w: torch.Tensor) -> QParams:
        grouped = group_view(w, self.granularity, self.group_size)
        return compute_qparams(grouped, self.bits, self.symmetric, self.clip, narrow=self.narrow)

    def freeze(self, w: torch.Tensor, qparams: QParams | None = None) -> None:
        qp = qparams if qparams is not None else self._grid_of(w)  # w's own grid, even over an older frozen one
        self.scale, self.zero_point = qp.scale.detach().clone(), qp.zero_point.detach().clone()
        self.generation = getattr(self, "generation", 0) + 1  # invalidates cached quantized weights

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(
            w,
            self.bits,
            symmetric=self.symmetric,
            granularity=self.granularity,
            group_size=self.group_size,
            clip=self.clip,
            narrow=self.narrow,
            qparams=self.qparams(w) if self.frozen else None,
        )

    def extra_repr(self) -> str:
        sym = ("sym narrow" if self.narrow else "sym") if self.symmetric else "asym"
        frozen = ", frozen" if self.frozen else ""
        return f"bits={self.bits}, {sym}, {self.granularity}, group_size={self.group_size}, clip={self.clip}{frozen}"


class DynamicActQuantizer(nn.Module):
    """Per-token dynamic activation fake-quantizer: one asymmetric scale per token (row of the last dim)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = fake_quantize(flat, self.bits, symmetric=False, granularity="per-channel")
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per-token dynamic"


def _cached_quantized(layer: nn.Module, effective_weight) -> torch.Tensor:
    """The fake-quantized weight, computed once per (weight, grid) state when nothing needs its gradient.

    Evaluation of a frozen PTQ model would otherwise re-quantize every weight on every forward (seconds
    per 2048-token window on a 135 M decoder). The key changes whenever the weight or its grid is edited
    in place or replaced, so methods that move weights (GPTQ, AWQ) never see a stale copy.
    """
    quantizer = layer.weight_quantizer
    tensors = (layer.weight, getattr(layer, "input_scale", None), getattr(quantizer, "step", None))
    # gradients wanted: a weight, smoothing vector or learned step that trains (frozen ones are cached: PreQuant)
    wants_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    if wants_grad or not getattr(quantizer, "frozen", False) or isinstance(quantizer, nn.Identity):
        layer.__dict__.pop("_qcache", None)
        return quantizer(effective_weight())
    key = (getattr(quantizer, "generation", 0),) + tuple(
        (t.data_ptr(), t._version) if isinstance(t, torch.Tensor) else None for t in tensors
    )
    cached = layer.__dict__.get("_qcache")
    if cached is None or cached[0] != key:
        cached = (key, quantizer(effective_weight()).detach())
        layer.__dict__["_qcache"] = cached
    return cached[1]


@contextlib.contextmanager
def float_layers(layers: Iterable[nn.Module], *, activations: bool = True) -> Iterator[None]:
    """Inside the ``with`` block, the given QuantLinears compute with float weights (identity weight quantizers)
    and, with ``activations``, float inputs.

    Calibration statistics are taken on the float computation a method is meant to preserve (SmoothQuant, AWQ:
    weights and activations; GPTQ: weights, its Hessian from the float input); the quantizers (and any
    input_scale set meanwhile) are kept and restored on exit.
    """
    layers = list(layers)
    saved = [(m.weight_quantizer, m.act_quantizer) for m in layers]
    for m in layers:
        m.weight_quantizer = nn.Identity()
        if activations:
            m.act_quantizer = nn.Identity()
    try:
        yield
    finally:
        for m, (wq, aq) in zip(layers, saved, strict=True):
            m.weight_quantizer, m.act_quantizer = wq, aq


class QuantLinear(nn.Module):
    """A Linear whose weight (and optionally input activation) is fake-quantized in the forward pass.

    ``input_scale`` (per input feature, None by default) is the smoothing used by SmoothQuant and AWQ:
    y = Q(x / s) @ Q(W * s)^T + b, which equals the float layer before quantization; a deployment folds
    1/s into the op that produces x.
    """

    def __init__(self, linear: nn.Linear, weight_quantizer: nn.Module, act_quantizer: nn.Module | None = None):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer if act_quantizer is not None else nn.Identity()
        self.register_buffer("input_scale", None)

    quant_only = ("input_scale",)  # tensors that are quantization state, not part of the unquantized model

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "input_scale", "weight_quantizer"):
            self.__dict__.pop("_qcache", None)  # a replaced tensor may reuse the old one's memory address
        super().__setattr__(name, value)

    def effective_weight(self) -> torch.Tensor:
        """The float weight that gets quantized: W, or W * s when the layer is smoothed."""
        return self.weight if self.input_scale is None else self.weight * self.input_scale

    def quantized_weight(self) -> torch.Tensor:
        return _cached_quantized(self, self.effective_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale
        return nn.functional.linear(self.act_quantizer(x), self.quantized_weight(), self.bias)


class OutlierQuantLinear(QuantLinear):
    """A ``QuantLinear`` whose few selected outlier columns (``dim=1``: input dims) or rows (``dim=0``: output
    dims) are full-precision parameters that replace the quantized values there (PreQuant's outlier-aware
    fine-tuning): the effective weight is Q(W) with those slices overwritten by ``outlier_weight``.

    Every other entry stays exactly Q(W) of the frozen grid. Stored as the packed codes of Q(W) plus the float
    slices and their int64 indices (``bench.metrics.size`` counts both, the codes under the slices included,
    as a deployment would keep them); the real CPU kernels add the slices as a small float correction.
    """

    # tensors that are quantization state, not part of the model stored unquantized (fp32 size skips them)
    quant_only = ("input_scale", "outlier_weight", "outlier_index")

    def __init__(self, layer: QuantLinear, index: torch.Tensor, dim: int):
        super().__init__(layer, layer.weight_quantizer, layer.act_quantizer)  # shares weight, bias, quantizers
        self.input_scale = layer.input_scale
        if dim not in (0, 1):
            raise ValueError(f"outlier dim {dim}: 0 (rows, output dims) or 1 (columns, input dims)")
        self.dim = dim
        index = torch.as_tensor(index, dtype=torch.long, device=layer.weight.device).sort().values
        self.register_buffer("outlier_index", index)
        with torch.no_grad():
            start = layer.effective_weight().detach().index_select(dim, index).clone()
        self.outlier_weight = nn.Parameter(start)

    def base_quantized_weight(self) -> torch.Tensor:
        """Q(W) without the outlier slices: what the packed codes store."""
        return super().quantized_weight()

    def quantized_weight(self) -> torch.Tensor:
        return self.base_quantized_weight().index_copy(self.dim, self.outlier_index, self.outlier_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """While only the slices train (gradients on, the grid's weight frozen): Q(W) x plus the slices' correction,
        as ``OutlierCorrected`` computes it. The same function as through the overwritten weight, but its backward
        forms the slices' gradient alone instead of a whole-weight gradient to index, and no overwritten weight is
        built per call: a third of a training step's matrix arithmetic less. Otherwise (evaluation, a measurement
        that shadows ``quantized_weight``, a trained grid) the overwritten weight, as every QuantLinear."""
        training_slices = torch.is_grad_enabled() and self.outlier_weight.requires_grad
        if not training_slices or self.weight.requires_grad or "quantized_weight" in self.__dict__:
            return super().forward(x)
        if self.input_scale is not None:
            x = x / self.input_scale
        x = self.act_quantizer(x)
        base = self.base_quantized_weight()
        delta = self.outlier_weight - base.detach().index_select(self.dim, self.outlier_index)
        return outlier_corrected(nn.functional.linear(x, base, self.bias), x, self.outlier_index, delta, self.dim)

    def outlier_delta(self) -> torch.Tensor:
        """Full-precision slices minus their quantized values: the correction a real kernel adds."""
        base = self.base_quantized_weight().detach().index_select(self.dim, self.outlier_index)
        return self.outlier_weight.detach() - base

    def extra_repr(self) -> str:
        kind = "columns" if self.dim == 1 else "rows"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp {kind}={len(self.outlier_index)}"


def outlier_corrected(y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, delta: torch.Tensor, dim: int):
    """``y`` (the input ``x`` times the quantized weight) plus the outlier slices' difference ``delta`` from their
    quantized values: x[..., index] @ delta^T for columns (dim 1), added at the rows' outputs for rows (dim 0). The
    one arithmetic of PreQuant's slice training and of the real kernels' ``OutlierCorrected``."""
    if dim == 1:
        return y + nn.functional.linear(x.index_select(-1, index), delta)
    return y.index_add(-1, index, nn.functional.linear(x, delta))


class QuantEmbedding(nn.Module):
    """An Embedding whose table is fake-quantized row by row (a row is one token's vector)."""

    def __init__(self, embedding: nn.Embedding, weight_quantizer: nn.Module):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight
        self.weight_quantizer = weight_quantizer
        self.input_scale = None

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def quantized_weight(self) -> torch.Tensor:
        return _cached_quantized(self, self.effective_weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.quantized_weight(), self.padding_idx)


class QuantTiedHead(nn.Module):
    """An output projection tied to a quantized embedding table (a decoder's LM head under ``spec.embeddings``):
    y = Q_a(x) @ Q(E)^T + b, with Q(E) the table's own quantized values.

    A tied table is stored once, so quantizing it quantizes both of its uses: the scored model, the stored size
    and the latency model then compute one function (a float head beside a low-bit table would be a model no
    deployment stores). The activations are quantized as every Linear's of the cell. It is deliberately not a
    ``QuantLinear``: calibration methods (GPTQ, AWQ, SmoothQuant) fit a Linear's own weight, and fitting the
    table to the head would change the input embeddings behind their back; the table keeps the embedding's grid.
    The table is referenced, not registered as a child, so the model's state dict and module tree hold it once.
    """

    def __init__(self, head: nn.Linear, table: QuantEmbedding, act_quantizer: nn.Module | None = None):
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.bias = head.bias
        self.act_quantizer = act_quantizer if act_quantizer is not None else nn.Identity()
        self.__dict__["table"] = table
        self.input_scale = None

    def quantized_weight(self) -> torch.Tensor:
        return self.table.quantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.act_quantizer(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to a quantized embedding"


QUANT_LAYERS = (QuantLinear, QuantEmbedding)  # OutlierQuantLinear is a QuantLinear; a QuantTiedHead has no own grid


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.split(".")[-1], p) for p in patterns)


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    *,
    keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP,
    weight_quantizer=WeightQuantizer,
) -> nn.Module:
    """Swap every ``nn.Linear`` (in place) for a ``QuantLinear`` unless its name matches ``keep_fp``.

    Embedding tables are swapped for ``QuantEmbedding`` only when ``spec.embeddings``, and a Linear whose weight
    is such a table (a tied LM head, even one ``keep_fp`` names) then reads the quantized table
    (``QuantTiedHead``); LayerNorm and biases always stay in float (standard in the papers compared here).

    ``weight_quantizer(spec, weight)`` builds each layer's weight quantizer, so QAT methods can pass a
    learnable one (``LSQQuantizer``) initialized from the layer's weight. Returns ``model``; ``summarize``
    tells afterwards what was quantized.
    """
    for name, module in list(model.named_modules()):
        if _matches(name, keep_fp):
            continue
        if isinstance(module, nn.Linear):
            replacement = QuantLinear(module, weight_quantizer(spec, module.weight), _act_quantizer(spec))
        elif isinstance(module, nn.Embedding) and spec.embeddings:
            replacement = QuantEmbedding(module, weight_quantizer(spec, module.weight))
        else:
            continue
        replace_module(model, name, replacement)
    tables = {id(m.weight): m for m in model.modules() if isinstance(m, QuantEmbedding)}
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and id(module.weight) in tables:
            replace_module(model, name, QuantTiedHead(module, tables[id(module.weight)], _act_quantizer(spec)))
    log.debug("quantized model: %s", summarize(model))
    return model


def _act_quantizer(spec: QuantSpec) -> nn.Module | None:
    """Every quantized Linear's (a tied head's included) activation quantizer: per token, when the cell has one."""
    return DynamicActQuantizer(spec.a_bits) if spec.a_bits else None


def replace_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    """Put ``replacement`` where ``model``'s submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)


def freeze(model: nn.Module) -> nn.Module:
    """Fix the grid of every not-yet-frozen ``QuantLinear`` at its current weight (end of a PTQ method)."""
    for module in model.modules():
        if isinstance(module, QUANT_LAYERS) and not module.weight_quantizer.frozen:
            module.weight_quantizer.freeze(module.effective_weight())
    return model


def summarize(model: nn.Module) -> dict:
    """What a (possibly) quantized model holds: count of quantized Linears and the Linears left float."""
    modules = list(model.named_modules())
    return {
        "quantized_linears": sum(isinstance(m, QuantLinear) for _, m in modules),
        "quantized_embeddings": [n for n, m in modules if isinstance(m, QuantEmbedding)],
        "tied_heads": [n for n, m in modules if isinstance(m, QuantTiedHead)],
        "kept_fp": [n for n, m in modules if type(m) is nn.Linear],
        "float_always": "LayerNorm/RMSNorm, biases"
        + ("" if any(isinstance(m, QuantEmbedding) for _, m in modules) else ", embeddings"),
    }
