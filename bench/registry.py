"""Name -> object maps filled by the register_* hooks, with provenance and "did you mean" errors."""

from dataclasses import dataclass, field
from typing import Any

from bench.errors import DuplicateNameError, unknown


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

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}

    def add(self, name: str, obj: Any, provider: Provider, *, aliases=(), **meta) -> None:
        name = str(name).lower()
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
