"""Wall time, peak resident memory (RSS) and the machine's other load during each phase of a cell: what it costs
to run, not what it scores, and whether those seconds were its own.

A benchmark that is to scale to bigger models has to say where its memory goes. Linux keeps a high-water mark
of the process's RSS (``VmHWM`` in ``/proc/self/status``) and resets it on request (writing ``5`` to
``/proc/self/clear_refs``, Linux >= 4.0), so each phase's peak is its own, not the largest of everything the
process did before. Where that reset is unavailable (another OS, a locked-down container) the figure is the
process's peak so far (``getrusage``), and ``scope`` says so. Seconds depend on what else the machine ran, so
each phase also records the cores other processes kept busy meanwhile (``busy_elsewhere``).
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")

_PROC_STAT = "/proc/stat"
BUSY_MIN_S = 0.5  # shortest block whose others_cores is told


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (all CPUs: not idle, not waiting on I/O)."""
    try:
        with open(_PROC_STAT) as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


@contextmanager
def busy_elsewhere() -> Iterator[dict[str, float | None]]:
    """Measure, over the ``with`` block, the cores other processes kept busy: ``{"others_cores": x}``; None where
    ``/proc/stat`` is unreadable or the block lasted under ``BUSY_MIN_S`` (the counters tick every 10 ms: a
    handful of ticks over a few milliseconds would read as whole cores)."""
    out: dict[str, float | None] = {"others_cores": None}
    busy, own, start = _busy_seconds(), _own_seconds(), time.perf_counter()
    yield out
    end_busy, wall = _busy_seconds(), time.perf_counter() - start
    if busy is not None and end_busy is not None and wall >= BUSY_MIN_S:
        out["others_cores"] = round(max(0.0, (end_busy - busy) - (_own_seconds() - own)) / wall, 2)


def release_freed_memory() -> None:
    """Collect garbage and hand the C heap's freed pages back to the OS (glibc's ``malloc_trim``), so a phase's
    peak starts from the memory still in use, not from what earlier cells freed but the allocator kept (a
    SmolLM2 grid's later phases otherwise started 1-5 GB higher, growing from cell to cell)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def reset_peak_rss() -> bool:
    """Start a new high-water mark of this process's RSS; False where the OS cannot (peaks are then cumulative)."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB since the last ``reset_peak_rss`` (or since it started)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class Phases:
    """Seconds and peak RSS of named phases (``with phases("eval"): ...``), for a result row.

    ``seconds`` holds ``{phase}_s`` (the row's ``timing``), ``peak_rss_mb`` the peak per phase, ``others_cores``
    the cores other processes kept busy per phase, and ``scope`` is "phase" when each peak was measured alone,
    "process" when peaks include what ran before.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self.others: dict[str, float | None] = {}
        self.scope = "phase"

    def copy(self) -> Phases:
        """The phases so far, to continue with more (a cell continues its group's "prepare")."""
        other = Phases()
        other.seconds, other.peak_mb, other.others = dict(self.seconds), dict(self.peak_mb), dict(self.others)
        other.scope = self.scope
        return other

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        release_freed_memory()
        if not reset_peak_rss():
            self.scope = "process"
        start = time.perf_counter()
        with busy_elsewhere() as load:
            try:
                yield
            finally:
                self.seconds[f"{name}_s"] = round(time.perf_counter() - start, 3)
                self.peak_mb[name] = peak_rss_mb()
        self.others[name] = load["others_cores"]

    def as_timing(self) -> dict:
        """The row's ``timing``: ``{phase}_s`` for each phase, ``peak_rss_mb`` and ``others_cores`` per phase, and
        ``rss_scope``."""
        return {
            **self.seconds,
            "peak_rss_mb": dict(self.peak_mb),
            "others_cores": dict(self.others),
            "rss_scope": self.scope,
        }

    @property
    def peak(self) -> float | None:
        """The largest phase peak (MiB): the row's ``peak_rss_mb``; None when no phase ran."""
        return max(self.peak_mb.values()) if self.peak_mb else None


PHASES = ("prepare", "reference", "method", "eval", "latency", "sharpness")


def phase_table(rows: list[dict]) -> str:
    """Seconds per phase, peak RSS and the most cores other processes kept busy in a phase, for each finished row,
    as ``bench show`` prints them (older rows show what they have: the method's seconds from its cost)."""
    from tabulate import tabulate

    table = []
    for row in rows:
        timing, cost = row.get("timing") or {}, row.get("cost") or {}
        seconds = {**({"method_s": cost["method_s"]} if "method_s" in cost else {}), **timing}
        others = [x for x in (timing.get("others_cores") or {}).values() if x is not None]
        table.append(
            [row.get("method"), row.get("bits"), row.get("task"), row.get("seed")]
            + [seconds.get(f"{phase}_s") for phase in PHASES]
            + [row.get("wall_time_s"), row.get("peak_rss_mb"), max(others) if others else None]
        )
    phases = (f"{phase} s" for phase in PHASES)
    # busy elsewhere: the most CPU cores other processes kept busy during any phase (seconds above it are inflated)
    headers = ["method", "bits", "task", "seed", *phases, "cell s", "peak MiB", "busy elsewhere"]
    return tabulate(table, headers=headers, floatfmt=".1f", missingval="–")
