"""Where models and data come from: the Hugging Face hub by default, package-shipped twins offline."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
from pathlib import Path

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
