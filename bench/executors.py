"""Where cells run: in this process (``local``), in a local process pool (``--jobs N``), or as Ray tasks.

An executor takes the pending cells grouped by shared FP model (``bench.grid.group_cells``) and a
``bench.cell.CellRunner``, and yields ``(cell, row)`` pairs as rows become ready; the driver (``bench.runner``)
appends each one to the result store.
Workers never write ``results.jsonl``: one writer means no interleaved lines across processes or hosts,
and the store's crash guarantees (atomic appends, resume by key) hold unchanged.

A worker rebuilds everything from plain, picklable data (a ``WorkerSpec`` and ``Cell``s): plugins from
entry points, the model by name, the task data, the FP model from the on-disk fine-tune cache. It then
runs the very ``CellRunner.prepare`` / ``CellRunner.run_group`` code the local executor runs, so rows cannot
drift between executors. Plugins registered in-process only (tests) are invisible to worker processes.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context

from bench import hub, logs
from bench.cell import CellRunner, Rows, SharpnessSettings
from bench.errors import BenchError, unknown
from bench.grid import Cell
from bench.models import ResolvedModel
from bench.provenance import now

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs the optional extra: pip install 'quantbench[ray]'"
# what a worker must see to find the same fine-tune cache and to stay off the hub
CARRIED_ENV = ("QUANTBENCH_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM")
# workers' own progress bars (fine-tune, eval) would interleave on the driver's terminal: the driver's bar counts cells
WORKER_ENV = {"TQDM_DISABLE": "1"}
LOG_FLUSH_S = 1.5


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs to rebuild the driver's cell runner, as plain picklable data."""

    resolved: ResolvedModel
    device: str
    latency: bool
    sharpness: SharpnessSettings | None
    data_dir: str | None
    command: str
    log_level: int
    threads: int | None = None  # torch threads per worker; None keeps torch's default

    @classmethod
    def of(cls, runner: CellRunner, threads: int | None = None) -> WorkerSpec:
        return cls(
            resolved=runner.resolved,
            device=runner.device,
            latency=runner.latency,
            sharpness=runner.sharpness,
            # a worker's working directory is not the driver's
            data_dir=os.path.abspath(runner.data_dir) if runner.data_dir else None,
            command=runner.command,
            log_level=logging.getLogger("bench").getEffectiveLevel(),
            threads=threads,
        )


# ----------------------------------------------------------------------------- worker side

_RUNNERS: dict[WorkerSpec, CellRunner] = {}


def worker_runner(spec: WorkerSpec) -> CellRunner:
    """This worker process's cell runner for ``spec``, built once: a reused worker loads plugins and data once."""
    runner = _RUNNERS.get(spec)
    if runner is None:
        # the driver's log level on stderr (Ray forwards it to the driver's terminal) and its thread budget
        logs.setup(spec.log_level, worker=True)
        if spec.threads:
            import torch

            torch.set_num_threads(spec.threads)
        from bench import plugins

        runner = CellRunner(
            plugins.default(),
            spec.resolved,
            spec.device,
            latency=spec.latency,
            sharpness=spec.sharpness,
            data_dir=spec.data_dir,
            command=spec.command,
        )
        _RUNNERS[spec] = runner
    return runner


def prepare_group(spec: WorkerSpec, cell: Cell) -> BaseException | None:
    """Fine-tune (or load) the FP model of ``cell``'s group, once, before the group's cells run in parallel:
    the cells then load it from the cache. Returns the error instead of raising, so each cell of the group
    records it as its failed row rather than retrying the fine-tune."""
    runner = worker_runner(spec)
    try:
        runner.prepare(cell)
    except Exception as exc:
        runner.log_prepare_failure(cell, exc)
        return _portable(exc)
    return None


def run_cell(spec: WorkerSpec, cell: Cell, prepare_error: BaseException | None = None) -> dict:
    """One cell's row, computed exactly as the local executor computes it."""
    runner = worker_runner(spec)
    if prepare_error is not None:
        return runner.failed_row(cell, prepare_error)
    ((_, row),) = runner.run_group([cell])
    return row


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (to travel back to the driver), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------- executors


