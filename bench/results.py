"""The append-only result store: one JSON line per finished cell in ``<run>/results.jsonl``.

A line is written with a single ``write`` on an O_APPEND descriptor and fsynced, so a crash leaves
either the whole row or a torn last line, which ``rows`` detects and ignores with a warning. Rows are
never rewritten: a re-run of a cell appends, and the newest row for a key is the one that counts.

Only the last line of an append-only file can be torn. When a later run appends after a torn line, it
first seals it with a newline and a seal record (``{"_sealed_torn_line": N}``), so the torn line stays
recognizable in the middle of the file. Any other unreadable line before further rows means the file was
damaged (an editor, a disk, another tool): reading stops with the file and line and what to do, unless the
store was opened with ``skip_damaged`` (``--skip-damaged``), which skips such lines with a warning.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.errors import BenchError

log = logging.getLogger(__name__)

RESULTS_ROOT = Path("results")  # where run dirs go by default: results/<name or timestamp>
RESULTS = "results.jsonl"
RUN_META = "run.json"
LOCK = ".lock"


ROW_FIELDS = frozenset({"key", "status"})  # what resume cannot do without
SEAL = "_sealed_torn_line"  # the record an append writes after sealing a torn line (its line number)


class ResultStore:
    def __init__(self, run_dir: str | os.PathLike, *, skip_damaged: bool = False):
        self.dir = Path(run_dir)
        self.path = self.dir / RESULTS
        self.skip_damaged = skip_damaged

    @classmethod
    def open_existing(cls, run_dir: str | os.PathLike, *, skip_damaged: bool = False) -> ResultStore:
        """A store for a run dir that must already hold a quantbench run."""
        store = cls(run_dir, skip_damaged=skip_damaged)
        if not store.dir.is_dir():
            raise BenchError(f"run dir '{run_dir}' does not exist")
        if not (store.path.exists() or (store.dir / RUN_META).exists()):
            raise BenchError(f"'{run_dir}' is not a quantbench run dir (no {RESULTS} or {RUN_META})")
        return store

    # ------------------------------------------------------------------ writing
    def append(self, row: dict) -> None:
        """Append one row durably. An ``OSError`` (disk full, run dir unwritable) becomes a ``BenchError``
        that says the rows already written are intact: a failed write can only tear this last line."""
        data = (json.dumps(row, sort_keys=True, default=str) + "\n").encode()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size and not self._ends_with_newline():
                    # seal a torn line left by a killed run, and say so, so this row stays whole and the torn
                    # line is never mistaken for damage
                    torn_line = self.path.read_bytes().count(b"\n") + 1
                    data = b"\n" + json.dumps({SEAL: torn_line}).encode() + b"\n" + data
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise BenchError(
                f"could not write a result row to {self.path}: {exc.strerror or exc}; the rows already written "
                "are intact, and re-running the same command resumes after you free space or fix permissions"
            ) from exc

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def write_meta(self, meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{RUN_META}.tmp"
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.dir / RUN_META)

    def meta(self) -> dict:
        path = self.dir / RUN_META
        return json.loads(path.read_text()) if path.exists() else {}

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the run dir: a second ``bench run`` on it fails with a clear message."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.dir / LOCK, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise BenchError(f"run dir '{self.dir}' is in use by another bench run (pid {holder})") from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    # ------------------------------------------------------------------ reading
    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().split(b"\n")
        sealed = {record[SEAL] for record in map(_json_or_none, lines) if isinstance(record, dict) and SEAL in record}
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = _json_or_none(line)
            if isinstance(row, dict) and SEAL in row:
                continue
            last = all(not rest.strip() for rest in lines[number:])
            if row is None and (last or number in sealed):
                log.warning("%s:%d is a torn write from an interrupted run; ignored", self.path, number)
                continue
            if row is None or not isinstance(row, dict) or not ROW_FIELDS <= row.keys():
                what = "is not JSON" if row is None else f"is not a result row (needs {', '.join(sorted(ROW_FIELDS))})"
                self._damaged(number, what)
                continue
            rows.append(row)
        return rows

    def _damaged(self, number: int, what: str) -> None:
        """A bad line that is not a torn tail: the file was damaged. Stop, unless told to skip such lines."""
        where = f"{self.path}:{number}"
        if self.skip_damaged:
            log.warning("%s %s; skipped (--skip-damaged)", where, what)
            return
        raise BenchError(
            f"{where} {what}, and it is not a torn last line: the file was damaged. Restore it, delete that line, "
            "or pass --skip-damaged to ignore damaged lines"
        )

    def latest(self) -> dict[str, dict]:
        """The newest row of every cell key."""
        out: dict[str, dict] = {}
        for row in self.rows():
            out[row["key"]] = row
        return out

    def done_keys(self) -> set[str]:
        return {key for key, row in self.latest().items() if row.get("status") == "ok"}


def latest_run_dir(root: Path = RESULTS_ROOT) -> Path:
    """The run dir under ``root`` whose results were written last."""
    runs = [p for p in root.glob("*") if (p / RESULTS).exists()] if root.is_dir() else []
    if not runs:
        raise BenchError(f"no run dir given and none found under {root}/; pass RUN_DIR")
    return max(runs, key=lambda p: (p / RESULTS).stat().st_mtime)


def _json_or_none(line: bytes):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
