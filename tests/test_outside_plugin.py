"""An outside package, built and pip-installed, shows up and runs with no change to quantbench: its method, its
task (scored by its own metric) and its leaderboard format."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "bench-example-plugin"
VERSION = "0.3.0"
PROVIDER = f"example (bench-example-plugin {VERSION})"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    # pip builds a local directory in place (build/, *.egg-info): build a copy, so the fixture stays clean
    source = build / FIXTURE.name
    shutil.copytree(FIXTURE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        cwd=build,
        capture_output=True,
    )
    assert list(target.glob(f"bench_example_plugin-{VERSION}.dist-info"))
    return target


def _bench(site, *args, check=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "bench.cli", *args], env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_outside_method_is_listed(plugin_site):
    out = _bench(plugin_site, "list", "methods").stdout
    line = next(line for line in out.splitlines() if line.startswith("clipped-rtn"))
    assert PROVIDER in line and "ratio: float = 0.9" in _bench(plugin_site, "describe", "clipped-rtn").stdout
    infos = json.loads(_bench(plugin_site, "plugins", "--json").stdout)
    registered = {
        "methods": ["clipped-rtn"],
        "tasks": ["keyword-sentiment"],
        "metrics": ["balanced-accuracy"],
        "reporters": ["tsv"],
    }
    assert {"name": "example", "registered": registered}.items() <= {
        k: v for i in infos if i["name"] == "example" for k, v in i.items()
    }.items()


def test_outside_method_runs_in_a_grid(plugin_site, tmp_path):
    out = tmp_path / "run"
    proc = _bench(
        plugin_site,
        "run",
        "--methods",
        "clipped-rtn",
        "--bits",
        "4",
        "--model",
        "bert-tiny",
        "--set",
        "clipped-rtn.ratio=0.8",
        "--set",
        "sst2.max_train_examples=64",
        "--limit",
        "32",
        "--out",
        str(out),
    )
    assert "clipped-rtn" in proc.stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["method"] == "clipped-rtn")
    assert row["status"] == "ok" and row["method_config"] == {"ratio": 0.8}
    assert row["versions"]["method_plugin"] == PROVIDER


def _listed(site, kind: str, name: str) -> str:
    out = _bench(site, "list", kind).stdout
    return next(line for line in out.splitlines() if line.split() and line.split()[0] == name)


def test_outside_task_metric_and_reporter_are_listed(plugin_site):
    task = _listed(plugin_site, "tasks", "keyword-sentiment")
    details = _bench(plugin_site, "list", "tasks", "keyword-sentiment").stdout  # one line each; in full with NAME
    assert PROVIDER in task and "metrics: balanced-accuracy (higher is better; a fraction, shown x100)" in details
    assert "data: generated" in details and "lr: float = 0.001" in details
    metric = _listed(plugin_site, "metrics", "balanced-accuracy")
    assert PROVIDER in metric and "higher is better; a fraction, shown x100" in metric


@pytest.fixture(scope="module")
def task_run(plugin_site, tmp_path_factory):
    """One small grid on the outside task: the FP32 reference (fine-tuned on the generated data) and RTN W4."""
    out = tmp_path_factory.mktemp("task-run") / "run"
    args = ["--methods", "rtn", "--bits", "4", "--model", "bert-tiny", "--tasks", "keyword-sentiment"]
    _bench(plugin_site, "run", *args, "--limit", "64", "--no-sharpness", "--no-latency", "--out", str(out))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, rows


def test_outside_task_runs_scored_by_its_own_metric(task_run):
    _, rows = task_run
    assert sorted((r["method"], r["bits"]) for r in rows) == [("fp32", "FP32"), ("rtn", "W4A32")]
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert row["task"] == "keyword-sentiment" and row["task_kind"] == "classification"
        assert row["primary_metric"] == "balanced-accuracy"
        assert set(row["metrics"]) == {"accuracy", "balanced-accuracy"}
        assert row["score"] == row["metrics"]["balanced-accuracy"] and 0 <= row["score"] <= 1
        assert row["versions"]["task_plugin"] == PROVIDER
        assert row["data_source"] == "generated (bench-example-plugin, seed 0)" and row["limit"] == 64
    # No threshold on the reference's score: the example's 13-step fine-tune of bert-tiny is not stable across
    # machines and loads (balanced accuracy 0.83 in one fresh-clone CI run, 0.57 in the next); the test is about
    # the plugin path (its task, data, metric and provenance reach the rows), not about how well bert-tiny learns.


def test_outside_reporter_writes_the_leaderboard_as_tsv(plugin_site, task_run):
    out, rows = task_run
    proc = _bench(plugin_site, "leaderboard", str(out), "--format", "tsv")
    path = out / "leaderboard.tsv"
    assert proc.stdout.strip() == path.read_text().strip()
    table = list(csv.DictReader(path.read_text().splitlines(), delimiter="\t"))
    assert {"method", "W4A32 keyword-sentiment", "FP32 keyword-sentiment"} <= set(table[0])
    rtn = next(r for r in rows if r["method"] == "rtn")
    line = next(t for t in table if t["method"] == "rtn")
    assert float(line["W4A32 keyword-sentiment"]) == pytest.approx(100 * rtn["score"], abs=1e-4)  # percent: x100
