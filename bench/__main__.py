"""``python -m bench`` is the ``bench`` command (for environments where the console script is not on PATH)."""

import sys

from bench.cli import main

sys.exit(main())
