"""The grid: what the user asked for (``GridRequest``) -> validated ``Cell``s. Nothing is loaded or written here.

``plan`` checks every name and setting before any cell runs -- methods, tasks, ``--set`` and ``--sweep`` values
(typed, and range-checked by each plugin's settings class), bit-widths, seeds, the evaluation cap -- so a bad value
is one ``BenchError`` line and exit 2 with nothing written, never a grid of failed cells. It resolves the model
first, so the defaults of its kind (task, weight granularity) follow what the model is, whatever name it was given
by. A sweep (``--sweep zsaq.steps=60,240``) is a ``--set`` per cell: each value its own config, key and variant.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from bench import models
from bench.api import FLOAT_BITS, QuantSpec, apply_overrides, hash_exempt
from bench.errors import BenchError, PluginError, unknown
from bench.hashing import digest
from bench.plugins import Plugins

log = logging.getLogger(__name__)

TASK_SCOPE = "task"  # --set task.FIELD=V: every task of the run that has FIELD


@dataclass(frozen=True)
class Cell:
    """One (method, bit-width, task, model, seed) point of the grid."""

    method: str
    method_config: dict = field(hash=False, compare=False)
    spec: QuantSpec | None  # None for the FP32 reference
    task: str
    model: str
    seed: int
    recipe: dict = field(hash=False, compare=False)
    limit: int | None = None
    variant: str = field(default="", compare=False)  # non-default method settings, for the leaderboard
    data_dir: str | None = None
    hash_exempt: frozenset[str] = field(default=frozenset(), compare=False)  # bench.api.added_setting at default

    @property
    def config_hash(self) -> str:
        return digest({k: v for k, v in self.method_config.items() if k not in self.hash_exempt})

    @property
    def bits_label(self) -> str:
        return self.spec.label() if self.spec else FLOAT_BITS

    @property
    def key(self) -> str:
        """The resume key: every input that changes the result, in a readable form."""
        grid = "fp" if self.spec is None else self.spec.key()
        return (
            f"{self.method}|cfg={self.config_hash}|{grid}|{self.task}|{self.model}|seed={self.seed}"
            f"|ft={digest(self.recipe)}|limit={self.limit}" + (f"|data={self.data_dir}" if self.data_dir else "")
        )


BITS = range(2, 9)  # weight and activation bit-widths every method's grid supports
# the papers' conventions for a model kind: groups of 128 for decoders, per-channel weights for BERT-style encoders
KIND_GRANULARITY = {"decoder": "per-group"}
DEFAULT_GRANULARITY = "per-channel"


@dataclass
class GridRequest:
    """What the user asked for, before validation. ``None`` means: the default, decided by ``plan`` once the model
    is resolved and its kind known (methods: the baseline method; tasks and granularity: by the model's kind)."""

    methods: list[str] | None = None
    bits: list[int] = field(default_factory=lambda: [4, 8])
    tasks: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    model: str = models.DEFAULT_MODEL
    act_bits: int | str | None = "auto"  # "auto": the methods' paper setting (Method.default_act_bits)
    granularity: str | None = None
    group_size: int = 128
    symmetric: bool = True
    narrow: bool = False  # the 2^b - 1 level symmetric grid, only when asked for
    embeddings: bool = False
    settings: dict[str, dict[str, str]] = field(default_factory=dict)  # scope -> field -> raw value
    # method -> field -> raw values: each value is its own cell config (a --set for that cell), several fields of
    # one method their product; the baseline and reference cells are not multiplied
    sweeps: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    limit: int | None = None
    reference: bool = True  # add the reference method's cell (FP32) per task and seed
    baseline: bool = True  # add the baseline method's cell (RTN, default settings) at every grid
    data_dir: str | None = None


def role_method(plugins: Plugins, role: str) -> str | None:
    """The one registered method whose class declares ``role`` ("reference" / "baseline"), or None."""
    names = [e.name for e in plugins.methods.entries() if getattr(e.obj, "role", None) == role]
    if len(names) > 1:
        raise PluginError(f"several methods claim the {role} role: {', '.join(names)}; exactly one may")
    return names[0] if names else None


def plan(request: GridRequest, plugins: Plugins) -> tuple[list[Cell], models.ResolvedModel]:
    """Validate every name and setting and expand the grid; nothing is loaded or written here.

    The model is resolved first, so that the defaults of its kind (task, weight granularity) follow what the model
    is, whatever name it was given by (an alias, a hub id, a local directory)."""
    _check_numbers(request)
    methods = [plugins.methods.entry(m).name for m in request.methods or _default_methods(plugins)]
    resolved = models.resolve(request.model)
    if request.tasks is None or request.granularity is None:
        resolved = models.with_kind(resolved)
    tasks = expand_groups(plugins, request.tasks or [default_task(plugins, resolved)])
    granularity = request.granularity or KIND_GRANULARITY.get(resolved.kind, DEFAULT_GRANULARITY)
    scopes = set(methods) | set(tasks) | {TASK_SCOPE}
    for scope in request.settings:
        if scope not in scopes:
            raise unknown("--set scope", scope, scopes)
    points = _sweep_points(request, methods, plugins)
    configs: dict[str, list[tuple[dict, str, frozenset]]] = {}  # method -> (config, variant, hash_exempt) per point
    for m in methods:
        settings_cls = plugins.methods.get(m).Config
        configs[m] = []
        for point in points.get(m, [{}]):
            settings = configured(m, settings_cls, request.settings.get(m, {}), point)
            config = dataclasses.asdict(settings)
            configs[m].append((config, _variant(settings_cls(), config), hash_exempt(settings)))
    _check_shared_task_settings([plugins.tasks.get(t) for t in tasks], request.settings)
    recipes = {t: dataclasses.asdict(_task_recipe(plugins.tasks.get(t), t, request.settings)) for t in tasks}
    act_bits = _act_bits(request.act_bits, [plugins.methods.get(m) for m in methods])
    reference = role_method(plugins, "reference")
    baseline = role_method(plugins, "baseline") if request.baseline else None
    specs = [
        QuantSpec(
            b,
            act_bits,
            granularity,
            request.group_size,
            request.symmetric,
            request.embeddings,
            narrow=request.narrow,
        )
        for b in request.bits
    ]
    cells = []
    for task in tasks:
        for seed in request.seeds:
            common = dict(
                task=task,
                model=resolved.name,
                seed=seed,
                recipe=recipes[task],
                limit=request.limit,
                data_dir=request.data_dir,
            )
            if request.reference and reference and reference not in methods:
                cells.append(Cell(reference, {}, None, **common))
            for method in methods:
                for config, variant, exempt in configs[method]:
                    grids = [None] if method == reference else specs
                    cells.extend(
                        Cell(method, config, spec, **common, variant=variant, hash_exempt=exempt) for spec in grids
                    )
            if baseline and any(v or m != baseline for m in methods if m != reference for _, v, _ in configs[m]):
                default = plugins.methods.get(baseline).Config()
                extra = [
                    Cell(baseline, dataclasses.asdict(default), spec, **common, hash_exempt=hash_exempt(default))
                    for spec in specs
                ]
                cells.extend(c for c in extra if c.key not in {k.key for k in cells})
    return cells, resolved


def _sweep_points(request: GridRequest, methods: list[str], plugins: Plugins) -> dict[str, list[dict[str, str]]]:
    """method -> the overrides of each of its sweep cells (the product of its swept fields' values). Every value
    is converted and checked by the method's ``Config`` here, one at a time, so a bad one is named before any cell
    runs; a sweep of a method not in the run, of an unknown field or of a field also ``--set`` is refused."""
    swept: dict[str, dict[str, list[str]]] = {}
    for scope, fields in request.sweeps.items():
        method = plugins.methods.entry(scope).name  # an unknown method: did-you-mean
        for name, values in fields.items():
            if method not in methods:
                raise BenchError(
                    f"--sweep {scope}.{name}: '{method}' is not a method of this run ({', '.join(methods)}); "
                    "add it to the methods"
                )
            if name in swept.get(method, {}):
                raise BenchError(f"--sweep {method}.{name}: swept twice; give all its values in one sweep")
            swept.setdefault(method, {})[name] = list(values)
    points = {}
    for method, fields in swept.items():
        settings_cls = plugins.methods.get(method).Config
        known = {f.name for f in dataclasses.fields(settings_cls)}
        settings = request.settings.get(method, {})
        for name, values in fields.items():
            if name not in known:
                raise unknown(f"setting of '{method}'", name, known)
            if name in settings:
                raise BenchError(
                    f"{method}.{name} is both swept (--sweep) and set (--set); put every value in the sweep"
                )
            if not values:
                raise BenchError(f"--sweep {method}.{name}: no values")
            seen: list = []
            for raw in values:
                value = getattr(configured(method, settings_cls, settings, {name: raw}), name)
                if value in seen:
                    raise BenchError(f"--sweep {method}.{name}={','.join(values)}: '{raw}' is listed twice")
                seen.append(value)
        points[method] = [dict(zip(fields, combo, strict=True)) for combo in itertools.product(*fields.values())]
    return points


def _check_numbers(request: GridRequest) -> None:
    """The numbers of a request that no plugin decides: bit-widths, the evaluation cap, duplicates."""
    for option, values in (("--bits", request.bits), ("--seeds", request.seeds)):
        if len(set(values)) != len(values):
            raise BenchError(f"{option} {list(values)}: a value is listed twice")
    for b in [*request.bits, *([request.act_bits] if isinstance(request.act_bits, int) else [])]:
        if b not in BITS:
            raise BenchError(f"bits: {b} is out of range; choose from {min(BITS)}..{max(BITS)}")
    if not request.bits or not request.seeds:
        raise BenchError("a grid needs at least one bit-width and one seed")
    if request.limit is not None and request.limit < 1:
        raise BenchError(f"--limit {request.limit}: must be a positive number of examples")


def _default_methods(plugins: Plugins) -> list[str]:
    """No methods asked for: the baseline (plain rounding), the one quantized row every table has."""
    baseline = role_method(plugins, "baseline")
    if baseline is None:
        raise BenchError("no methods given and no installed method is the baseline; pass methods")
    return [baseline]


def default_task(plugins: Plugins, model: models.ResolvedModel) -> str:
    """No tasks asked for: the one installed task that declares itself the default of the model's kind
    (``Task.default_for_kinds``)."""
    claims = [e for e in plugins.tasks.entries() if e.obj is not None and model.kind in e.obj.default_for_kinds]
    if not claims:
        raise BenchError(
            f"no installed task is the default for model '{model.name}' (kind {model.kind}); name its tasks"
        )
    if len(claims) > 1:
        raise PluginError(
            f"several tasks claim to be the default for {model.kind} models: "
            + ", ".join(f"{e.name} ({e.provider})" for e in claims)
            + "; name the tasks, or uninstall one of them"
        )
    return claims[0].name


def _act_bits(requested: int | str | None, method_classes: list) -> int | None:
    """The grid's one activation bit-width: as asked, or for "auto" the highest paper setting among the
    methods (ZSAQ's WxA8 makes every cell of its grid A8, RTN included, so the comparison stays fair)."""
    if requested != "auto":
        return requested
    wanted = {cls.default_act_bits for cls in method_classes} - {None}
    if wanted:
        log.info(
            "activations: A%d for every cell (the papers' setting of %s); --act-bits 32 keeps them float",
            max(wanted),
            ", ".join(c.__name__ for c in method_classes if c.default_act_bits),
        )
    return max(wanted, default=None)


def expand_groups(plugins: Plugins, names: list[str]) -> list[str]:
    """Task names with groups (registered with ``members=(...)``, e.g. ``glue``) expanded, duplicates dropped."""
    out: list[str] = []
    for name in names:
        entry = plugins.tasks.entry(name)
        for member in entry.meta.get("members") or (entry.name,):
            canonical = plugins.tasks.entry(member).name
            if canonical not in out:
                out.append(canonical)
    return out


def _variant(default_config, config: dict) -> str:
    """'clip=mse' for the settings that differ from the method's defaults ('' when none do); a whole float as the
    user would type it ('first_token_weight=64', not '64.0')."""
    defaults = dataclasses.asdict(default_config)
    shown = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in config.items()}
    return ",".join(f"{k}={shown[k]}" for k, v in config.items() if defaults.get(k) != v)


