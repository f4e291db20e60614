"""Executors: the Ray executor and the local process pool give the local executor's rows, a dead worker or an
out-of-memory cell is one failed row and the grid goes on, and executor flags fail as one-line errors."""

import json
import logging
import sys

import pytest
import torch
from tiny import installed_plugin

from bench import executors, provenance
from bench.cli import main

# a recipe no other test module uses, so the first run here really fine-tunes (in a Ray task for the Ray run)
TINY = [
    "--model",
    "bert-tiny",
    "--set",
    "sst2.max_train_examples=96",
    "--limit",
    "48",
    "--no-sharpness",
    "--no-latency",
]
GRID = ["run", "--methods", "rtn,gptq", "--bits", "4,8", "--set", "gptq.n_samples=8", *TINY]
# fields that legitimately differ between executors (when and where a row was made, whether the FP model
# came from the cache, the command line, the torch thread count of the worker)
VOLATILE = {"started", "finished", "wall_time_s", "finetune", "command", "host", "timing", "peak_rss_mb"}


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def _stable(rows):
    """Rows without their clock readings (the method's passes and steps must match exactly; its seconds cannot)."""
    stable = {r["key"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}
    for row in stable.values():
        row["cost"] = {k: v for k, v in (row["cost"] or {}).items() if k != "method_s"}
    return stable


def test_ray_and_process_pool_rows_match_local(tmp_path):
    pytest.importorskip("ray")
    assert main([*GRID, "--executor", "ray", "--jobs", "2", "--out", str(tmp_path / "ray")]) == 0
    assert main([*GRID, "--out", str(tmp_path / "local")]) == 0
    assert main([*GRID, "--jobs", "2", "--out", str(tmp_path / "pool")]) == 0
    ray_rows, local_rows, pool_rows = (_rows(tmp_path / d) for d in ("ray", "local", "pool"))
    assert len(local_rows) == 5  # FP32 + 2 methods x 2 bit-widths
    for rows in (ray_rows, pool_rows):
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)) == 5  # each cell exactly once
        assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
        assert _stable(rows) == _stable(local_rows)  # same keys, same scores, metrics, sizes: exactly
        assert {r["command"] for r in rows} == {provenance.command_line()}  # the driver's command, not a worker's
    # the Ray run fine-tuned once (a prepare task), then every cell loaded that model from the cache
    assert all(r["finetune"]["cached"] for r in ray_rows)
    assert len({r["finetune"]["cache_dir"] for r in ray_rows + local_rows}) == 1


def test_ray_worker_crash_is_a_failed_row_and_the_grid_goes_on(tmp_path, crash_plugin):
    """A method that kills its Ray worker (a segfault, the OOM killer) costs its cell; the rest of the grid runs."""
    pytest.importorskip("ray")
    out = tmp_path / "run"
    argv = ["run", "--methods", "crash", "--bits", "4", *TINY, "--executor", "ray", "--jobs", "2", "--out", str(out)]
    assert main(argv) == 1
    rows = {r["method"]: r for r in _rows(out)}
    assert rows["fp32"]["status"] == "ok" and rows["rtn"]["status"] == "ok"
    assert rows["crash"]["status"] == "failed" and rows["crash"]["error"].startswith("WorkerCrashedError")


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError()]
)
def test_out_of_memory_cell_is_a_failed_row_and_the_grid_goes_on(tmp_path, monkeypatch, caplog, error):
    from bench.methods.rtn import RTN

    quantize = RTN.quantize

    def oom_at_4_bits(self, model, spec, context):
        if spec.w_bits == 4:
            raise error
        return quantize(self, model, spec, context)

    monkeypatch.setattr(RTN, "quantize", oom_at_4_bits)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="bench"):
        assert main(["run", "--methods", "rtn", "--bits", "4,8", *TINY, "--out", str(out)]) == 1
    rows = {r["bits"]: r for r in _rows(out)}
    assert rows["W4A32"]["status"] == "failed"
    assert rows["W4A32"]["error"].startswith(f"out of memory: {type(error).__name__}")
    assert rows["W8A32"]["status"] == "ok" and rows["FP32"]["status"] == "ok"  # the grid went on
    tracebacks = [r for r in caplog.records if r.levelno == logging.ERROR and "Traceback" in r.getMessage()]
    assert tracebacks and "oom_at_4_bits" in tracebacks[0].getMessage()


