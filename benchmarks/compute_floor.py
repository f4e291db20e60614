"""The least time a `bench run` grid can take on this machine: its matrix multiplications' FLOPs, phase by phase,
over the fastest rate this CPU multiplies FP32 matrices.

    HF_HUB_OFFLINE=1 python benchmarks/compute_floor.py [--threads 2] [--scale 10] [--measured RUN_DIR]
                                                        [--flops FILE]

Why: a target such as "the design card's command, cold, in 5 minutes at unchanged budgets" is only reachable if
the work those budgets fix fits in 5 minutes at all. No implementation does a budget's matrix products faster
than the machine's best GEMM rate, so FLOPs / that rate is a floor under every phase; the gap between the
floor and a measured run is what kernels and code could still win.

How:
- The GEMM rate: FP32 ``torch.mm`` on a few shapes (MiniLM's and square ones), ``--threads`` threads, p50 of
  ``bench.metrics.latency.measure`` (the timer every latency figure uses); the best shape's rate is used, so
  the floor is generous.
- The FLOPs: the grid (the design card's, ``bench run --methods zsaq,prequant --bits 2,4``, cold: a fresh
  fine-tune cache) runs twice in this process at 1/scale and 1/(2 scale) of its budgets (fine-tune and
  PreQuant examples, ZSAQ steps), with ``torch.utils.flop_counter.FlopCounterMode`` around every phase of
  every cell. A budget-bound phase (the fine-tune, the method) does a + b * budget; the two runs give a and b,
  and the full budget its FLOPs. Only matrix products, convolutions and attention are counted (elementwise
  work is left out), and evaluation, latency and sharpness not at all (the counting runs skip them: under the
  counter they take as long as the rest together), so the floor stays a floor: the real run also evaluates
  and measures every cell. The fine-tune and PreQuant draw different examples at the two budgets and their
  lengths vary, so those two lines are close estimates rather than strict bounds.
- ``--measured RUN_DIR`` puts a real run's per-phase seconds (from its rows) beside the floors.
- ``--flops FILE`` keeps the counted FLOPs (minutes of work, the same on a busy machine) in FILE and reads them
  from there when it exists, so the GEMM rate (seconds, which needs a quiet machine) can be taken apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from bench.methods.zsaq import ZeroShotConfig
from bench.tasks.glue import GlueRecipe
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

from bench import cli
from bench.metrics import memory
from bench.metrics.latency import measure
from bench.metrics.memory import PHASES

GRID = ["--methods", "zsaq,prequant", "--bits", "2,4"]  # the design card's command
SHAPES = ((512, 384, 1536), (512, 1536, 384), (2048, 384, 384), (1024, 1024, 1024), (2048, 2048, 2048))


def gemm_rate(threads: int) -> tuple[float, list[list], float | None]:
    """The best FP32 GEMM rate (FLOP/s) over ``SHAPES``, a table of every shape's, and the most cores other
    processes kept busy while one was timed (``measure``'s ``others_cores``)."""
    table, best, busy = [], 0.0, None
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        stats = measure(lambda a=a, b=b: torch.mm(a, b), min_run_time=1.0, threads=threads)
        rate = 2 * m * k * n / (stats["p50"] / 1e3)
        best = max(best, rate)
        if stats["others_cores"] is not None:
            busy = max(busy or 0.0, stats["others_cores"])
        table.append([f"{m} x {k} @ {k} x {n}", f"{stats['p50']:.2f}", f"{rate / 1e9:.1f}"])
    return best, table, busy


@contextlib.contextmanager
def counted_phases():
    """Every ``Phases`` phase also counts its FLOPs; rows carry them as ``timing["flops"][phase]``."""
    phases = memory.Phases
    call, copy, as_timing = phases.__call__, phases.copy, phases.as_timing

    @contextlib.contextmanager
    def counting_call(self, name):
        counter = FlopCounterMode(display=False)
        with call(self, name), counter:
            yield
        self.__dict__.setdefault("flops", {})[name] = counter.get_total_flops()

    def counting_copy(self):
        other = copy(self)
        other.flops = dict(self.__dict__.get("flops", {}))
        return other

    def timing_with_flops(self):
        return {**as_timing(self), "flops": dict(self.__dict__.get("flops", {}))}

    phases.__call__, phases.copy, phases.as_timing = counting_call, counting_copy, timing_with_flops
    try:
        yield
    finally:
        phases.__call__, phases.copy, phases.as_timing = call, copy, as_timing


def count_flops(examples: int, steps: int, workdir: Path) -> dict[str, dict[str, float]]:
    """{cell label: {phase: FLOPs}} of the grid at these budgets, cold (its own fine-tune cache); evaluation on a
    few examples only, no latency or sharpness."""
    out = workdir / f"run-{examples}-{steps}"
    os.environ["QUANTBENCH_CACHE"] = str(workdir / f"cache-{examples}")
    budget = ["--set", f"sst2.max_train_examples={examples}", "--set", f"zsaq.steps={steps}"]
    with counted_phases():
        code = cli.main(["run", *GRID, *budget, "--no-sharpness", "--no-latency", "--limit", "32", "--out", str(out)])
    if code:
        raise SystemExit(f"bench run exited {code}")
    return {label_of(row): row["timing"]["flops"] for row in rows_of(out)}


def rows_of(run_dir: Path) -> list[dict]:
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("status") == "ok"]


