"""One cell -> one row: the only place a result row is computed.

``CellRunner.prepare`` loads a cell's task data and FP model (fine-tuned once per group, then from the cache);
``CellRunner.run_cell`` quantizes a copy with the cell's method, measures it and returns the row; ``run_group``
does both for cells that share an FP model, and ``failed_row`` is the row of a cell that could not run. Every
executor (bench/executors.py) calls these, in this process or in a worker, so rows cannot drift between them.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from bench import models, provenance
from bench.api import MethodContext, TrainingData
from bench.errors import PluginError
from bench.grid import Cell
from bench.metrics.cost import MethodMeter
from bench.metrics.latency import model_latency, token_inputs
from bench.metrics.memory import Phases
from bench.metrics.sharpness import hessian_top_eig, hessian_trace, mean_loss, sharpness
from bench.metrics.size import fp32_size_bytes, size_bytes
from bench.plugins import Plugins
from bench.provenance import now
from bench.quant import DEFAULT_KEEP_FP, summarize
from bench.training import seed_everything

log = logging.getLogger(__name__)

LATENCY_TOKENS, LATENCY_WARMUP, LATENCY_MIN_RUN_S = 128, 3, 1.0

Rows = Iterator[tuple[Cell, dict]]


@dataclass(frozen=True)
class SharpnessSettings:
    """Loss-surface metrics per cell, on ``examples`` seeded evaluation examples (LM tasks: windows).

    Defaults keep sharpness near 30 s a cell on MiniLM with 2 cores; the Hessian metrics cost minutes
    (one Hessian-vector product ~ two backward passes per iteration) and are opt-in.
    """

    rho: float = 0.05
    steps: int = 5
    examples: int = 128
    hessian: bool = False
    hessian_iters: int = 10


@dataclass
class Prepared:
    """What the cells of one group share: the task, its recipe and data, and the FP model they all start from."""

    task: Any
    recipe: Any
    data: Any
    fp_model: torch.nn.Module
    tokenizer: Any
    finetune: dict | None  # the fine-tune cache entry (None for tasks that need no fine-tune)
    phases: Phases = field(default_factory=Phases)  # "prepare": loading data and model, fine-tuning if not cached


class CellRunner:
    """Computes the rows of planned cells, one FP model per (task, model, seed) group. Holds no result store:
    whoever drives the run (``bench.runner.Runner``) appends the rows."""

    def __init__(
        self,
        plugins: Plugins,
        resolved: models.ResolvedModel,
        device: str = "cpu",
        *,
        latency: bool = True,
        sharpness: SharpnessSettings | None = SharpnessSettings(),
        data_dir: str | None = None,
        command: str | None = None,
    ):
        self.plugins = plugins
        self.resolved = resolved
        self.device = device
        self.latency = latency
        self.sharpness = sharpness
        self.data_dir = data_dir
        # the driver's command line: rows made in a worker process must not record the worker's argv
        self.command = command or provenance.command_line()
        self._data: dict[str, object] = {}

    def load_data(self, task):
        """The task's data, loaded once per process."""
        if task.name not in self._data:
            self._data[task.name] = task.load(self.data_dir)
        return self._data[task.name]

    def needs_prepare(self, cell: Cell) -> bool:
        """Whether ``cell``'s group needs its FP model prepared first (a fine-tune); LM tasks just load it."""
        return bool(self.plugins.tasks.get(cell.task).needs_finetune)

    def prepare(self, cell: Cell) -> Prepared:
        """The task, recipe, data and FP model shared by ``cell``'s group: fine-tuned once, then from the cache.
        Raises what loading or fine-tuning raised."""
        task = self.plugins.tasks.entry(cell.task).obj()
        recipe = task.Recipe(**cell.recipe)
        phases = Phases()
        with phases("prepare"):
            data = self.load_data(task)
            if task.needs_finetune:
                fp_model, tokenizer, ft_info = models.load_finetuned(
                    self.resolved, task, data, cell.seed, recipe, device=self.device
                )
            else:
                fp_model, tokenizer = task.load_model(self.resolved)
                ft_info = None
            fp_model.to(self.device).eval()
        return Prepared(task, recipe, data, fp_model, tokenizer, ft_info, phases)

    def run_group(self, group: list[Cell]) -> Rows:
        """``(cell, row)`` for each cell of a group sharing one FP model, prepared once; if preparing fails, every
        cell of the group gets that failure as its row."""
        first = group[0]
        try:
            prepared = self.prepare(first)
        except Exception as exc:
            self.log_prepare_failure(first, exc)
            for cell in group:
                yield cell, self.failed_row(cell, exc)
            return
        for i, cell in enumerate(group):
            yield cell, self.run_cell(cell, prepared, handover=i == len(group) - 1)

    def failed_row(self, cell: Cell, error: BaseException, *, started: str | None = None) -> dict:
        """The failed row of a cell that never ran its method (its group's FP model failed, its worker died)."""
        return self._row(cell, self.plugins.tasks.entry(cell.task), None, started=started or now(), error=error)

    def log_prepare_failure(self, cell: Cell, exc: BaseException) -> None:
        log.error("could not prepare %s/%s seed %d: %s", cell.task, cell.model, cell.seed, describe_error(exc))
        log_traceback(exc)

    def run_cell(self, cell: Cell, prepared: Prepared, *, handover: bool = False) -> dict:
        """Quantize a copy of the group's FP model with the cell's method, evaluate and measure it: the cell's row.
        A method (or measurement) that raises makes a failed row; nothing here raises.

        ``handover``: the group's last cell takes the FP model itself (``prepared.fp_model`` becomes None), so the
        cell's phases do not hold a second model beside its own (SmolLM2-135M: 0.5 GB of its peak). A method that
        does not change its model (``Method.changes_model``: the FP32 reference) borrows it in any position."""
        started, t0 = now(), time.perf_counter()
        task_entry = self.plugins.tasks.entry(cell.task)
        task, recipe, data, tokenizer = prepared.task, prepared.recipe, prepared.data, prepared.tokenizer
        method_entry = self.plugins.methods.entry(cell.method)
        try:
            method_cls = method_entry.obj
            method = method_cls(method_cls.Config(**cell.method_config))
            method.name = method_entry.name
            if handover:
                student, prepared.fp_model = prepared.fp_model, None
            elif not method_cls.changes_model:
                student = prepared.fp_model  # lent: no phase of this cell changes it
            else:
                student = copy.deepcopy(prepared.fp_model)
            phases = prepared.phases.copy()  # the group's prepare phase, then this cell's own
            reference = None
            if self.latency and method_cls.changes_model:
                with phases("reference"):
                    reference = self._latency(student)  # still the FP model: the speedup's own FP32 figure
            meter = MethodMeter(student)
            context = self.method_context(method, task, tokenizer, data, recipe, cell.seed, watch=meter.watch)
            seed_everything(cell.seed)
            with phases("method"), meter:
                model = method.quantize(student, cell.spec, context)
            if not isinstance(model, torch.nn.Module):
                raise PluginError(
                    f"method '{cell.method}' ({method_entry.provider}) returned {type(model).__name__}, "
                    "not a torch.nn.Module"
                )
            with phases("eval"):
                preds, refs = task.predict(model, tokenizer, data, limit=cell.limit, device=self.device, recipe=recipe)
                metrics = {m: self.plugins.metrics.get(m)(preds, refs) for m in task.metrics}
            footprint = {"size_bytes": size_bytes(model), "fp32_size_bytes": fp32_size_bytes(model)}
            latency, curvature = None, {}
            if self.latency:
                with phases("latency"):
                    latency = self._latency(model)
                if latency and reference:
                    latency["reference"] = {k: v for k, v in reference.items() if k != "kernels"}
            if self.sharpness:
                with phases("sharpness"):
                    curvature = self._curvature(model, task, tokenizer, data, recipe, cell.seed)
        except Exception as exc:
            log.error("cell %s failed: %s", cell.key, describe_error(exc))
            log_traceback(exc)
            return self._row(cell, task_entry, method_entry, started=started, t0=t0, error=exc, data=data)
        row = self._row(cell, task_entry, method_entry, started=started, t0=t0, data=data)
        row.update(
            status="ok",
            metrics=metrics,
            score=metrics[task.primary_metric],
            eval_examples=len(refs),
            data_used=method.data_used,
            method_info=context.report or None,
            cost=meter.cost.as_row(),
            timing=phases.as_timing(),
            peak_rss_mb=phases.peak,
            quantized=summarize(model),
            finetune=prepared.finetune,
            latency=latency,
            **footprint,
            **curvature,
        )
        log.info(
            "%s %s %s seed %d: %s=%.4f (%.1f s)",
            cell.method,
            cell.bits_label,
            cell.task,
            cell.seed,
            task.primary_metric,
            row["score"],
            row["wall_time_s"],
        )
        return row

    def method_context(
        self, method, task, tokenizer, data, recipe, seed: int, watch: Callable | None = None
    ) -> MethodContext:
        """What ``method`` may use, by the data it declared (see ``MethodContext``): zero-shot methods nothing,
        calibration methods unlabeled batches of the training split, labeled methods also its labeled batches.
        Both are built on ``TaskData.training_only``: the evaluation split is not in what a method can reach.
        ``watch(model)`` (the cost meter's) sees the pre-trained model a method asks for, so its passes count."""
        view = data.training_only(f"task '{task.name}'") if method.data_used != "none" else None
        labeled = method.data_used == "labeled"
        calibration = None
        if view is not None:
            make = functools.partial(
                task.calibration_batches, tokenizer, view, seed=seed, device=self.device, recipe=recipe
            )
            calibration = functools.partial(_unlabeled, make)
        return MethodContext(
            task=task,
            tokenizer=tokenizer,
            seed=seed,
            device=self.device,
            keep_fp=DEFAULT_KEEP_FP,
            calibration=calibration,
            training=self._training_data(task, tokenizer, view, recipe, seed) if labeled else None,
            pretrained=functools.partial(self._pretrained, task, watch),
        )

    def _training_data(self, task, tokenizer, data, recipe, seed: int) -> TrainingData:
        """The task's labeled training batches for a data_used="labeled" method (seeded like the fine-tune)."""
        return TrainingData(
            batches=lambda epoch, **kw: task.train_batches(
                tokenizer, data, recipe, seed=seed, epoch=epoch, device=self.device, **kw
            ),
            steps=functools.partial(task.train_steps, tokenizer, data, recipe),
        )

    def _pretrained(self, task, watch: Callable | None = None):
        """A fresh pre-trained model with the task's new head (its random init follows the cell's seed)."""
        model, _ = task.load_model(self.resolved)
        model = model.to(self.device)
        return watch(model) if watch else model

    def _curvature(self, model, task, tokenizer, data, recipe, seed: int) -> dict:
        """Sharpness (and opt-in Hessian metrics) of the cell's model on seeded evaluation examples."""
        cfg = self.sharpness
        batches = task.loss_batches(tokenizer, data, cfg.examples, seed=seed, device=self.device, recipe=recipe)
        loss_fn = mean_loss(batches, loss=task.loss, lazy=True)
        out: dict = {}
        try:
            out["sharpness"] = sharpness(model, loss_fn, rho=cfg.rho, steps=cfg.steps, seed=seed)
            if cfg.hessian:
                out["hessian"] = {
                    "top_eig": hessian_top_eig(model, loss_fn, iters=cfg.hessian_iters, seed=seed),
                    "trace": hessian_trace(model, loss_fn, samples=cfg.hessian_iters, seed=seed),
                }
        except ValueError as exc:  # a non-finite loss: no curvature figure, but the cell's score stands
            log.warning("sharpness not measured: %s", exc)
        return out

    def _latency(self, model) -> dict | None:
        """Batch 1 x LATENCY_TOKENS forward on real CPU kernels where torch has them; the kernel is named."""
        if self.device != "cpu":
            log.info("latency is measured with CPU kernels only; skipped on %s", self.device)
            return None
        inputs = token_inputs(LATENCY_TOKENS, model.config.vocab_size)
        # decoders: the 128-token forward is the prefill, and one generated token on its KV cache is the decode
        decoder = hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()
        stats = model_latency(model, inputs, warmup=LATENCY_WARMUP, min_run_time=LATENCY_MIN_RUN_S, decode=decoder)
        return {**stats, "batch_size": 1, "seq_len": LATENCY_TOKENS, "phase": "prefill" if decoder else "forward"}

    def _row(self, cell, task_entry, method_entry, *, started, t0=None, error=None, data=None) -> dict:
        spec = cell.spec
        method_plugin = method_entry.provider if method_entry else self.plugins.methods.entry(cell.method).provider
        task_cls = task_entry.obj
        return {
            "key": cell.key,
            "method": cell.method,
            "method_config": cell.method_config,
            "variant": cell.variant,
            "config_hash": cell.config_hash,
            "bits": cell.bits_label,
            "w_bits": spec.w_bits if spec else None,
            "a_bits": spec.a_bits if spec else None,
            "granularity": spec.granularity if spec else None,
            "group_size": spec.group_size if spec and spec.granularity == "per-group" else None,
            "symmetric": spec.symmetric if spec else None,
            "grid": spec.grid() if spec else None,
            "embeddings_quantized": spec.embeddings if spec else None,
            "task": cell.task,
            "task_kind": task_cls.kind,
            "primary_metric": task_cls.primary_metric,
            "model": cell.model,
            "model_source": self.resolved.source,
            "data_source": getattr(data, "source", None),
            "seed": cell.seed,
            "limit": cell.limit,
            "data_used": method_entry.obj.data_used if method_entry else None,
            "role": getattr(method_entry.obj, "role", None) if method_entry else None,  # reference / baseline
            "cost": None,  # what Method.quantize spent (bench.metrics.cost): seconds, passes, steps, examples
            # seconds and peak RSS (MiB) per phase: prepare_s (the group's: data, model, fine-tune unless cached,
            # shared by its cells), method_s, eval_s, latency_s, sharpness_s, peak_rss_mb {phase: MiB},
            # rss_scope ("phase": each peak measured alone; "process": peaks include what ran before)
            "timing": None,
            "peak_rss_mb": None,  # the cell's peak RSS (MiB): the largest phase peak
            "method_info": None,  # what the method reported (MethodContext.report), e.g. its trainable fraction
            "metrics": {},
            "score": None,
            "sharpness": None,
            "hessian": None,
            "latency": None,
            "size_bytes": None,
            "fp32_size_bytes": None,
            "status": "failed" if error is not None else "ok",
            "error": describe_error(error) if error is not None else None,
            "started": started,
            "finished": now(),
            "wall_time_s": round(time.perf_counter() - t0, 3) if t0 is not None else None,
            "versions": {
                **provenance.versions(),
                "method_plugin": str(method_plugin),
                "task_plugin": str(task_entry.provider),
            },
            "git_commit": provenance.git_commit(),
            "host": provenance.host(),
            "device": self.device,
            "command": self.command,
        }


