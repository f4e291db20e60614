"""PreQuant: quantize before fine-tuning (Gong et al., arXiv 2306.00014). Reimplementation: no official code
exists; every open choice is a setting below.

1. Task-agnostic quantization of the *pre-trained* model (not the task-fine-tuned one the other methods get):
   every Linear but the task head is quantized once on the cell's grid, uniform per row (``clip``: min-max,
   percentile or the error-minimizing MSE search), and frozen.
2. Outlier-aware parameter-efficient fine-tuning on the task: in each quantized Linear the ``fraction`` (0.5%)
   of its weights in the outlier dimensions -- the input columns (``select="column"``) or output rows
   (``"row"``) with the largest ``score`` (L2 norm, max magnitude, or quantization error of the pre-trained
   weight) -- become full-precision parameters (``bench.quant.OutlierQuantLinear``: they replace the quantized
   values there, starting at the pre-trained ones) and are trained, with the new task head, on the task's
   labeled data with the task's loss. Everything else -- the other quantized entries, embeddings, LayerNorms,
   biases -- stays frozen: bit-identical before and after.

Count per layer: ``max(1, round(fraction * n))`` of its n columns (rows), so each layer keeps ~``fraction`` of
its weights in full precision; the result row's ``method_info`` reports the exact outlier and trainable
fractions. Decoders (language-modeling tasks) fine-tune the outliers on LM text with the causal-LM loss; their
LM head is pre-trained (and tied to the embeddings), so it is not trained.

Budget: by default the task recipe's data and batch size, i.e. the same examples the FP reference was
fine-tuned on (SST-2: one epoch over 4,000 sentences), so PreQuant's fine-tuning and the FP fine-tune it
replaces see the same data. The learning rates are higher than full fine-tuning's (few parameters train):
chosen on MiniLM/SST-2 with a quick run, not tuned per task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from bench import hookimpl
from bench.api import Method, MethodContext, QuantSpec, check_range
from bench.quant import OutlierQuantLinear, QuantLinear, WeightQuantizer, freeze, quantize_model, replace_module
from bench.training import train_loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreQuantConfig:
    """``--set prequant.fraction=0.01 --set prequant.select=row``."""

    clip: Literal["minmax", "percentile", "mse"] = "mse"
    select: Literal["column", "row"] = "column"  # outlier input dims (columns) or output dims (rows)
    score: Literal["l2", "absmax", "error"] = "l2"  # of the pre-trained weight's column/row; error: |W - Q(W)|
    fraction: float = 0.005  # of each quantized Linear's weights kept in full precision and trained
    lr: float = 5e-3  # outlier slices (AdamW)
    head_lr: float = 5e-3  # the new task head
    train_head: bool = True  # classification/regression heads (an LM head is never trained)
    epochs: int = 1
    max_train_examples: int | None = None  # None: the task recipe's cap (the FP fine-tune's examples); 0: all
    batch_size: int | None = None  # None: the task recipe's
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0

    def __post_init__(self):
        check_range(self, 0, 1, "fraction", "warmup_ratio")
        check_range(self, 0, None, "lr", "head_lr", "epochs", "max_train_examples", "weight_decay", "max_grad_norm")
        check_range(self, 1, None, "batch_size")


def outlier_count(n: int, fraction: float) -> int:
    """How many of a layer's ``n`` columns (rows) stay full precision: ``fraction`` of them, at least one."""
    return min(n, max(1, round(fraction * n)))


def select_outliers(weight: torch.Tensor, quantized: torch.Tensor, *, dim: int, count: int, score: str):
    """Indices along ``dim`` (1: columns, 0: rows) of the ``count`` slices of ``weight`` with the largest score."""
    other = 1 - dim
    if score == "l2":
        scores = weight.norm(dim=other)
    elif score == "absmax":
        scores = weight.abs().amax(dim=other)
    elif score == "error":
        scores = (weight - quantized).norm(dim=other)
    else:
        raise ValueError(f"unknown outlier score {score!r}; choose from l2, absmax, error")
    return scores.topk(count).indices