def configured(owner: str, settings_cls: type, *overrides: dict[str, str]) -> Any:
    """``settings_cls()`` (a method's ``Config``, a task's ``Recipe``) with ``overrides`` applied in order, each value
    converted to its field's declared type. A settings class may refuse a value in its ``__post_init__`` with
    ``ValueError("FIELD=VALUE: why")``: that is a user error naming the plugin, raised here, before any cell runs."""
    try:
        config = settings_cls()
        for values in overrides:
            config = apply_overrides(owner, config, values)
    except ValueError as exc:
        raise BenchError(f"settings of '{owner}': {exc}") from None
    return config


def _task_recipe(task_cls, name: str, settings: dict[str, dict[str, str]]):
    """The task's recipe with ``--set task.F=V`` (where the task has F) then ``--set NAME.F=V`` applied."""
    fields = {f.name for f in dataclasses.fields(task_cls.Recipe)}
    shared = {k: v for k, v in settings.get(TASK_SCOPE, {}).items() if k in fields}
    return configured(name, task_cls.Recipe, shared, settings.get(name, {}))


def _check_shared_task_settings(tasks: list, settings: dict[str, dict[str, str]]) -> None:
    known = {f.name for t in tasks for f in dataclasses.fields(t.Recipe)}
    for field_name in settings.get(TASK_SCOPE, {}):
        if field_name not in known:
            raise unknown("setting of 'task'", field_name, known)


def group_cells(cells: list[Cell]) -> list[list[Cell]]:
    """Cells grouped by (task, seed, fine-tune recipe): each group shares one FP model, prepared once."""
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[(cell.task, cell.seed, digest(cell.recipe))].append(cell)
    return list(groups.values())
