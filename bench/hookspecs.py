"""The hooks a quantbench plugin may implement (project name and entry-point group: "bench").

Each hook receives a ``register`` callable and calls it once per thing it provides. quantbench
records which plugin (distribution and version) registered every name, so results can say which
plugin made them and clashes can name both sides.
"""

import pluggy

hookspec = pluggy.HookspecMarker("bench")


@hookspec
def register_methods(register):
    """Register quantization methods: ``register(name, factory, *, aliases=())``.

    ``factory`` is a ``bench.api.Method`` subclass: called with its ``Config`` instance, it returns an
    object whose ``quantize(model, spec, context)`` returns the quantized model.
    """


@hookspec
def register_tasks(register):
    """Register evaluation tasks: ``register(name, factory, *, aliases=())``.

    ``factory()`` returns a ``bench.api.Task``. A group of tasks is ``register(name, None, members=(...))``:
    ``--tasks glue`` then runs every member.
    """


@hookspec
def register_metrics(register):
    """Register metrics: ``register(name, fn, *, higher_is_better)``; ``fn(predictions, references)``."""


@hookspec
def register_reporters(register):
    """Register leaderboard formats: ``register(format_name, render_fn)``.

    ``render_fn(board, path)`` writes the leaderboard (a ``bench.leaderboard.Leaderboard``) to ``path``
    and returns the text to print, or None for binary formats.
    """
