"""The append-only result store: one JSON line per finished cell in ``<run>/results.jsonl``.

A line is written with a single ``write`` on an O_APPEND descriptor and fsynced, so a crash leaves
either the whole row or a torn last line, which ``read`` detects and ignores with a warning. Rows are
never rewritten: a re-run of a cell appends, and the newest row for a key is the one that counts.
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

RESULTS = "results.jsonl"
RUN_META = "run.json"
LOCK = ".lock"


ROW_FIELDS = frozenset({"key", "status"})  # what resume cannot do without


class ResultStore:
    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        self.path = self.dir / RESULTS

    @classmethod
    def open_existing(cls, run_dir: str | os.PathLike) -> ResultStore:
        """A store for a run dir that must already hold a quantbench run."""
        store = cls(run_dir)
        if not store.dir.is_dir():
            raise BenchError(f"run dir '{run_dir}' does not exist")
        if not (store.path.exists() or (store.dir / RUN_META).exists()):
            raise BenchError(f"'{run_dir}' is not a quantbench run dir (no {RESULTS} or {RUN_META})")
        return store

    # ------------------------------------------------------------------ writing
    def append(self, row: dict) -> None:
        data = (json.dumps(row, sort_keys=True, default=str) + "\n").encode()
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size and not self._ends_with_newline():
                data = b"\n" + data  # seal a torn line left by a killed run, so this row stays whole
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

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
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn = number == len(lines) or all(not rest.strip() for rest in lines[number:])
                if torn or self._is_sealed_tear(lines, number):
                    log.warning("%s line %d is a torn write from an interrupted run; ignored", self.path, number)
                    continue
                raise BenchError(f"{self.path} line {number} is corrupt (not JSON); fix or remove it") from None
            if not isinstance(row, dict) or not ROW_FIELDS <= row.keys():
                raise BenchError(
                    f"{self.path} line {number} is not a quantbench result row (needs {', '.join(sorted(ROW_FIELDS))})"
                )
            rows.append(row)
        return rows

    @staticmethod
    def _is_sealed_tear(lines: list[bytes], number: int) -> bool:
        """A torn line that a later ``append`` sealed with a newline: a JSON prefix cut short."""
        return lines[number - 1].lstrip().startswith(b"{") and not lines[number - 1].rstrip().endswith(b"}")

    def latest(self) -> dict[str, dict]:
        """The newest row of every cell key."""
        out: dict[str, dict] = {}
        for row in self.rows():
            out[row["key"]] = row
        return out

    def done_keys(self) -> set[str]:
        return {key for key, row in self.latest().items() if row.get("status") == "ok"}
