"""Latency statistics on a fake clock with known durations, against numpy's percentiles."""

import numpy as np
import pytest
import torch
from torch import nn

from bench.api import QuantSpec
from bench.metrics.latency import latency_of_model, measure, model_latency, percentile, token_inputs
from bench.quant.layers import freeze, quantize_model


class _FakeTime:
    """A clock that only moves when the measured function runs: call i takes durations[i] seconds."""

    def __init__(self, durations, read_cost=0.0):
        self.now = 0.0
        self.read_cost = read_cost  # seconds each clock read itself takes (a real clock's overhead)
        self.durations = list(durations)
        self.calls = 0
        self.reads = 0
        self.threads_seen = []

    def clock(self):
        self.reads += 1
        self.now += self.read_cost
        return self.now - self.read_cost

    def fn(self):
        self.threads_seen.append(torch.get_num_threads())
        self.now += self.durations[self.calls]
        self.calls += 1


def test_measure_reports_numpy_percentiles_of_the_timed_calls_only():
    warm = [5.0, 2.0, 1.0]  # seconds: the first calls are slow and must not be counted
    estimate = [0.010]  # torch's Timer times one call to size its blocks: >= 1 ms, so blocks of one call
    timed = [0.010, 0.012, 0.011, 0.030, 0.009, 0.010, 0.050, 0.013, 0.011, 0.010, 0.012]
    fake = _FakeTime(warm + estimate + timed + [1.0] * 5)
    stats = measure(fake.fn, warmup=3, min_run_time=sum(timed) - 0.001, clock=fake.clock)
    ms = np.array(timed) * 1000
    for q in (50, 90, 99):
        assert stats[f"p{q}"] == pytest.approx(np.percentile(ms, q), rel=1e-9)
    assert stats["mean"] == pytest.approx(ms.mean(), rel=1e-9)
    q75, q25 = np.percentile(ms, [75, 25])
    assert stats["iqr"] == pytest.approx(q75 - q25, rel=1e-6)
    assert stats["n"] == len(timed) and stats["block"] == 1 and stats["warmup"] == 3
    assert fake.calls == 3 + 1 + len(timed)  # it stops once min_run_time of timed calls is reached
    assert stats["timer"] == "torch.utils.benchmark.blocked_autorange"


def test_fast_calls_are_timed_in_blocks_and_reported_per_call():
    fake = _FakeTime([0.0001] * 100_000, read_cost=1e-6)  # 0.1 ms a call, 1 us a clock read
    stats = measure(fake.fn, warmup=1, min_run_time=0.05, clock=fake.clock)
    assert stats["block"] == 100 and stats["n"] % 100 == 0  # the clock's overhead is 1e-4 of a block
    assert stats["p50"] == pytest.approx(0.1, rel=1e-3) and stats["p99"] == pytest.approx(0.1, rel=1e-3)


@pytest.mark.parametrize("n", [1, 2, 5, 20, 101])
def test_percentile_matches_numpy_linear(n):
    values = np.random.default_rng(n).exponential(size=n).tolist()
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-15)


def test_first_call_is_never_timed():
    with pytest.raises(ValueError, match="warmup"):
        measure(lambda: None, warmup=0)
    with pytest.raises(ValueError, match="min_run_time"):
        measure(lambda: None, min_run_time=0)
    fake = _FakeTime([100.0, 0.001, 0.001])
    stats = measure(fake.fn, warmup=1, min_run_time=0.001, clock=fake.clock)
    assert stats["p99"] == pytest.approx(1.0)


def test_threads_are_pinned_recorded_and_restored():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    fake = _FakeTime([0.001] * 10)
    stats = measure(fake.fn, warmup=1, min_run_time=0.003, threads=target, clock=fake.clock)
    assert stats["threads"] == target and set(fake.threads_seen) == {target}  # the warm-up too
    assert torch.get_num_threads() == before
    assert measure(lambda: None, warmup=1, min_run_time=0.001)["threads"] == before


class _Probe(nn.Module):
    """A model that records how it was called."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 64)
        self.seen = []

    def forward(self, input_ids, attention_mask):
        self.seen.append((torch.is_inference_mode_enabled(), self.training, tuple(input_ids.shape)))
        return self.body(nn.functional.one_hot(input_ids, 64).float() * attention_mask[..., None])


def test_latency_of_model_runs_in_inference_mode_and_eval():
    model = _Probe().train()
    # the clock moves 2 ms per forward call (a clock moving on every read would look like pure timer overhead)
    stats = latency_of_model(
        model, token_inputs(5, 64), warmup=2, min_run_time=0.008, clock=lambda: len(model.seen) * 0.002
    )
    assert stats["p50"] == pytest.approx(2.0) and stats["n"] == 4
    assert model.seen == [(True, False, (1, 5))] * (2 + 1 + 4)  # warm-up, the timer's block sizing, timed
    assert model.training  # restored


def test_model_latency_names_the_kernel():
    torch.manual_seed(0)
    model = freeze(quantize_model(_Probe(), QuantSpec(4, granularity="per-group", group_size=32)))
    row = model_latency(model, token_inputs(3, 64), warmup=1, min_run_time=0.01)
    assert row["kernel"] == "int4pack" and row["kernels"] == {"int4pack": 1}
    assert set(row) >= {"p50", "p90", "p99", "mean", "iqr", "n", "block", "warmup", "threads", "min_run_s", "timer"}
    assert model_latency(_Probe(), token_inputs(3, 64), warmup=1, min_run_time=0.01)["kernel"] == "fp32"


def test_token_inputs_are_fixed_by_seed():
    a, b = token_inputs(7, 50, batch_size=2, seed=1), token_inputs(7, 50, batch_size=2, seed=1)
    assert a["input_ids"].shape == (2, 7) and torch.equal(a["input_ids"], b["input_ids"])
    assert int(a["input_ids"].max()) < 50 and torch.equal(a["attention_mask"], torch.ones(2, 7, dtype=torch.long))


def test_decode_step_reuses_the_prompt_cache_and_restores_it():
    from tiny import tiny_llama

    from bench.metrics.latency import latency_of_model, model_latency, token_inputs

    model, _ = tiny_llama()
    inputs = token_inputs(12, model.config.vocab_size)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    stats = latency_of_model(model, inputs, decode=True, warmup=2, min_run_time=0.005, clock=lambda: len(calls) * 0.001)
    assert stats["n"] == 5 and stats["p50"] == pytest.approx(1.0)  # 1 ms per step on the fake clock
    row = model_latency(model, inputs, warmup=1, min_run_time=0.01, decode=True)
    assert row["kernel"] == "fp32" and row["decode"]["n"] >= 1
    assert "decode" not in model_latency(model, inputs, warmup=1, min_run_time=0.01)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_a_busy_neighbour_is_seen_during_a_measurement():
    import subprocess
    import sys
    import time

    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        stats = measure(lambda: time.sleep(0.01), warmup=1, min_run_time=1.0)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert stats["others_cores"] >= 0.5  # one spinning process: about one core
