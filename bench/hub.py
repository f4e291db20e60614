"""Where models and data come from: the Hugging Face hub by default, package-shipped twins offline."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench.errors import BenchError

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")


def offline() -> bool:
    """True when the user (or the Makefile on a hub-less machine) switched the hub off."""
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it (some ship heavy __init__s)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def dist_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def cache_root() -> Path:
    """Root of quantbench's own cache (fine-tuned FP models); ``QUANTBENCH_CACHE`` overrides it."""
    root = os.environ.get("QUANTBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "quantbench"
    )
    return Path(root)


def hub_or_offline(what: str, hub_label: str, from_hub: Callable[[], T], offline_twin: Callable[[], T] | None) -> T:
    """The hub copy unless the hub is off; the offline twin when the hub is off or fails (with a warning).

    Never silent: the caller's result records which source it came from.
    """
    if not offline():
        try:
            return from_hub()
        except Exception as exc:  # unreachable hub, missing dataset, auth: all mean "use the twin"
            if offline_twin is None:
                raise BenchError(f"cannot load {what} from the hub ({hub_label}): {exc}") from exc
            warnings.warn(f"{what}: hub unavailable ({type(exc).__name__}); using the offline twin", stacklevel=2)
    if offline_twin is None:
        raise BenchError(f"{what} has no offline source; it needs the hub ({hub_label})")
    return offline_twin()
