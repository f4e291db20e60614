"""The result store: whole rows or nothing, torn tails ignored, corruption reported, one writer at a time."""

import json

import pytest

from bench.errors import BenchError
from bench.results import ResultStore


def _row(key, status="ok", score=0.5):
    return {"key": key, "status": status, "score": score}


def test_append_and_latest(tmp_path):
    store = ResultStore(tmp_path / "run")
    store.append(_row("a", "failed", None))
    store.append(_row("b"))
    store.append(_row("a", "ok", 0.9))
    assert [r["key"] for r in store.rows()] == ["a", "b", "a"]
    assert store.latest()["a"]["score"] == 0.9
    assert store.done_keys() == {"a", "b"}


def test_torn_last_line_is_ignored_with_a_warning(tmp_path, caplog):
    store = ResultStore(tmp_path)
    store.append(_row("a"))
    with open(store.path, "ab") as fh:
        fh.write(json.dumps(_row("b")).encode()[:15])  # killed mid-write
    assert store.done_keys() == {"a"}
    assert "torn write" in caplog.text
    # the next append seals the torn line: the new row stays whole and readable
    store.append(_row("c"))
    assert store.done_keys() == {"a", "c"}


def test_corrupt_middle_line_is_an_error(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_row("a"))
    with open(store.path, "a") as fh:
        fh.write("this is not json\n")
    store.append(_row("b"))
    with pytest.raises(BenchError, match=r"line 2 is corrupt"):
        store.rows()


def test_json_lines_that_are_not_result_rows_are_an_error(tmp_path):
    """Some other tool's JSONL in a run dir: one clear line, not a KeyError from deep inside resume."""
    store = ResultStore(tmp_path)
    store.append(_row("a"))
    with open(store.path, "a") as fh:
        fh.write('{"a": 1}\n')
    with pytest.raises(BenchError, match=r"line 2 is not a quantbench result row \(needs key, status\)"):
        store.rows()


def test_open_existing_rejects_non_run_dirs(tmp_path):
    with pytest.raises(BenchError, match="not a quantbench run dir"):
        ResultStore.open_existing(tmp_path)
    with pytest.raises(BenchError, match="does not exist"):
        ResultStore.open_existing(tmp_path / "missing")


def test_second_writer_is_refused(tmp_path):
    store = ResultStore(tmp_path)
    with store.lock():
        with pytest.raises(BenchError, match=r"in use by another bench run \(pid \d+\)"):
            with ResultStore(tmp_path).lock():
                pass
    with ResultStore(tmp_path).lock():  # released afterwards
        pass


def test_meta_roundtrip(tmp_path):
    store = ResultStore(tmp_path)
    store.write_meta({"planned": ["a", "b"]})
    assert store.meta() == {"planned": ["a", "b"]}
