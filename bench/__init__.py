"""quantbench: compare quantization methods for pre-trained language models on equal terms.

Plugins import ``hookimpl`` from here; everything else is reached through ``bench.plugins``.
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("quantbench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

hookimpl = pluggy.HookimplMarker("bench")

__all__ = ["hookimpl", "__version__"]
