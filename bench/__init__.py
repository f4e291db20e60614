"""quantbench: compare quantization methods for pre-trained language models on equal terms.

Plugins import ``hookimpl`` from here; everything else is reached through ``bench.plugins``. From Python (a
notebook, a script): ``bench.run(methods=..., bits=..., ...)`` runs a grid and returns its rows and leaderboard,
``bench.leaderboard(run_dirs)`` renders run dirs (README, "Python API").
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("quantbench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

hookimpl = pluggy.HookimplMarker("bench")

__all__ = ["hookimpl", "__version__", "run", "leaderboard"]


def __getattr__(name: str):
    """``run`` and ``leaderboard`` load on first use: a plugin importing ``hookimpl`` does not pay for torch."""
    if name == "run":
        return importlib.import_module("bench.runner").run
    if name == "leaderboard":
        return importlib.import_module("bench.leaderboard")  # a callable module: bench.leaderboard(run_dirs)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
