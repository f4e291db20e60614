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
    with pytest.raises(BenchError, match=r"results.jsonl:2 is not JSON.*damaged.*--skip-damaged"):
        store.rows()


def test_damaged_first_line_is_not_called_a_torn_write(tmp_path, caplog):
    """A broken first line with rows after it (an editor, a disk, another tool): only the last line of an
    append-only file can be torn, so this is damage, reported with file:line, not an empty table."""
    store = ResultStore(tmp_path)
    store.path.write_text('{"key": "a", "status": "o\n' + json.dumps(_row("b")) + "\n" + json.dumps(_row("c")) + "\n")
    with pytest.raises(BenchError, match=r"results.jsonl:1 is not JSON, and it is not a torn last line"):
        store.rows()
    skipping = ResultStore(tmp_path, skip_damaged=True)
    assert skipping.done_keys() == {"b", "c"}
    assert "results.jsonl:1 is not JSON; skipped (--skip-damaged)" in caplog.text


def test_a_torn_line_sealed_by_a_later_run_stays_a_warning(tmp_path, caplog):
    store = ResultStore(tmp_path)
    store.append(_row("a"))
    with open(store.path, "ab") as fh:
        fh.write(json.dumps(_row("b")).encode()[:15])  # killed mid-write
    store.append(_row("c"))  # the next run seals it and records that it did
    store.append(_row("d"))
    assert store.done_keys() == {"a", "c", "d"}
    assert "results.jsonl:2 is a torn write" in caplog.text


def test_disk_full_at_append_keeps_written_rows_and_says_so(tmp_path, monkeypatch):
    import errno
    import os

    store = ResultStore(tmp_path)
    store.append(_row("a"))
    before = store.path.read_bytes()

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(BenchError, match=r"No space left on device; the rows already written are intact"):
        store.append(_row("b"))
    monkeypatch.undo()
    assert store.path.read_bytes() == before and store.done_keys() == {"a"}


def test_json_lines_that_are_not_result_rows_are_an_error(tmp_path):
    """Some other tool's JSONL in a run dir: one clear line, not a KeyError from deep inside resume."""
    store = ResultStore(tmp_path)
    store.append(_row("a"))
    with open(store.path, "a") as fh:
        fh.write('{"a": 1}\n')
    with pytest.raises(BenchError, match=r"results.jsonl:2 is not a result row \(needs key, status\)"):
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