def install_outliers(model: nn.Module, *, select: str, score: str, fraction: float) -> list[OutlierQuantLinear]:
    """Swap every ``QuantLinear`` of ``model`` (grids frozen) for an ``OutlierQuantLinear`` keeping its outliers."""
    dim = 1 if select == "column" else 0
    layers = []
    for name, module in list(model.named_modules()):
        if type(module) is not QuantLinear:
            continue
        with torch.no_grad():
            weight, quantized = module.effective_weight().detach(), module.quantized_weight().detach()
            index = select_outliers(
                weight, quantized, dim=dim, count=outlier_count(weight.shape[dim], fraction), score=score
            )
        layer = OutlierQuantLinear(module, index, dim)
        replace_module(model, name, layer)
        layers.append(layer)
    return layers


class PreQuant(Method):
    description = (
        "PreQuant: quantize the pre-trained model (per-row, clip setting), then fine-tune only ~0.5% outlier "
        "dims in full precision + the task head (reimplementation)"
    )
    data_used = "labeled"
    Config = PreQuantConfig

    def quantize(self, model: nn.Module, spec: QuantSpec, context: MethodContext) -> nn.Module:
        cfg = self.config
        del model  # the task-fine-tuned FP model: PreQuant starts from the pre-trained one instead
        model = context.pretrained_model(self.name)
        quantize_model(model, spec, keep_fp=context.keep_fp, weight_quantizer=partial(WeightQuantizer, clip=cfg.clip))
        freeze(model).requires_grad_(False)
        layers = install_outliers(model, select=cfg.select, score=cfg.score, fraction=cfg.fraction)
        outliers = [layer.outlier_weight for layer in layers]
        for p in outliers:
            p.requires_grad_(True)
        head: list[nn.Parameter] = []
        if cfg.train_head and context.task.kind != "language-modeling":
            head = [p for m in model.modules() if type(m) is nn.Linear for p in m.parameters()]  # the kept heads
            for p in head:
                p.requires_grad_(True)
        budget = dict(examples=cfg.max_train_examples, batch_size=cfg.batch_size)
        losses = train_loop(
            model,
            lambda epoch: context.train_batches(epoch, method=self.name, **budget),
            context.task.loss,
            epochs=cfg.epochs,
            steps_per_epoch=context.steps_per_epoch(method=self.name, **budget),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_ratio=cfg.warmup_ratio,
            params=[{"params": outliers, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}],
            max_grad_norm=cfg.max_grad_norm,
            desc=f"{self.name} W{spec.w_bits}",
        )
        context.report.update(parameter_report(model, layers, head), train_steps=len(losses))
        if losses:
            context.report.update(first_loss=round(losses[0], 5), last_loss=round(losses[-1], 5))
        return model.eval()


def parameter_report(model: nn.Module, layers: list[OutlierQuantLinear], head: list[nn.Parameter]) -> dict:
    """Trainable-parameter accounting: fractions of the model's own parameters (each counted once, the outlier
    copies not counted again) and of the quantized Linears' weights."""
    extra = {id(layer.outlier_weight) for layer in layers}
    total = sum(p.numel() for p in model.parameters() if id(p) not in extra)
    outlier = sum(layer.outlier_weight.numel() for layer in layers)
    quantized = sum(layer.weight.numel() for layer in layers)
    head_n = sum(p.numel() for p in head)
    return {
        "trainable_params": outlier + head_n,
        "total_params": total,
        "trainable_fraction": round((outlier + head_n) / total, 6),
        "outlier_params": outlier,
        "outlier_fraction": round(outlier / quantized, 6) if quantized else 0.0,
        "head_params": head_n,
        "outlier_layers": len(layers),
    }


@hookimpl
def register_methods(register):
    register("prequant", PreQuant)
