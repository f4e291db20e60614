"""A grid killed with SIGKILL loses no finished cell, and the re-run completes only the rest."""

import json
import os
import signal
import subprocess
import sys
import time

ARGS = [
    "run",
    "--model",
    "bert-tiny",
    "--methods",
    "rtn",
    "--bits",
    "2,3,4,5,6,7,8",
    "--no-sharpness",
    "--no-latency",
    "--set",
    "sst2.max_train_examples=64",
    "--limit",
    "400",
]


def _ok_keys(path):
    lines = path.read_text().splitlines() if path.exists() else []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a torn last line is possible right after the kill
    return [r["key"] for r in rows if r["status"] == "ok"]


def test_sigkill_mid_grid_then_resume(tmp_path):
    out = tmp_path / "run"
    results = out / "results.jsonl"
    cmd = [sys.executable, "-m", "bench.cli", *ARGS, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 240
    while len(_ok_keys(results)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survived = _ok_keys(results)
    assert 3 <= len(survived) < 8, "the kill should land mid-grid"

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    keys = _ok_keys(results)
    assert len(keys) == len(set(keys)) == 8  # FP32 + 7 bit-widths, each exactly once
    assert keys[: len(survived)] == survived  # finished cells were kept, not redone
    assert f"{len(survived)} skipped (done)" in rerun.stderr