def make_executor(
    name: str,
    *,
    jobs: int | None = None,
    ray_address: str | None = None,
    ray_cpus_per_cell: float = 1,
):
    """The executor the CLI asked for; bad names and values are one-line user errors."""
    key = name.lower()
    if key not in EXECUTORS:
        raise unknown("--executor", name, EXECUTORS)
    if jobs is not None and jobs < 1:
        raise BenchError(f"--jobs {jobs}: must be a positive number of parallel cells")
    if ray_cpus_per_cell <= 0:
        raise BenchError(f"--ray-cpus-per-cell {ray_cpus_per_cell}: must be positive")
    if key == "local":
        if ray_address:
            raise BenchError("--ray-address needs --executor ray")
        return LocalExecutor() if not jobs or jobs == 1 else PoolExecutor(jobs)
    return RayExecutor(address=ray_address, jobs=jobs, cpus_per_cell=ray_cpus_per_cell)


class LocalExecutor:
    """In this process, group after group, cell after cell: the FP model is prepared once per group in memory."""

    def execute(self, runner: CellRunner, groups: list[list[Cell]]) -> Rows:
        for group in groups:
            yield from runner.run_group(group)


class PoolExecutor:
    """``jobs`` worker processes on this machine, with the same worker functions as Ray: each group's FP model
    is prepared once, then its cells run in parallel.

    Each worker is a process pool of its own with one task at a time, not one shared pool: Python's shared
    pool breaks as a whole when one worker dies, failing every queued cell with it. Here a dead worker (a
    segfault, the kernel's OOM killer) costs exactly the task it was running, which records a failed row; the
    slot gets a fresh process and the remaining cells go on."""

    def __init__(self, jobs: int):
        self.jobs = jobs

    def execute(self, runner: CellRunner, groups: list[list[Cell]]) -> Rows:
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        spec = WorkerSpec.of(runner, threads=threads)
        needs_prepare = runner.needs_prepare
        # tasks: ("prepare", group) first for groups that fine-tune, ("cell", cell) once their group is ready
        queue: list[tuple[str, object]] = []
        for group in groups:
            queue.extend([("prepare", group)] if needs_prepare(group[0]) else [("cell", c) for c in group])
        with _environ(WORKER_ENV):
            slots = [_Slot() for _ in range(self.jobs)]
            running: dict[Future, tuple[_Slot, str, object, str]] = {}
            try:
                while queue or running:
                    for slot in [s for s in slots if s not in {v[0] for v in running.values()}]:
                        if not queue:
                            break
                        kind, what = queue.pop(0)
                        fn = prepare_group if kind == "prepare" else run_cell
                        arg = what[0] if kind == "prepare" else what
                        running[slot.submit(fn, spec, arg)] = (slot, kind, what, now())
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for future in done:
                        slot, kind, what, started = running.pop(future)
                        try:
                            result = future.result()
                        except Exception as exc:  # the worker died (BrokenProcessPool) or pickling failed
                            if isinstance(exc, BrokenProcessPool):
                                slot.restart()
                            for cell in what if kind == "prepare" else [what]:
                                yield cell, _lost_cell(runner, cell, exc, started)
                            continue
                        if kind == "cell":
                            yield what, result
                        elif result is not None:  # the group's FP model failed: every cell of it records that
                            for cell in what:
                                yield cell, runner.failed_row(cell, result, started=started)
                        else:
                            queue[:0] = [("cell", c) for c in what]  # the group is ready: its cells next
            finally:
                for slot in slots:
                    slot.close()


