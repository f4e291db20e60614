"""The driver of a run: ``run`` (the Python API ``bench run`` calls) plans the grid, runs the pending cells with an
executor, appends their rows to the run dir's store and renders the leaderboard.

Reading downhill: ``bench.grid`` turns the request into validated cells, ``bench.executors`` decides where cells
run, ``bench.cell`` computes each row. Each cell appends exactly one row to the run's result store. A cell that
raises records a failed row (error and traceback in the log) and the grid goes on; cells whose key already has an
ok row are skipped unless ``force``. Only this driver appends rows, whatever executor ran the cells.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench import models, provenance
from bench.cell import CellRunner, SharpnessSettings, is_out_of_memory  # noqa: F401 - is_out_of_memory: old import path
from bench.errors import BenchError
from bench.executors import LocalExecutor, make_executor
from bench.grid import Cell, GridRequest, expand_groups, group_cells, plan, role_method  # noqa: F401 - old import path
from bench.leaderboard import Leaderboard
from bench.leaderboard import load as load_leaderboard
from bench.plugins import Plugins
from bench.results import RESULTS_ROOT, ResultStore

log = logging.getLogger(__name__)


class Runner(CellRunner):
    """Runs planned cells into a result store: the cell runner, plus the store only this driver writes."""

    def __init__(self, plugins: Plugins, store: ResultStore, resolved: models.ResolvedModel, device: str = "cpu", **kw):
        super().__init__(plugins, resolved, device, **kw)
        self.store = store

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
            self.load_data(self.plugins.tasks.get(name)())

    def run(
        self, cells: list[Cell], *, force: bool = False, retry_failed_only: bool = False, executor=None
    ) -> dict[str, int]:
        """Run the pending cells with ``executor`` (default: in this process, one after another) and append
        each row as it arrives; the store is written by this driver only, whatever runs the cells."""
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
    sweeps: dict | list[str] | None = None,
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
    ``sweeps`` maps ``"method.field"`` to a list of values, each its own cell and leaderboard variant
    (``{"zsaq.steps": [60, 240]}``; a comma string, ``method -> {field: values}`` or ``bench run``'s
    ``["zsaq.steps=60,240"]`` also do; two fields of one method run their product),
    ``act_bits`` is "auto", None (float activations) or 2..8. ``None`` for methods, tasks and granularity means
    the defaults (the baseline method; the task and granularity of the model's kind). A bad name or value raises
    ``BenchError`` before anything is written; a cell that fails is a failed row and the grid goes on.
    ``echo`` receives the one-line announcements ``bench run`` prints (default: the log, at INFO).
    """
    from bench import plugins as plugin_mod

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
        sweeps=_sweeps(sweeps),
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
                "created": meta.get("created", provenance.now()),
            }
        )
        echo(f"run dir: {out}  ({len(cells)} cells, model {resolved.name} from {resolved.source})")
        counts = runner.run(cells, force=force, retry_failed_only=retry_failed, executor=pool)
        board = load_leaderboard([str(out)], skip_damaged=skip_damaged, plugins=plugins)
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


SWEEP_FORM = "METHOD.FIELD=V1,V2,..."


def _sweeps(sweeps: dict | list[str] | str | None) -> dict[str, dict[str, list[str]]]:
    """{"zsaq.steps": [60, 240]}, {"zsaq.steps": "60,240"}, {"zsaq": {"steps": [60, 240]}} or the CLI's
    ["zsaq.steps=60,240"] -> {"zsaq": {"steps": ["60", "240"]}}, values as the CLI would type them (``bench.grid``
    converts and checks them, as it does ``settings``)."""
    items: list[tuple[str, object]] = []
    if isinstance(sweeps, dict):
        for key, values in sweeps.items():
            if isinstance(values, dict):
                items.extend((f"{key}.{name}", v) for name, v in values.items())
            else:
                items.append((key, values))
    else:
        for text in [sweeps] if isinstance(sweeps, str) else sweeps or []:
            target, eq, values = str(text).partition("=")
            if not eq:
                raise BenchError(f"--sweep {text!r}: expected {SWEEP_FORM}")
            items.append((target, values))
    out: dict[str, dict[str, list[str]]] = {}
    for target, values in items:
        scope, dot, name = str(target).strip().partition(".")
        if not dot or not scope or not name:
            raise BenchError(f"--sweep {target!r}: expected {SWEEP_FORM} (a method's setting)")
        if isinstance(values, str):
            raws = [part.strip() for part in values.split(",")]
        else:
            raws = [_raw(v) for v in (values if isinstance(values, list | tuple) else [values])]
        if not raws or not all(raws):
            raise BenchError(f"--sweep {target}={_raw(values)!r}: empty value in the list")
        if name in out.get(scope.lower(), {}):
            raise BenchError(f"--sweep {target}: swept twice; give all its values in one sweep")
        out.setdefault(scope.lower(), {})[name] = raws
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