def test_other_failures_log_their_traceback_with_v(tmp_path, monkeypatch, caplog):
    from bench.methods.rtn import RTN

    def explode(self, model, spec, context):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(RTN, "quantize", explode)
    with caplog.at_level(logging.INFO, logger="bench"):
        main(["-v", "run", "--methods", "rtn", "--bits", "4", *TINY, "--out", str(tmp_path / "run")])
    assert any(r.levelno == logging.INFO and "in explode" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--executor", "rya"], "unknown --executor 'rya' (did you mean 'ray'?); choose from: local, ray"),
        (["--jobs", "0"], "--jobs 0: must be a positive number of parallel cells"),
        (["--ray-address", "auto"], "--ray-address needs --executor ray"),
        (["--executor", "ray", "--ray-cpus-per-cell", "0"], "--ray-cpus-per-cell 0.0: must be positive"),
        (["--executor", "ray", "--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1: nothing answers at"),
    ],
)
def test_bad_executor_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    if "ray" in flags:
        pytest.importorskip("ray")
    assert main(["run", *TINY, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bench: error: {message}") and "\n" not in err
    assert not out.exists()


def test_ray_missing_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    out = tmp_path / "run"
    assert main(["run", *TINY, "--executor", "ray", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"bench: error: {executors.RAY_MISSING}"
    assert not out.exists()


CRASH_PLUGIN = """
    import os

    from bench import hookimpl
    from bench.api import Method
    from bench.quant import freeze, quantize_model


    class Crash(Method):
        description = "kills its worker process at 4 bits (a segfault, the OOM killer), quantizes otherwise"

        def quantize(self, model, spec, context):
            if spec.w_bits == 4:
                os._exit(1)
            return freeze(quantize_model(model, spec, keep_fp=context.keep_fp))


    @hookimpl
    def register_methods(register):
        register("crash", Crash)
"""


@pytest.fixture
def crash_plugin(tmp_path, monkeypatch):
    """The crash plugin as a real installed distribution, so that worker processes -- spawned by the pool or
    started by Ray -- load it from its entry point like any plugin."""
    installed_plugin(tmp_path, monkeypatch, "crashplug", CRASH_PLUGIN)
    from bench import plugins

    monkeypatch.setattr(plugins, "default", plugins.load)


def test_pool_worker_killed_fails_only_its_cell(tmp_path, crash_plugin):
    """--jobs 2: a worker dying mid-cell costs that cell only; the other cells (queued after it too) finish."""
    out = tmp_path / "run"
    argv = ["run", "--methods", "crash", "--bits", "4,8", *TINY, "--jobs", "2", "--no-sharpness", "--out", str(out)]
    assert main(argv) == 1
    rows = {(r["method"], r["bits"]): r for r in _rows(out)}
    assert rows[("crash", "W4A32")]["status"] == "failed"
    assert "BrokenProcessPool" in rows[("crash", "W4A32")]["error"]
    ok = [k for k, r in rows.items() if r["status"] == "ok"]
    assert sorted(ok) == [("crash", "W8A32"), ("fp32", "FP32"), ("rtn", "W4A32"), ("rtn", "W8A32")]


def test_the_groups_last_cell_takes_the_fp_model_and_the_others_copy_it(monkeypatch):
    """Memory: no cell's phases hold the group's FP model beside their own copy once no cell needs it any more."""
    from bench.cell import CellRunner, Prepared

    fp_model = torch.nn.Linear(2, 2)
    prepared = Prepared(task=None, recipe=None, data=None, fp_model=fp_model, tokenizer=None, finetune=None)
    seen = []

    def run_cell(self, cell, prep, *, handover=False):
        seen.append((cell, handover, prep.fp_model is fp_model))
        if handover:
            prep.fp_model = None
        return {}

    monkeypatch.setattr(CellRunner, "prepare", lambda self, cell: prepared)
    monkeypatch.setattr(CellRunner, "run_cell", run_cell)
    runner = CellRunner.__new__(CellRunner)
    assert [cell for cell, _ in runner.run_group(["a", "b", "c"])] == ["a", "b", "c"]
    assert seen == [("a", False, True), ("b", False, True), ("c", True, True)]


def test_the_reference_cell_borrows_the_fp_model_and_leaves_it_as_it_was(tmp_path, monkeypatch):
    """Memory: the FP32 cell measures the group's FP model itself, not a copy, and the cells after it see that
    model bit for bit as a run without the reference does (its sharpness perturbed the weights in place)."""
    import copy
    import types

    from bench import cell

    copies = []

    def counted(obj, *args):
        copies.append(type(obj).__name__)
        return copy.deepcopy(obj, *args)

    monkeypatch.setattr(cell, "copy", types.SimpleNamespace(deepcopy=counted))
    measured = [a for a in TINY if a != "--no-sharpness"]
    grid = ["run", "--methods", "rtn", "--bits", "4,8", *measured]
    assert main([*grid, "--out", str(tmp_path / "with")]) == 0
    assert copies == ["BertForSequenceClassification"]  # fp32 borrows, the middle cell copies, the last takes it
    assert main([*grid, "--no-reference", "--out", str(tmp_path / "without")]) == 0

    def measures(run_dir):
        return {r["bits"]: (r["score"], r["sharpness"]["value"]) for r in _rows(run_dir) if r["method"] == "rtn"}

    assert measures(tmp_path / "with") == measures(tmp_path / "without")
    assert {r["method"] for r in _rows(tmp_path / "with")} == {"fp32", "rtn"}