class _Slot:
    """One worker process (a single-process pool), replaced when it dies."""

    def __init__(self):
        self.pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))

    def submit(self, fn, *args) -> Future:
        return self.pool.submit(fn, *args)

    def restart(self) -> None:
        self.close()
        self.pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """One Ray task per cell (plus one per group to prepare its FP model first), on a local Ray instance
    started here or on the cluster at ``address``; rows come back in completion order. A worker that dies
    (crash, Ray's memory monitor) becomes that cell's failed row and the grid goes on."""

    def __init__(self, *, address: str | None = None, jobs: int | None = None, cpus_per_cell: float = 1):
        self.address = address
        self.jobs = jobs
        self.cpus_per_cell = cpus_per_cell

    def check(self) -> None:
        """Fail fast, before the run dir is written: Ray missing, or an ``address`` nothing listens on
        (Ray itself retries an unreachable cluster for minutes before it gives up)."""
        import_ray()
        host, port = _host_port(self.address) if self.address else (None, None)
        if host and port:
            try:
                socket.create_connection((host, port), timeout=5).close()
            except OSError as exc:
                raise BenchError(f"--ray-address {self.address}: nothing answers at {host}:{port} ({exc})") from None

    def execute(self, runner: CellRunner, groups: list[list[Cell]]) -> Rows:
        ray = import_ray()
        started_here = self._init(ray)
        pending: dict = {}
        failed = False
        try:
            threads = max(1, int(self.cpus_per_cell))
            spec_ref = ray.put(WorkerSpec.of(runner, threads=threads))
            options = dict(
                num_cpus=self.cpus_per_cell,
                num_gpus=1 if runner.device.startswith("cuda") else 0,
                max_retries=0,  # a cell that killed its worker would most likely kill the next one too
            )
            prepare = ray.remote(prepare_group).options(**options)
            cell_task = ray.remote(run_cell).options(**options)
            needs_prepare = runner.needs_prepare
            for group in groups:
                prepared = prepare.remote(spec_ref, group[0]) if needs_prepare(group[0]) else None
                for cell in group:
                    pending[cell_task.remote(spec_ref, cell, prepared)] = (cell, now())
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    cell, started = pending.pop(ref)
                    try:
                        row = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        row = _lost_cell(runner, cell, _ray_cause(exc), started, detail=str(exc))
                    failed = failed or row["status"] != "ok"
                    yield cell, row
        finally:
            for ref in pending:  # interrupted: stop what is still queued on a cluster that outlives us
                try:
                    ray.cancel(ref, force=True)
                except Exception as exc:  # already finished or the cluster is gone: nothing left to stop
                    log.debug("could not cancel a Ray task: %s", exc)
            if started_here:
                if failed:  # Ray forwards worker logs by polling their files: let the failures' tracebacks arrive
                    time.sleep(LOG_FLUSH_S)
                ray.shutdown()

    def _init(self, ray) -> bool:
        """Connect to ``address`` or start a quiet local instance; False when Ray was already initialized."""
        if ray.is_initialized():
            return False
        env = {**{k: os.environ[k] for k in CARRIED_ENV if k in os.environ}, **WORKER_ENV}
        quiet = logging.getLogger("bench").getEffectiveLevel() > logging.INFO
        kwargs = dict(
            runtime_env={"env_vars": env},
            logging_level=logging.ERROR if quiet else logging.WARNING,
            log_to_driver=True,
        )
        if self.address:
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise BenchError(f"--ray-address {self.address}: cannot connect to a Ray cluster: {exc}") from exc
        else:
            # a local instance shares this machine's cache directory: name it explicitly for the workers
            env.setdefault("QUANTBENCH_CACHE", str(hub.cache_root().resolve()))
            cpus = self.jobs * self.cpus_per_cell if self.jobs else (os.cpu_count() or 1)
            ray.init(num_cpus=cpus, include_dashboard=False, **kwargs)
        return True


def import_ray():
    """The ``ray`` module, or the one-line install hint."""
    try:
        import ray
    except ImportError:
        raise BenchError(RAY_MISSING) from None
    return ray


def _host_port(address: str) -> tuple[str | None, int | None]:
    """'ray://head:10001' or 'head:6379' -> ('head', port); 'auto' (and the like) -> (None, None)."""
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else (None, None)


def _ray_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised (RayTaskError wraps it), or Ray's own (worker crashed, out of memory)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _lost_cell(runner: CellRunner, cell: Cell, exc: BaseException, started: str, detail: str = "") -> dict:
    """The failed row of a cell whose worker never returned a row."""
    log.error("cell %s: its worker failed: %s: %s", cell.key, type(exc).__name__, detail or exc)
    return runner.failed_row(cell, exc, started=started)


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in this process's environment while the block runs (spawned workers inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
