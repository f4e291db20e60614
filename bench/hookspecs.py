"""The hooks a quantbench plugin may implement (project name and entry-point group: "bench").

Each hook receives a ``register`` callable and calls it once per thing it provides. quantbench
records which plugin (distribution and version) registered every name, so results can say which
plugin made them and clashes can name both sides. Every ``register`` takes:

- ``name``: what users type (``--methods NAME``, ``--tasks NAME``, ``--format NAME``); case-insensitive;
- the object (below), type-checked on registration: a malformed one is named in a warning and skipped
  (``BENCH_STRICT=1``: an error), the plugin's other names still count;
- ``aliases=(...)``: other names for the same thing (``register("wikitext2", WikiText2, aliases=("wiki",))``).

Two plugins registering one name (or alias) is an error naming both. The core never names a plugin: what a
table needs to know about one (its role, its default model kind, its metric's direction and scale) is declared
by the plugin, through the keywords and class attributes documented here.
"""

import pluggy

hookspec = pluggy.HookspecMarker("bench")


@hookspec
def register_methods(register):
    """Register quantization methods: ``register(name, factory, *, aliases=())``.

    ``factory`` is a ``bench.api.Method`` subclass: called with its ``Config`` instance, it returns an
    object whose ``quantize(model, spec, context)`` returns the quantized model. What the grid reads from the
    class: ``data_used`` ("none", "calibration", "labeled"), ``Config`` (a dataclass of typed settings with
    defaults; ``--set NAME.FIELD=VALUE`` overrides them, and its ``__post_init__`` may refuse a value with
    ``ValueError("FIELD=VALUE: why")``, reported before any cell runs), ``default_act_bits``, and ``role``:
    "reference" (the unquantized model every table starts from) or "baseline" (the plain method every quantized
    cell is compared with at its grid); exactly one installed method may hold each role. The instance's ``name`` is
    the name it runs under (one class may be registered under several), for its messages and progress bars. A
    fresh instance quantizes each cell: keep what a cell learns in ``context.report`` (it goes into the row's
    ``method_info``), never on the instance or the class.
    """


@hookspec
def register_tasks(register):
    """Register evaluation tasks: ``register(name, factory, *, aliases=())``.

    ``factory()`` returns a ``bench.api.Task``. Its class declares ``kind``, ``metrics`` and ``primary_metric``
    (names of registered metrics: the primary one's registration decides how the leaderboard scales and ranks
    the task), ``Recipe`` (typed settings, ``--set NAME.FIELD=VALUE``) and ``default_for_kinds``: the model kinds
    ("encoder", "decoder") it is the default task of when a run names no tasks (at most one task per kind).

    A group of tasks is ``register(name, None, members=(...))``: ``--tasks NAME`` then runs every member.
    """


@hookspec
def register_metrics(register):
    """Register metrics: ``register(name, fn, *, higher_is_better, percent=False, aliases=())``.

    ``fn(predictions, references) -> float``. ``higher_is_better`` (required, True/False): which end of a task
    column the leaderboard marks best, and how its differences read. ``percent``: the value is a fraction shown
    x100 (GLUE's convention); tasks whose primary metric is a higher-is-better percent are averaged together.
    """


@hookspec
def register_reporters(register):
    """Register leaderboard formats: ``register(format_name, render_fn, *, aliases=())``.

    ``render_fn(board, path)`` writes the leaderboard (a ``bench.leaderboard.Leaderboard``) to ``path``
    and returns the text to print, or None for binary formats. ``board.best()`` gives the cells to mark and
    ``board.is_reference(index)`` the reference row, the same for every format.
    """
