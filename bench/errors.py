"""User-facing errors: the CLI prints these as one line and exits 2, never a traceback."""

import difflib
from collections.abc import Iterable


class BenchError(Exception):
    """A problem with what the user asked for (bad name, bad value, bad run dir)."""


class UnknownNameError(BenchError):
    pass


class DuplicateNameError(BenchError):
    pass


class PluginError(BenchError):
    pass


class MalformedPluginError(PluginError):
    """A plugin registered something that is not what its kind must be (a method that is no Method class)."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, value: str, choices: Iterable[str]) -> UnknownNameError:
    choices = sorted(choices)
    return UnknownNameError(
        f"unknown {kind} '{value}'{did_you_mean(value, choices)}; choose from: {', '.join(choices) or '(none)'}"
    )
