"""The one logging setup, for the ``bench`` command and for its worker processes alike."""

from __future__ import annotations

import logging
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
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
