"""Name -> object maps filled by the register_* hooks, with provenance and "did you mean" errors."""

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.errors import DuplicateNameError, MalformedPluginError, unknown

# check(obj, meta) -> what is wrong with a registration, or None when it is well-formed
Check = Callable[[Any, dict], "str | None"]


@dataclass(frozen=True)
class Provider:
    """The plugin that registered a name: entry-point name, distribution and its version."""

    plugin: str
    dist: str
    version: str

    def __str__(self) -> str:
        return f"{self.plugin} ({self.dist} {self.version})"


@dataclass
class Entry:
    name: str
    obj: Any
    provider: Provider
    aliases: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """One kind of registered thing (methods, tasks, metrics, reporters)."""

    def __init__(self, kind: str, check: Check | None = None):
        self.kind = kind
        self.check = check
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}

    def add(self, name: str, obj: Any, provider: Provider, *, aliases=(), **meta) -> None:
        name = str(name).lower()
        problem = self.check(obj, meta) if self.check else None
        if problem:
            raise MalformedPluginError(f"plugin {provider} registered {self.kind.rstrip('s')} '{name}' as {problem}")
        for key in (name, *aliases):
            owner = self._owner(key)
            if owner is not None:
                raise DuplicateNameError(
                    f"{self.kind.rstrip('s')} '{key}' is registered by two plugins: {owner.provider} and {provider}"
                )
        self._entries[name] = Entry(name, obj, provider, tuple(aliases), dict(meta))
        for alias in aliases:
            self._aliases[alias.lower()] = name

    def _owner(self, key: str) -> Entry | None:
        key = key.lower()
        if key in self._entries:
            return self._entries[key]
        if key in self._aliases:
            return self._entries[self._aliases[key]]
        return None

    def entry(self, name: str) -> Entry:
        found = self._owner(str(name))
        if found is None:
            raise unknown(self.kind.rstrip("s"), name, self.names())
        return found

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return self._owner(str(name)) is not None


# --------------------------------------------------------------------------- what each kind must be


def _subclass_of(base: type, data_used: tuple[str, ...] = ()) -> Check:
    def check(obj: Any, meta: dict) -> str | None:
        if obj is None and meta.get("members"):
            return None  # a group of other names (a task group such as GLUE)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            return f"{obj!r}, which is not a {base.__module__}.{base.__qualname__} subclass"
        config = getattr(obj, "Config", None)
        if config is not None and not dataclasses.is_dataclass(config):
            return f"{obj.__qualname__} whose Config {config!r} is not a dataclass (settings must be typed fields)"
        if data_used and getattr(obj, "data_used", None) not in data_used:
            return f"{obj.__qualname__} with data_used={obj.data_used!r}; choose from {', '.join(data_used)}"
        return None

    return check


def _callable(obj: Any, meta: dict) -> str | None:
    return None if callable(obj) else f"{obj!r}, which is not callable"


def _metric(obj: Any, meta: dict) -> str | None:
    if not callable(obj):
        return f"{obj!r}, which is not callable"
    if not isinstance(meta.get("higher_is_better"), bool):
        return f"{getattr(obj, '__name__', obj)!r} without higher_is_better=True/False (the table needs its direction)"
    if not isinstance(meta.get("percent", False), bool):
        return f"{getattr(obj, '__name__', obj)!r} with percent={meta['percent']!r} (True/False: a fraction shown x100)"
    return None


def checks() -> dict[str, Check]:
    """The type check of each kind of registration (lm-eval's Registry(base_cls=...) idea)."""
    from bench.api import DataUsed, Method, Task  # the API module defines what a method and a task are

    return {
        "methods": _subclass_of(Method, typing.get_args(DataUsed)),
        "tasks": _subclass_of(Task),
        "metrics": _metric,
        "reporters": _callable,
    }