def label_of(row: dict) -> str:
    return f"{row['method']} {row['bits']}"  # not the leaderboard's label: the budget sets make variants of it


def full_budget_flops(small: dict, half: dict, scale: float) -> dict[str, dict[str, float]]:
    """Each cell's FLOPs of the budget-bound phases (prepare, method) at the full budgets, extrapolated from the
    runs at 1/scale and 1/(2 scale) of them (a + b * budget)."""
    full = defaultdict(dict)
    for label, phases in small.items():
        for phase in ("prepare", "method"):
            slope = (phases[phase] - half[label][phase]) * 2 * scale  # b: per full budget
            full[label][phase] = max(phases[phase] - slope / scale, 0.0) + slope
    return full


def measured_seconds(run_dir: Path | None) -> dict[str, dict[str, float]]:
    if run_dir is None:
        return {}
    return {label_of(r): {p: r["timing"].get(f"{p}_s") for p in PHASES} for r in rows_of(run_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=10.0, help="the first run's budgets are 1/scale of the real")
    parser.add_argument("--measured", type=Path, help="a run dir of the same grid at full budgets, to compare")
    parser.add_argument("--flops", type=Path, help="JSON file: read the counted FLOPs from it, or count and write")
    args = parser.parse_args(argv)

    examples, steps = GlueRecipe().max_train_examples, ZeroShotConfig().steps
    if args.flops and args.flops.exists():
        counted = json.loads(args.flops.read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            small = count_flops(round(examples / args.scale), round(steps / args.scale), Path(tmp))
            half = count_flops(round(examples / args.scale / 2), round(steps / args.scale / 2), Path(tmp))
        counted = {"scale": args.scale, "small": small, "half": half}
        if args.flops:
            args.flops.write_text(json.dumps(counted, indent=1))
    full = full_budget_flops(counted["small"], counted["half"], counted["scale"])

    rate, shapes, busy = gemm_rate(args.threads)
    print(tabulate(shapes, headers=["FP32 GEMM", "p50 ms", "GFLOP/s"], tablefmt="github"))
    print(f"\nbest rate: {rate / 1e9:.1f} GFLOP/s on {args.threads} threads", end="")
    print(f" (other processes kept up to {busy:.2f} cores busy meanwhile)\n" if busy is not None else "\n")
    measured = measured_seconds(args.measured)

    table, total_floor, total_measured = [], 0.0, 0.0
    for label, phases in full.items():
        for phase in PHASES:
            flops = phases.get(phase)
            # the fine-tune runs once per seed group: the FP32 cell's prepare is it, the other cells reuse the model
            if not flops or (phase == "prepare" and not label.startswith("fp32")):
                continue
            floor = flops / rate
            seconds = measured.get(label, {}).get(phase)
            total_floor += floor
            total_measured += seconds or 0.0
            share = f"{floor / seconds:.0%}" if seconds else ""
            table.append([label, phase, f"{flops / 1e9:,.0f}", f"{floor:.1f}", seconds or "", share])
    headers = ["cell", "phase", "GFLOP", "floor s", "measured s", "floor / measured"]
    print(tabulate(table, headers=headers, tablefmt="github"))
    counted_at = f"counted at 1/{counted['scale']:g} and 1/{2 * counted['scale']:g}"
    print(f"\nbudgets: {examples} fine-tune and PreQuant examples, {steps} ZSAQ steps ({counted_at})")
    print(f"floor of the fine-tune and the methods: {total_floor:.0f} s ({total_floor / 60:.1f} min)", end="")
    print(f"; measured: {total_measured:.0f} s" if measured else "")
    print("(evaluation, latency and sharpness of every cell come on top: not counted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
