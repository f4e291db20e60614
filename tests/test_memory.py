"""Per-phase wall time and peak RSS: each phase's peak is its own (the high-water mark is reset), so a light
phase after a heavy one does not inherit the heavy one's peak."""

import sys

import pytest
import torch

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
    assert phases.as_timing() == {**phases.seconds, "peak_rss_mb": phases.peak_mb, "rss_scope": "phase"}


def test_peak_is_at_least_the_current_rss():
    reset_peak_rss()
    with open("/proc/self/status") if sys.platform.startswith("linux") else open(__file__) as status:
        current = [int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:")]
    if current:
        assert peak_rss_mb() >= current[0] - 1


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
    new["timing"] = {"prepare_s": 12.0, "method_s": 40.25, "eval_s": 9.5, "sharpness_s": 11.0, "peak_rss_mb": {}}
    old = {"method": "rtn", "bits": "W4A8", "task": "sst2", "seed": 0, "cost": {"method_s": 0.75}, "timing": None}
    lines = phase_table([new, old]).splitlines()
    header = "method bits task seed prepare s method s eval s latency s sharpness s cell s peak MiB"
    assert lines[0].split() == header.split()
    assert lines[2].split() == ["zsaq", "W2A8", "sst2", "0", "12.0", "40.2", "9.5", "–", "11.0", "61.0", "2048.5"]
    assert lines[3].split()[4:6] == ["–", "0.8"]  # an old row: the method's seconds from its cost
