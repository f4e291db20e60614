"""Expands methods x bits x tasks x seeds into cells, runs them, and resumes finished grids.

Each cell appends exactly one row to the run's result store. A cell that raises records a failed
row (error and traceback in the log) and the grid goes on; cells whose key already has an ok row
are skipped unless ``force``. Where cells execute (in this process, a process pool, a Ray cluster)
is an executor's job (bench/executors.py); only this driver appends rows.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench import models, provenance
from bench.api import MethodContext, QuantSpec, TrainingData, apply_overrides
from bench.errors import BenchError, PluginError, unknown
from bench.leaderboard import Leaderboard
from bench.leaderboard import load as load_leaderboard
from bench.metrics.cost import MethodMeter
from bench.metrics.latency import model_latency, token_inputs
from bench.metrics.sharpness import hessian_top_eig, hessian_trace, mean_loss, sharpness
from bench.metrics.size import fp32_size_bytes, size_bytes
from bench.plugins import Plugins
from bench.quant import DEFAULT_KEEP_FP, summarize
from bench.results import RESULTS_ROOT, ResultStore
from bench.training import seed_everything

log = logging.getLogger(__name__)

LATENCY_TOKENS, LATENCY_WARMUP, LATENCY_REPEATS = 128, 3, 20


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


TASK_SCOPE = "task"  # --set task.FIELD=V: every task of the run that has FIELD


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Cell:
    """One (method, bit-width, task, model, seed) point of the grid."""

    method: str
    method_config: dict = field(hash=False, compare=False)
    spec: QuantSpec | None  # None for the FP32 reference
    task: str
    model: str
    seed: int
    recipe: dict = field(hash=False, compare=False)
    limit: int | None = None
    variant: str = field(default="", compare=False)  # non-default method settings, for the leaderboard
    data_dir: str | None = None

    @property
    def config_hash(self) -> str:
        return _hash(self.method_config)

    @property
    def bits_label(self) -> str:
        return self.spec.label() if self.spec else "FP32"

    @property
    def key(self) -> str:
        """The resume key: every input that changes the result, in a readable form."""
        grid = (
            "fp"
            if self.spec is None
            else (
                f"{self.bits_label}|{self.spec.granularity}"
                + (f"{self.spec.group_size}" if self.spec.granularity == "per-group" else "")
                + ("|sym" if self.spec.symmetric else "|asym")
                + f"|{self.spec.levels}lv"
                + ("|emb" if self.spec.embeddings else "")
            )
        )
        return (
            f"{self.method}|cfg={self.config_hash}|{grid}|{self.task}|{self.model}|seed={self.seed}"
            f"|ft={_hash(self.recipe)}|limit={self.limit}" + (f"|data={self.data_dir}" if self.data_dir else "")
        )


BITS = range(2, 9)  # weight and activation bit-widths every method's grid supports
# the papers' conventions for a model kind: groups of 128 for decoders, per-channel weights for BERT-style encoders
KIND_GRANULARITY = {"decoder": "per-group"}
DEFAULT_GRANULARITY = "per-channel"
KIND_DEFAULT_TASK = {"encoder": "sst2", "decoder": "wikitext2"}


@dataclass
class GridRequest:
    """What the user asked for, before validation. ``None`` means: the default, decided by ``plan`` once the model
    is resolved and its kind known (methods: the baseline method; tasks and granularity: by the model's kind)."""

    methods: list[str] | None = None
    bits: list[int] = field(default_factory=lambda: [4, 8])
    tasks: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    model: str = models.DEFAULT_MODEL
    act_bits: int | str | None = "auto"  # "auto": the methods' paper setting (Method.default_act_bits)
    granularity: str | None = None
    group_size: int = 128
    symmetric: bool = True
    narrow: bool = False  # the 2^b - 1 level symmetric grid, only when asked for
    embeddings: bool = False
    settings: dict[str, dict[str, str]] = field(default_factory=dict)  # scope -> field -> raw value
    limit: int | None = None
    reference: bool = True  # add the reference method's cell (FP32) per task and seed
    baseline: bool = True  # add the baseline method's cell (RTN, default settings) at every grid
    data_dir: str | None = None


def role_method(plugins: Plugins, role: str) -> str | None:
    """The one registered method whose class declares ``role`` ("reference" / "baseline"), or None."""
    names = [e.name for e in plugins.methods.entries() if getattr(e.obj, "role", None) == role]
    if len(names) > 1:
        raise PluginError(f"several methods claim the {role} role: {', '.join(names)}; exactly one may")
    return names[0] if names else None


def plan(request: GridRequest, plugins: Plugins) -> tuple[list[Cell], models.ResolvedModel]:
    """Validate every name and setting and expand the grid; nothing is loaded or written here.

    The model is resolved first, so that the defaults of its kind (task, weight granularity) follow what the model
    is, whatever name it was given by (an alias, a hub id, a local directory)."""
    _check_numbers(request)
    methods = [plugins.methods.entry(m).name for m in request.methods or _default_methods(plugins)]
    resolved = models.resolve(request.model)
    if request.tasks is None or request.granularity is None:
        resolved = models.with_kind(resolved)
    tasks = expand_groups(plugins, request.tasks or _default_tasks(resolved))
    granularity = request.granularity or KIND_GRANULARITY.get(resolved.kind, DEFAULT_GRANULARITY)
    scopes = set(methods) | set(tasks) | {TASK_SCOPE}
    for scope in request.settings:
        if scope not in scopes:
            raise unknown("--set scope", scope, scopes)
    configs = {
        m: dataclasses.asdict(apply_overrides(m, plugins.methods.get(m).Config(), request.settings.get(m, {})))
        for m in methods
    }
    variants = {m: _variant(plugins.methods.get(m).Config(), configs[m]) for m in methods}
    _check_shared_task_settings([plugins.tasks.get(t) for t in tasks], request.settings)
    recipes = {t: dataclasses.asdict(_task_recipe(plugins.tasks.get(t), t, request.settings)) for t in tasks}
    act_bits = _act_bits(request.act_bits, [plugins.methods.get(m) for m in methods])
    reference = role_method(plugins, "reference")
    baseline = role_method(plugins, "baseline") if request.baseline else None
    specs = [
        QuantSpec(
            b,
            act_bits,
            granularity,
            request.group_size,
            request.symmetric,
            request.embeddings,
            narrow=request.narrow,
        )
        for b in request.bits
    ]
    cells = []
    for task in tasks:
        for seed in request.seeds:
            common = dict(
                task=task,
                model=resolved.name,
                seed=seed,
                recipe=recipes[task],
                limit=request.limit,
                data_dir=request.data_dir,
            )
            if request.reference and reference and reference not in methods:
                cells.append(Cell(reference, {}, None, **common))
            for method in methods:
                if method == reference:
                    cells.append(Cell(method, configs[method], None, **common, variant=variants[method]))
                    continue
                cells.extend(Cell(method, configs[method], spec, **common, variant=variants[method]) for spec in specs)
            if baseline and any(variants[m] or m != baseline for m in methods if m != reference):
                default = dataclasses.asdict(plugins.methods.get(baseline).Config())
                extra = [Cell(baseline, default, spec, **common) for spec in specs]
                cells.extend(c for c in extra if c.key not in {k.key for k in cells})
    return cells, resolved


def _check_numbers(request: GridRequest) -> None:
    """The numbers of a request that no plugin decides: bit-widths, the evaluation cap, duplicates."""
    for option, values in (("--bits", request.bits), ("--seeds", request.seeds)):
        if len(set(values)) != len(values):
            raise BenchError(f"{option} {list(values)}: a value is listed twice")
    for b in [*request.bits, *([request.act_bits] if isinstance(request.act_bits, int) else [])]:
        if b not in BITS:
            raise BenchError(f"bits: {b} is out of range; choose from {min(BITS)}..{max(BITS)}")
    if not request.bits or not request.seeds:
        raise BenchError("a grid needs at least one bit-width and one seed")
    if request.limit is not None and request.limit < 1:
        raise BenchError(f"--limit {request.limit}: must be a positive number of examples")


def _default_methods(plugins: Plugins) -> list[str]:
    """No methods asked for: the baseline (plain rounding), the one quantized row every table has."""
    baseline = role_method(plugins, "baseline")
    if baseline is None:
        raise BenchError("no methods given and no installed method is the baseline; pass methods")
    return [baseline]


def _default_tasks(model: models.ResolvedModel) -> list[str]:
    """No tasks asked for: the default task of the model's kind."""
    if model.kind not in KIND_DEFAULT_TASK:
        raise BenchError(
            f"model '{model.name}' is neither a known encoder nor a decoder (kind {model.kind!r}); name its tasks"
        )
    return [KIND_DEFAULT_TASK[model.kind]]


def _act_bits(requested: int | str | None, method_classes: list) -> int | None:
    """The grid's one activation bit-width: as asked, or for "auto" the highest paper setting among the
    methods (ZSAQ's WxA8 makes every cell of its grid A8, RTN included, so the comparison stays fair)."""
    if requested != "auto":
        return requested
    wanted = {cls.default_act_bits for cls in method_classes} - {None}
    if wanted:
        log.info(
            "activations: A%d for every cell (the papers' setting of %s); --act-bits 32 keeps them float",
            max(wanted),
            ", ".join(c.__name__ for c in method_classes if c.default_act_bits),
        )
    return max(wanted, default=None)


def expand_groups(plugins: Plugins, names: list[str]) -> list[str]:
    """Task names with groups (registered with ``members=(...)``, e.g. ``glue``) expanded, duplicates dropped."""
    out: list[str] = []
    for name in names:
        entry = plugins.tasks.entry(name)
        for member in entry.meta.get("members") or (entry.name,):
            canonical = plugins.tasks.entry(member).name
            if canonical not in out:
                out.append(canonical)
    return out


def _variant(default_config, config: dict) -> str:
    """'clip=mse' for the settings that differ from the method's defaults ('' when none do)."""
    defaults = dataclasses.asdict(default_config)
    return ",".join(f"{k}={v}" for k, v in config.items() if defaults.get(k) != v)


def _task_recipe(task_cls, name: str, settings: dict[str, dict[str, str]]):
    """The task's recipe with ``--set task.F=V`` (where the task has F) then ``--set NAME.F=V`` applied."""
    recipe = task_cls.Recipe()
    fields = {f.name for f in dataclasses.fields(recipe)}
    shared = settings.get(TASK_SCOPE, {})
    recipe = apply_overrides(name, recipe, {k: v for k, v in shared.items() if k in fields})
    return apply_overrides(name, recipe, settings.get(name, {}))


def _check_shared_task_settings(tasks: list, settings: dict[str, dict[str, str]]) -> None:
    known = {f.name for t in tasks for f in dataclasses.fields(t.Recipe)}
    for field_name in settings.get(TASK_SCOPE, {}):
        if field_name not in known:
            raise unknown("setting of 'task'", field_name, known)


class Runner:
    """Runs planned cells into a result store, one FP model per (task, model, seed) group."""

    def __init__(
        self,
        plugins: Plugins,
        store: ResultStore,
        resolved: models.ResolvedModel,
        device: str = "cpu",
        *,
        latency: bool = True,
        sharpness: SharpnessSettings | None = SharpnessSettings(),
        data_dir: str | None = None,
        command: str | None = None,
    ):
        self.plugins = plugins
        self.store = store
        self.resolved = resolved
        self.device = device
        self.latency = latency
        self.sharpness = sharpness
        self.data_dir = data_dir
        # the driver's command line: rows made in a worker process must not record the worker's argv
        self.command = command or provenance.command_line()
        self._data: dict[str, object] = {}

    def pending(self, cells: list[Cell], *, force: bool = False, retry_failed_only: bool = False) -> list[Cell]:
        """The cells a run would execute: not yet ok (all with ``force``; only failed ones when retrying)."""
        latest = self.store.latest()
        todo = [c for c in cells if force or latest.get(c.key, {}).get("status") != "ok"]
        if retry_failed_only:
            todo = [c for c in todo if latest.get(c.key, {}).get("status") == "failed"]
        return todo

    def preload(self, cells: list[Cell]) -> None:
        """Load the data of every task these cells need, so a missing dataset is a user error (exit 2)
        before anything is written, not a grid of failed cells."""
        for name in dict.fromkeys(c.task for c in cells):
            self._load_data(self.plugins.tasks.get(name)())

    def run(
        self, cells: list[Cell], *, force: bool = False, retry_failed_only: bool = False, executor=None
    ) -> dict[str, int]:
        """Run the pending cells with ``executor`` (default: in this process, one after another) and append
        each row as it arrives; the store is written by this driver only, whatever runs the cells."""
        from bench.executors import LocalExecutor

        todo = self.pending(cells, force=force, retry_failed_only=retry_failed_only)
        counts = {"planned": len(cells), "skipped": len(cells) - len(todo), "ok": 0, "failed": 0}
        if not todo:
            log.info("all %d cells already done; nothing to run (use --force to redo)", len(cells))
            return counts
        executor = executor or LocalExecutor()
        with tqdm(total=len(todo), desc="cells", unit="cell", dynamic_ncols=True) as bar:
            for cell, row in executor.execute(self, group_cells(todo)):
                self.store.append(row)
                counts[row["status"]] += 1
                bar.set_postfix_str(f"{cell.method} {cell.bits_label} {cell.task}: {row['status']}")
                bar.update()
        return counts

    def prepare(self, cell: Cell) -> tuple:
        """The task, recipe, data and FP model shared by ``cell``'s group: fine-tuned once, then from the cache.

        Returns ``(task, recipe, data, fp_model, tokenizer, ft_info)``; raises what loading or fine-tuning raised.
        """
        task = self.plugins.tasks.entry(cell.task).obj()
        recipe = task.Recipe(**cell.recipe)
        data = self._load_data(task)
        if task.needs_finetune:
            fp_model, tokenizer, ft_info = models.load_finetuned(
                self.resolved, task, data, cell.seed, recipe, device=self.device
            )
        else:
            fp_model, tokenizer = task.load_model(self.resolved)
            ft_info = None
        fp_model.to(self.device).eval()
        return task, recipe, data, fp_model, tokenizer, ft_info

    def failed_row(self, cell: Cell, error: BaseException, *, started: str | None = None) -> dict:
        """The failed row of a cell that never ran its method (its group's FP model failed, its worker died)."""
        return self._row(cell, self.plugins.tasks.entry(cell.task), None, started=started or _now(), error=error)

    def log_prepare_failure(self, cell: Cell, exc: BaseException) -> None:
        log.error("could not prepare %s/%s seed %d: %s", cell.task, cell.model, cell.seed, _describe_error(exc))
        _log_traceback(exc)

    # ------------------------------------------------------------------ internals
    def _run_group(self, group: list[Cell]):
        first = group[0]
        task_entry = self.plugins.tasks.entry(first.task)
        try:
            prepared = self.prepare(first)
        except Exception as exc:
            self.log_prepare_failure(first, exc)
            for cell in group:
                yield cell, self.failed_row(cell, exc)
            return
        for cell in group:
            yield cell, self._run_cell(cell, task_entry, *prepared)

    def _load_data(self, task):
        if task.name not in self._data:
            self._data[task.name] = task.load(self.data_dir)
        return self._data[task.name]

    def _run_cell(self, cell, task_entry, task, recipe, data, fp_model, tokenizer, ft_info) -> dict:
        started, t0 = _now(), time.perf_counter()
        method_entry = self.plugins.methods.entry(cell.method)
        try:
            method_cls = method_entry.obj
            method = method_cls(method_cls.Config(**cell.method_config))
            student = copy.deepcopy(fp_model)
            meter = MethodMeter(student)
            context = self.method_context(method, task, tokenizer, data, recipe, cell.seed, watch=meter.watch)
            seed_everything(cell.seed)
            with meter:
                model = method.quantize(student, cell.spec, context)
            if not isinstance(model, torch.nn.Module):
                raise PluginError(
                    f"method '{cell.method}' ({method_entry.provider}) returned {type(model).__name__}, "
                    "not a torch.nn.Module"
                )
            timing, clock = {}, time.perf_counter()
            preds, refs = task.predict(model, tokenizer, data, limit=cell.limit, device=self.device, recipe=recipe)
            metrics = {m: self.plugins.metrics.get(m)(preds, refs) for m in task.metrics}
            timing["eval_s"], clock = round(time.perf_counter() - clock, 3), time.perf_counter()
            footprint = {"size_bytes": size_bytes(model), "fp32_size_bytes": fp32_size_bytes(model)}
            latency = self._latency(model) if self.latency else None
            timing["latency_s"], clock = round(time.perf_counter() - clock, 3), time.perf_counter()
            curvature = self._curvature(model, task, tokenizer, data, recipe, cell.seed) if self.sharpness else {}
            timing["sharpness_s"] = round(time.perf_counter() - clock, 3)
        except Exception as exc:
            log.error("cell %s failed: %s", cell.key, _describe_error(exc))
            _log_traceback(exc)
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
            timing=timing,
            quantized=summarize(model),
            finetune=ft_info,
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
        stats = model_latency(model, inputs, warmup=LATENCY_WARMUP, repeats=LATENCY_REPEATS, decode=decoder)
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
            "timing": None,  # seconds of the measurements after it: eval_s, latency_s, sharpness_s
            "method_info": None,  # what the method reported (MethodContext.report), e.g. its trainable fraction
            "metrics": {},
            "score": None,
            "sharpness": None,
            "hessian": None,
            "latency": None,
            "size_bytes": None,
            "fp32_size_bytes": None,
            "status": "failed" if error is not None else "ok",
            "error": _describe_error(error) if error is not None else None,
            "started": started,
            "finished": _now(),
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


RUN_FORMATS = ("md", "csv", "json", "html", "png")  # the leaderboard files every run writes into its run dir


@dataclass
class RunResult:
    """What ``run`` returns: where the run lives, its cells, what happened to them, their rows and the table."""

    out: Path
    cells: list[Cell]
    model: models.ResolvedModel
    counts: dict[str, int]  # planned, skipped (already done), ok, failed
    rows: list[dict]  # the newest row of every planned cell (ok and failed), in plan order
    board: Leaderboard  # the run dir's whole leaderboard (earlier cells of the same dir included)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r.get("status") != "ok"]


def run(
    methods: str | list[str] | None = None,
    bits: int | list[int] = (4, 8),
    tasks: str | list[str] | None = None,
    model: str = models.DEFAULT_MODEL,
    seeds: int | list[int] = (0,),
    out: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    act_bits: int | str | None = "auto",
    granularity: str | None = None,
    group_size: int = 128,
    symmetric: bool = True,
    narrow: bool = False,
    embeddings: bool = False,
    settings: dict | None = None,
    limit: int | None = None,
    reference: bool = True,
    baseline: bool = True,
    data_dir: str | None = None,
    force: bool = False,
    retry_failed: bool = False,
    skip_damaged: bool = False,
    latency: bool = True,
    sharpness: bool = True,
    rho: float = 0.05,
    hessian: bool = False,
    device: str | None = None,
    executor: str = "local",
    jobs: int | None = None,
    ray_address: str | None = None,
    ray_cpus_per_cell: float = 1,
    formats: tuple[str, ...] = RUN_FORMATS,
    plugins: Plugins | None = None,
    echo: Callable[[str], None] | None = None,
) -> RunResult:
    """Plan the grid methods x bits x tasks x seeds on ``model``, run the cells not yet done into ``out``
    (default ``results/<name or timestamp>``), write the leaderboard files and return the rows and the table.

    What ``bench run`` does, option for option (``bench run --help``): names may be lists or comma strings,
    ``settings`` maps ``"scope.field"`` (or ``scope -> {field: value}``) to values (``{"rtn.clip": "mse"}``),
    ``act_bits`` is "auto", None (float activations) or 2..8. ``None`` for methods, tasks and granularity means
    the defaults (the baseline method; the task and granularity of the model's kind). A bad name or value raises
    ``BenchError`` before anything is written; a cell that fails is a failed row and the grid goes on.
    ``echo`` receives the one-line announcements ``bench run`` prints (default: the log, at INFO).
    """
    from bench import plugins as plugin_mod
    from bench.executors import make_executor

    plugins = plugins or plugin_mod.default()
    echo = echo or log.info
    request = GridRequest(
        methods=_names(methods),
        bits=_numbers(bits),
        tasks=_names(tasks),
        seeds=_numbers(seeds),
        model=model,
        act_bits=act_bits,
        granularity=granularity,
        group_size=group_size,
        symmetric=symmetric,
        narrow=narrow,
        embeddings=embeddings,
        settings=_settings(settings),
        limit=limit,
        reference=reference,
        baseline=baseline,
        data_dir=data_dir,
    )
    cells, resolved = plan(request, plugins)
    pool = make_executor(executor, jobs=jobs, ray_address=ray_address, ray_cpus_per_cell=ray_cpus_per_cell)
    if hasattr(pool, "check"):
        pool.check()  # e.g. the Ray install hint, an unreachable --ray-address: before anything is written
    out = Path(out) if out else RESULTS_ROOT / (name or datetime.now().strftime("%Y%m%d-%H%M%S"))
    store = ResultStore(out, skip_damaged=skip_damaged)
    if store.path.exists():
        store.rows()  # a corrupt results file is reported before any work starts
    runner = Runner(
        plugins,
        store,
        resolved,
        device or _default_device(),
        latency=latency,
        sharpness=SharpnessSettings(rho=rho, hessian=hessian) if sharpness else None,
        data_dir=data_dir,
    )
    runner.preload(runner.pending(cells, force=force, retry_failed_only=retry_failed))
    with store.lock():
        meta = store.meta()
        store.write_meta(
            {
                **meta,
                "planned": sorted(set(meta.get("planned", [])) | {c.key for c in cells}),
                "last_command": provenance.command_line(),
                "created": meta.get("created", datetime.now().isoformat(timespec="seconds")),
            }
        )
        echo(f"run dir: {out}  ({len(cells)} cells, model {resolved.name} from {resolved.source})")
        counts = runner.run(cells, force=force, retry_failed_only=retry_failed, executor=pool)
        board = load_leaderboard([str(out)], skip_damaged=skip_damaged)
        for fmt in formats:
            board.write(fmt, out / f"leaderboard.{fmt}", plugins=plugins)
    latest = store.latest()
    rows = [latest[c.key] for c in cells if c.key in latest]
    return RunResult(out, cells, resolved, counts, rows, board)


def _names(value: str | list[str] | None) -> list[str] | None:
    """'rtn,gptq' or ['rtn', 'gptq'] -> ['rtn', 'gptq']; None stays None (the default)."""
    if value is None:
        return None
    items = [part.strip() for part in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    if not all(items):
        raise BenchError(f"{value!r}: empty name in the list")
    return items


def _numbers(value: int | list[int]) -> list[int]:
    return [value] if isinstance(value, int) else list(value)


def _settings(settings: dict | None) -> dict[str, dict[str, str]]:
    """{"rtn.clip": "mse"} or {"rtn": {"clip": "mse"}} -> {"rtn": {"clip": "mse"}}, values as the CLI would type
    them (so one converter turns them into each field's declared type)."""
    out: dict[str, dict[str, str]] = {}
    for key, value in (settings or {}).items():
        if isinstance(value, dict):
            for field_name, raw in value.items():
                out.setdefault(key.lower(), {})[field_name] = _raw(raw)
            continue
        scope, dot, field_name = key.partition(".")
        if not dot or not scope or not field_name:
            raise BenchError(f"setting {key!r}: expected 'SCOPE.FIELD' (scope: a method, a task, or task)")
        out.setdefault(scope.lower(), {})[field_name] = _raw(value)
    return out


def _raw(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


LABEL_KEYS = ("labels", "label")


def _unlabeled(make: Callable[[int], list[dict]], n: int) -> list[dict]:
    """Calibration batches with any label removed: calibration methods see inputs, never answers."""
    return [{k: v for k, v in batch.items() if k not in LABEL_KEYS} for batch in make(n)]


def group_cells(cells: list[Cell]) -> list[list[Cell]]:
    """Cells grouped by (task, seed, fine-tune recipe): each group shares one FP model, prepared once."""
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[(cell.task, cell.seed, _hash(cell.recipe))].append(cell)
    return list(groups.values())


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's (CUDA/MPS) OutOfMemoryError, Python's MemoryError, or Ray's memory monitor killing a worker."""
    return isinstance(exc, MemoryError | torch.OutOfMemoryError) or type(exc).__name__ == "OutOfMemoryError"


def _describe_error(exc: BaseException) -> str:
    """The row's ``error``: 'Type: message', prefixed 'out of memory:' when memory ran out (so it reads as such
    in the leaderboard's failed list, not as an obscure allocator message)."""
    text = f"{type(exc).__name__}: {exc}"
    return f"out of memory: {text}" if is_out_of_memory(exc) else text


def _log_traceback(exc: BaseException) -> None:
    """The traceback of a failed cell: at ERROR for out-of-memory (the user must see what allocated), at INFO
    (``-v``) for every other failure. The failed cell's tensors are freed when its frames go (the row is
    returned), and torch's caching allocator hands that memory to the next cell: the grid goes on."""
    text = "".join(traceback.format_exception(exc))
    if is_out_of_memory(exc):
        log.error("out of memory; traceback:\n%s", text)
    else:
        log.info("traceback:\n%s", text)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
