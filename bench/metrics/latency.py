"""Latency on torch's own timer (``torch.utils.benchmark``), with warm-up and percentiles, on pinned threads.

The first call of anything pays one-time costs (allocator growth, kernel weight packing, lazy init),
so it is never timed: ``warmup`` (at least 1) untimed calls come first. Then ``Timer.blocked_autorange``
times the call for at least ``min_run_time`` seconds: it sizes a block of calls so that the clock's own
overhead is negligible (one call per block for anything slower than a millisecond, so a model's figures
are per call), times block after block with the garbage collector off (``timeit``), and pins the thread
count for the measurement. The per-call times are summarized as p50/p90/p99/mean in milliseconds;
percentiles interpolate linearly between order statistics (numpy's default), so few samples give a p99
close to the maximum. A time budget rather than a call count, as the field's timers do: a 300 ms prefill
and a 3 ms Linear get comparable confidence from one setting. The thread count is recorded because CPU
latency is meaningless without it; on a shared machine the figures are noisy, and p50 is the figure to
compare. So each measurement also records ``others_cores``: how many CPU cores other processes kept busy
while it timed (the machine's busy time from ``/proc/stat`` minus this process's own, per second), and the
leaderboard flags a figure taken with more than half a core of them: on 2 cores, one other busy
process can make a 50 ms forward read over a second. (Linux only, None elsewhere; a container whose
``/proc/stat`` shows the host's CPUs counts the host's other work too.)
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.benchmark.utils.common import set_torch_threads

from bench.metrics.memory import busy_elsewhere
from bench.quant.kernels import build_latency_model, kernel_label
from bench.training import eval_mode


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between sorted values (numpy's 'linear')."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_ms(durations_s: Sequence[float]) -> dict[str, float]:
    ms = [d * 1000 for d in durations_s]
    return {
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "mean": sum(ms) / len(ms),
    }


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    min_run_time: float = 1.0,
    threads: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float | int | str]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``Timer.blocked_autorange(min_run_time)``; milliseconds.

    Returns ``{others_cores, p50, p90, p99, mean, iqr, n, block, warmup, threads, min_run_s, timer}``: ``n``
    timed calls in blocks of ``block`` (per-call figures are block means when ``block`` > 1, i.e. for calls under
    a millisecond); ``others_cores``: see the module's docstring. ``threads`` (default: torch's current count) is
    pinned by the timer for the measurement and restored afterwards. ``clock`` (seconds) is injectable so tests
    can drive it with known durations.
    """
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the first call pays one-time costs and is never timed")
    if not min_run_time > 0:
        raise ValueError(f"min_run_time must be > 0 seconds, got {min_run_time!r}")
    pinned = torch.get_num_threads() if threads is None else int(threads)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, timer=clock, num_threads=pinned)
    with set_torch_threads(pinned):  # warm-up on the count it warms up for (kernels pack per thread count)
        for _ in range(warmup):
            fn()
    with busy_elsewhere() as load:
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return {
        **load,
        **summarize_ms(measurement.times),
        "iqr": measurement.iqr * 1000,
        "n": len(measurement.times) * measurement.number_per_run,
        "block": measurement.number_per_run,
        "warmup": warmup,
        "threads": pinned,
        "min_run_s": min_run_time,
        "timer": "torch.utils.benchmark.blocked_autorange",
    }


def latency_of_model(
    model: nn.Module, inputs: dict[str, torch.Tensor], *, decode: bool = False, **timing: Any
) -> dict[str, float | int | str]:
    """``measure`` (``timing``: its keywords) of ``model(**inputs)`` in eval mode under ``torch.inference_mode``
    (no autograd cost); with ``decode``, of one generated token after the prompt ``inputs`` on the prompt's KV
    cache (decode step latency), cropped back to the prompt after every step so each timed call does the same
    work."""
    with eval_mode(model):
        return measure(_decode_step(model, inputs) if decode else _forward(model, inputs), **timing)


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    def forward():
        with torch.inference_mode():
            model(**inputs)

    return forward


def _decode_step(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    prompt_len = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model(**inputs, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
    next_ids = inputs["input_ids"][:, -1:]
    mask = torch.ones(next_ids.shape[0], prompt_len + 1, dtype=torch.long)
    # transformers 5 renamed past_key_values to cache; 4.x only knows the old name
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step():
        with torch.inference_mode():
            model(input_ids=next_ids, attention_mask=mask, use_cache=True, **{cache_arg: cache})
        cache.crop(-1)  # drop the generated token again (a negative crop removes tokens in 4.x and 5.x)

    return step


def model_latency(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    inplace: bool = False,
    decode: bool = False,
    **timing: Any,
) -> dict[str, Any]:
    """A result row's ``latency``: the model on real kernels where torch has them, and which kernel ran.

    Builds the latency model (a deep copy unless ``inplace``: in place saves the copy's memory but leaves
    ``model`` on bfloat16 kernels, fit only for timing), times ``model(**inputs)`` (``timing``: ``measure``'s
    keywords) and returns
    ``measure``'s statistics plus ``kernel`` and ``kernels`` with ``kernel`` the model-level label
    ("fp32", "simulated", "int8pack", "int4pack", ...) and ``kernels`` the layer count per kernel. With
    ``decode`` (decoders) the forward of the prompt is the prefill and ``decode`` holds the same statistics
    for one generated token on the prompt's KV cache.
    """
    fast, kernels = build_latency_model(model, inplace=inplace)
    stats = latency_of_model(fast, inputs, **timing)
    out = {**stats, "kernel": kernel_label(kernels), "kernels": kernels}
    if decode:
        out["decode"] = latency_of_model(fast, inputs, decode=True, **timing)
    return out


def token_inputs(
    n_tokens: int, vocab_size: int, *, batch_size: int = 1, seed: int = 0, dtype: torch.dtype = torch.long
) -> dict[str, torch.Tensor]:
    """Fixed random ``input_ids`` and an all-ones ``attention_mask``: latency depends on shapes, not text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, n_tokens), generator=g, dtype=dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
