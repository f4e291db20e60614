"""An outside package, built and pip-installed, shows up and runs with no change to quantbench."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "bench-example-plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
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
            str(FIXTURE),
        ],
        check=True,
        cwd=build,
        capture_output=True,
    )
    assert list(target.glob("bench_example_plugin-0.2.0.dist-info"))
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
    assert "example (bench-example-plugin 0.2.0)" in line and "ratio=0.9" in line
    infos = json.loads(_bench(plugin_site, "plugins", "--json").stdout)
    assert {"name": "example", "registered": {"methods": ["clipped-rtn"]}}.items() <= {
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
    assert row["versions"]["method_plugin"] == "example (bench-example-plugin 0.2.0)"
