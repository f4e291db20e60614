"""The plugin manager: built-ins and outside packages both arrive through entry points (group "bench").

Entry points are loaded one at a time so that one broken plugin is named and skipped rather than
taking the whole tool down; ``BENCH_STRICT=1`` turns that into a fatal error (for CI of plugins).
"""

import importlib.metadata as md
import logging
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType

import pluggy

from bench import hookspecs
from bench.errors import DuplicateNameError, MalformedPluginError, PluginError
from bench.registry import Provider, Registry, checks

log = logging.getLogger(__name__)

GROUP = "bench"
KINDS = ("methods", "tasks", "metrics", "reporters")


@dataclass
class PluginInfo:
    name: str
    dist: str
    version: str
    module: str
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "dist": self.dist,
            "version": self.version,
            "module": self.module,
            "registered": self.registered,
            "error": self.error,
        }


@dataclass
class Plugins:
    """Everything the plugins registered, plus who registered it."""

    methods: Registry
    tasks: Registry
    metrics: Registry
    reporters: Registry
    infos: list[PluginInfo]

    def registry(self, kind: str) -> Registry:
        return getattr(self, kind)


def _strict() -> bool:
    return os.environ.get("BENCH_STRICT", "") not in ("", "0", "false", "no")


def _entry_points() -> list[md.EntryPoint]:
    # Deduplicate: an editable install plus a source tree on sys.path can list one entry point twice.
    seen, out = set(), []
    for ep in md.entry_points(group=GROUP):
        key = (ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            out.append(ep)
    return sorted(out, key=lambda ep: ep.name)


def _broken(info: PluginInfo, exc: BaseException, stage: str) -> None:
    info.error = f"{type(exc).__name__}: {exc}"
    message = f"plugin '{info.name}' ({info.dist} {info.version}) failed to {stage}: {info.error}"
    if _strict():
        raise PluginError(message + " [BENCH_STRICT=1]") from exc
    warnings.warn(message + "; skipped (set BENCH_STRICT=1 to make this fatal)", stacklevel=3)


def load(extra: list[tuple[str, ModuleType]] | None = None) -> Plugins:
    """Load every entry-point plugin (and ``extra`` in-process ones, for tests) and collect registrations."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    kind_checks = checks()
    plugins = Plugins(*(Registry(kind, kind_checks[kind]) for kind in KINDS), infos=[])
    candidates: list[tuple[PluginInfo, object]] = []
    for ep in _entry_points():
        dist = ep.dist.name if ep.dist else "?"
        ver = ep.dist.version if ep.dist else "?"
        info = PluginInfo(ep.name, dist, ver, ep.value)
        plugins.infos.append(info)
        try:
            candidates.append((info, ep.load()))
        except Exception as exc:  # a broken third-party import must not kill the tool
            _broken(info, exc, "import")
    for name, module in extra or []:
        info = PluginInfo(name, "(in-process)", "-", module.__name__)
        plugins.infos.append(info)
        candidates.append((info, module))

    for info, module in candidates:
        try:
            pm.register(module, name=info.name)
        except Exception as exc:
            _broken(info, exc, "register its hooks")
            continue
        provider = Provider(info.name, info.dist, info.version)
        for kind in KINDS:
            hook = getattr(pm.hook, f"register_{kind}")
            for impl in hook.get_hookimpls():
                if impl.plugin_name != info.name:
                    continue
                names: list[str] = []

                def register(name, obj, *, _kind=kind, _names=names, _provider=provider, **meta):
                    try:
                        plugins.registry(_kind).add(name, obj, _provider, **meta)
                    except MalformedPluginError as exc:  # skip this object; the plugin's other names still count
                        if _strict():
                            raise PluginError(f"{exc} [BENCH_STRICT=1]") from None
                        warnings.warn(f"{exc}; skipped (set BENCH_STRICT=1 to make this fatal)", stacklevel=2)
                        return
                    _names.append(str(name).lower())

                try:
                    impl.function(register=register)
                except (PluginError, DuplicateNameError):
                    raise  # a clash is always an error: it names both plugins
                except Exception as exc:
                    _broken(info, exc, f"register {kind}")
                if names:
                    info.registered[kind] = names
    log.debug("loaded %d plugins", len(plugins.infos))
    return plugins


@lru_cache(maxsize=1)
def default() -> Plugins:
    """The process-wide plugin set (entry points only), loaded once."""
    return load()
