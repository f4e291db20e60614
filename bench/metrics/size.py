"""Model size in bytes as stored: packed low-bit weights where a layer is quantized, float elsewhere.

``size_bytes`` counts what a deployment writes to disk: for every quantized Linear its packed codes,
scales, zero points and smoothing vector (``bench.quant.export``), the state of its activation
quantizer (a static range: a few scalars), and every other parameter and persistent buffer in its own
dtype (embeddings, norms, biases, the full-precision task/LM head). The weight quantizer's own tensors
(a frozen grid, a learned LSQ step) are not counted again: they are the packed scales.
An ``OutlierQuantLinear`` (PreQuant) stores its full-precision outlier slices and their indices on top of
the packed codes: counted in their own dtype (float32, int64) under ``other``.
Non-persistent buffers (rotary tables, position ids) are rebuilt at load time and not counted, like
``state_dict``. A tensor shared by several modules (tied embeddings) is counted once. A quantized embedding
table (``--quantize-embeddings``) is packed like a Linear, one row per token; an LM head tied to it reads the
same packed table and adds nothing but its bias.

``fp32_size_bytes`` is the same model stored unquantized in float32 (quantizer state dropped, and a
layer's ``quant_only`` tensors such as smoothing vectors and outlier slices): the denominator of the compression
ratio.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from bench.quant.export import is_packable, packed_nbytes
from bench.quant.layers import QUANT_LAYERS, QuantLinear, QuantTiedHead


def _stored_tensors(model: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """(owner, name, tensor) for each parameter and persistent buffer, owner = the module holding it."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            yield module, name, p
        for name, b in module.named_buffers(recurse=False):
            if b is not None and name not in module._non_persistent_buffers_set:
                yield module, name, b


def _quantizer_state(model: nn.Module, *, weights: bool = True, acts: bool = True) -> set[int]:
    """ids of the weight / activation quantizer modules (and their children) of every quantized layer."""
    ids = set()
    for module in model.modules():
        if isinstance(module, (*QUANT_LAYERS, QuantTiedHead)):
            own_weight = isinstance(module, QUANT_LAYERS)  # a tied head's grid is its table's, counted there
            act = getattr(module, "act_quantizer", None)
            subs = [module.weight_quantizer] if weights and own_weight else []
            subs += [act] if acts and act is not None else []
            for sub in subs:
                ids.update(id(m) for m in sub.modules())
    return ids


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def size_breakdown(model: nn.Module) -> dict[str, int]:
    """Stored bytes by kind: packed ``codes``, ``scales``, ``zero_points``, ``input_scales``, activation
    quantizer state ``act_quantizers``, and ``other`` (every float/integer tensor of the unquantized parts);
    ``total`` is their sum."""
    out = {"codes": 0, "scales": 0, "zero_points": 0, "input_scales": 0, "act_quantizers": 0, "other": 0}
    packed: dict[int, QuantLinear] = {}
    for module in model.modules():
        if is_packable(module):
            packed[id(module)] = module
            for part, n in packed_nbytes(module).items():
                out[part] += n
    weight_grids = _quantizer_state(model, acts=False)
    act_state = _quantizer_state(model, weights=False)
    seen: set[int] = set()
    for owner, name, t in _stored_tensors(model):
        if id(owner) in weight_grids:
            continue  # the grid is stored in packed form (scales/zeros)
        if id(owner) in packed and name in ("weight", "input_scale"):
            continue  # stored packed
        if id(t) in seen:
            continue
        seen.add(id(t))
        out["act_quantizers" if id(owner) in act_state else "other"] += _nbytes(t)
    out["total"] = sum(out.values())
    return out


def size_bytes(model: nn.Module) -> int:
    """Bytes ``model`` takes when stored: packed quantized weights + everything else in its own dtype."""
    return size_breakdown(model)["total"]


def fp32_size_bytes(model: nn.Module) -> int:
    """Bytes of the same model stored unquantized in float32 (the compression ratio's denominator).

    Floating tensors count 4 bytes per element whatever their dtype; integer buffers keep their own;
    quantizer state (grids, smoothing vectors) is not part of an unquantized model and is skipped.
    """
    quantizers = _quantizer_state(model)
    seen: set[int] = set()
    total = 0
    for owner, name, t in _stored_tensors(model):
        if id(owner) in quantizers or (isinstance(owner, QuantLinear) and name in owner.quant_only):
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total


def compression_ratio(model: nn.Module) -> float:
    """``fp32_size_bytes / size_bytes``: how many times smaller the stored quantized model is."""
    return fp32_size_bytes(model) / size_bytes(model)
