"""The one logging setup, for the ``bench`` command and for its worker processes alike."""

from __future__ import annotations

import logging
import os
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def level_of(verbosity: int) -> int:
    """``-v`` count -> log level: warnings only, ``-v`` progress (INFO), ``-vv`` debug."""
    return logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG


def setup(level: int, *, worker: bool = False) -> None:
    """quantbench's log at ``level`` on stderr; transformers' own warnings and progress bars off; FutureWarnings
    hidden unless progress is logged.

    The command configures the root logger (other libraries' warnings then read alike); a worker process (the
    process pool, Ray) gives the ``bench`` logger a handler of its own, once, and leaves the host's root alone:
    Ray forwards a worker's stderr to the driver's terminal.
    """
    bench_log = logging.getLogger("bench")
    if not worker:
        logging.basicConfig(level=level, format=FORMAT)
    elif not bench_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        bench_log.addHandler(handler)
        bench_log.propagate = False
    bench_log.setLevel(level)
    if level > logging.INFO:
        warnings.filterwarnings("ignore", category=FutureWarning)
    quiet_transformers()


def quiet_transformers() -> None:
    """transformers' own warnings and download bars off: bench logs what matters. Where transformers is not
    imported yet, through the environment it reads when it is (importing it here would add ~2 s to every
    command, ``bench list`` included); a value the user set stays."""
    if "transformers" in sys.modules:
        transformers = sys.modules["transformers"]
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:  # read its environment already: transformers' bars follow its switch
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