LABEL_KEYS = ("labels", "label")


def _unlabeled(make: Callable[[int], list[dict]], n: int) -> list[dict]:
    """Calibration batches with any label removed: calibration methods see inputs, never answers."""
    return [{k: v for k, v in batch.items() if k not in LABEL_KEYS} for batch in make(n)]


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's (CUDA/MPS) OutOfMemoryError, Python's MemoryError, or Ray's memory monitor killing a worker."""
    return isinstance(exc, MemoryError | torch.OutOfMemoryError) or type(exc).__name__ == "OutOfMemoryError"


def describe_error(exc: BaseException) -> str:
    """The row's ``error``: 'Type: message', prefixed 'out of memory:' when memory ran out (so it reads as such
    in the leaderboard's failed list, not as an obscure allocator message)."""
    text = f"{type(exc).__name__}: {exc}"
    return f"out of memory: {text}" if is_out_of_memory(exc) else text


def log_traceback(exc: BaseException) -> None:
    """The traceback of a failed cell: at ERROR for out-of-memory (the user must see what allocated), at INFO
    (``-v``) for every other failure. The failed cell's tensors are freed when its frames go (the row is
    returned), and torch's caching allocator hands that memory to the next cell: the grid goes on."""
    text = "".join(traceback.format_exception(exc))
    if is_out_of_memory(exc):
        log.error("out of memory; traceback:\n%s", text)
    else:
        log.info("traceback:\n%s", text)
