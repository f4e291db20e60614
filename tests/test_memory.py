"""Per-phase wall time and peak RSS: each phase's peak is its own (the high-water mark is reset), so a light
phase after a heavy one does not inherit the heavy one's peak."""

import sys

import pytest
import torch

from bench.metrics import memory
from bench.metrics.memory import Phases, peak_rss_mb, reset_peak_rss


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-phase peaks need Linux's clear_refs")
def test_each_phase_has_its_own_peak():
    phases = Phases()
    with phases("heavy"):
        block = torch.ones(300 * 2**20 // 4)  # 300 MiB, every page touched
        del block
    with phases("light"):
        sum(range(1000))
    assert phases.scope == "phase"
    assert phases.peak_mb["heavy"] - phases.peak_mb["light"] > 250, phases.peak_mb
    assert set(phases.seconds) == {"heavy_s", "light_s"} and all(v >= 0 for v in phases.seconds.values())
    assert phases.peak == phases.peak_mb["heavy"]
    timing = phases.as_timing()
    assert timing == {
        **phases.seconds,
        "peak_rss_mb": phases.peak_mb,
        "others_cores": phases.others,
        "rss_scope": "phase",
    }
    assert set(timing["others_cores"]) == {"heavy", "light"}


def _rss_mb() -> float:
    """This process's current RSS (MiB), from /proc/self/status."""
    status = open("/proc/self/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
def test_peak_is_at_least_the_current_rss():
    reset_peak_rss()
    assert peak_rss_mb() >= _rss_mb() - 1


def test_copy_continues_the_phases_without_changing_the_original():
    first = Phases()
    with first("prepare"):
        pass
    second = first.copy()
    with second("method"):
        pass
    assert set(first.seconds) == {"prepare_s"} and set(second.seconds) == {"prepare_s", "method_s"}
    assert Phases().peak is None


def test_phase_table_shows_each_phase_and_the_peak():
    from bench.metrics.memory import phase_table

    new = {"method": "zsaq", "bits": "W2A8", "task": "sst2", "seed": 0, "wall_time_s": 61.0, "peak_rss_mb": 2048.5}
    new["timing"] = {
        "prepare_s": 12.0,
        "reference_s": 1.5,
        "method_s": 40.25,
        "eval_s": 9.5,
        "sharpness_s": 11.0,
        "peak_rss_mb": {},
    }
    new["timing"]["others_cores"] = {"prepare": 0.1, "method": 1.25, "eval": None}
    old = {"method": "rtn", "bits": "W4A8", "task": "sst2", "seed": 0, "cost": {"method_s": 0.75}, "timing": None}
    lines = phase_table([new, old]).splitlines()
    header = "method bits task seed prepare s reference s method s eval s latency s sharpness s cell s peak MiB"
    header += " busy elsewhere"
    assert lines[0].split() == header.split()
    cells = ["zsaq", "W2A8", "sst2", "0", "12.0", "1.5", "40.2", "9.5", "–", "11.0", "61.0", "2048.5", "1.2"]
    assert lines[2].split() == cells  # the busiest phase's others_cores (1.25, shown to one decimal)
    assert lines[3].split()[4:7] == ["–", "–", "0.8"] and lines[3].split()[-1] == "–"  # an old row: what it has


def test_busy_elsewhere_is_the_machines_busy_time_minus_our_own_per_second(monkeypatch, tmp_path):
    ticks = iter([(100.0, 10.0, 0.0), (103.0, 11.0, 2.0)])  # machine busy s, own CPU s, wall s: start, end
    state = {}

    def advance():
        state["busy"], state["own"], state["wall"] = next(ticks)

    advance()
    busy_seconds = memory._busy_seconds
    monkeypatch.setattr(memory, "_busy_seconds", lambda: state["busy"])
    monkeypatch.setattr(memory, "_own_seconds", lambda: state["own"])
    monkeypatch.setattr(memory.time, "perf_counter", lambda: state["wall"])
    with memory.busy_elsewhere() as load:
        advance()
    assert load == {"others_cores": 1.0}  # (3 - 1) CPU s over 2 s: one other core busy throughout
    ticks = iter([(100.0, 10.0, 0.0), (100.03, 10.0, 0.01)])  # 3 ticks in 10 ms: too short to tell
    advance()
    with memory.busy_elsewhere() as load:
        advance()
    assert load == {"others_cores": None}

    stat = tmp_path / "stat"  # user nice system idle iowait irq softirq steal guest guest_nice, in clock ticks
    stat.write_text("cpu  400 100 200 5000 300 10 20 30 999 999\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    monkeypatch.setattr(memory, "_PROC_STAT", str(stat))
    hz = memory.os.sysconf("SC_CLK_TCK")
    assert busy_seconds() == pytest.approx((400 + 100 + 200 + 10 + 20 + 30) / hz)  # idle, iowait, guests out
    monkeypatch.setattr(memory, "_PROC_STAT", str(tmp_path / "absent"))
    assert busy_seconds() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, /proc/self/status")
def test_a_phase_starts_from_the_memory_in_use_not_what_the_allocator_kept():
    """Freed small blocks stay in the C heap (the pinned top keeps it from shrinking by itself): released, RSS drops,
    so the next phase's peak is its own."""
    blocks = [torch.ones(8 * 1024) for _ in range(6000)]  # 32 KB each: heap, not mmap; ~190 MB
    pin = torch.ones(8 * 1024)  # allocated last: the heap's top stays in use
    del blocks
    kept = _rss_mb()
    memory.release_freed_memory()
    assert kept - _rss_mb() > 100, (kept, _rss_mb())
    assert pin.sum() > 0
