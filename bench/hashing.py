"""The one way quantbench names contents by hash: config hashes and resume keys, data fingerprints, fine-tune
cache keys (``digest``), and weight-file checksums (``file_digest``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def digest(obj, length: int = 12) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``obj`` as canonical JSON (sorted keys; values JSON cannot
    hold by their ``str``). Stable across runs and machines: resume keys and cache keys are built from it."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
