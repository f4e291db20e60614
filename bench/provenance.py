"""Who and what produced a result: versions, git commit, host. Computed once per process."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import bench


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """Commit of the quantbench source tree (with '-dirty' for uncommitted changes), None if not a checkout."""
    root = Path(bench.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "quantbench": bench.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


@lru_cache(maxsize=1)
def host() -> dict[str, object]:
    import torch

    return {
        "node": platform.node(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def now() -> str:
    """The one timestamp format of rows and run files: UTC, ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def command_line() -> str:
    return " ".join(["bench", *sys.argv[1:]])
