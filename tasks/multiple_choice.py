"""Zero-shot multiple-choice tasks for decoders, scored by log-likelihood: ``sst2-zs``, ``hellaswag``, ``arc_easy``.

Perplexity alone says little about what quantization does to a decoder's choices; these tasks ask it to pick one
of several continuations of a context, as EleutherAI's lm-evaluation-harness does, with its conventions so the
numbers sit next to published ones:

- Each example is a context, a list of choices and the gold index. Choice ``c`` is scored as the continuation
  ``" " + c`` (the harness's target delimiter): the sum of the log-probabilities of its tokens given the context.
- Tokenization: the context and context + continuation are tokenized without special tokens (the harness's
  default for causal LMs; ``--set TASK.add_bos=true`` prepends the tokenizer's BOS, as its ``add_bos_token``).
  Trailing spaces of the context move to the continuation; the continuation's tokens are those of the whole
  text past the context's tokens. Sequences longer than ``max_length + 1`` tokens lose tokens on the left.
- ``mc_accuracy`` (the harness's ``acc``): the highest-scoring choice is the prediction.
  ``mc_accuracy_norm`` (``acc_norm``): the score divided by the choice's length in characters.
- Scoring is batched (right padding, attention mask; sequences sorted by length so batches pad little); scores
  do not depend on the batch size beyond float rounding. ``--limit N`` scores the first N examples.

The tasks:

- ``sst2-zs``: SST-2 as zero-shot sentiment, with the harness's GLUE prompt (``sst2``)::

      {sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:   ->  " negative" | " positive"

  Data: exactly what the ``sst2`` task loads (``tasks.glue``): ``--data-dir``, else the hub's
  ``nyu-mll/glue``/sst2 (validation), else its offline Rotten Tomatoes twin (validation split).
- ``hellaswag``: ``Rowan/hellaswag`` validation, hub only; the harness's preprocessing: context
  ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()``, the four endings, WikiHow's ``[title]`` and other
  bracketed artifacts removed.
- ``arc_easy``: ``allenai/ai2_arc`` ARC-Easy test split, hub only: ``Question: {question}\\nAnswer:`` ->
  ``" {choice}"``.

Hub-only tasks fail with a one-line error when the hub is off (``--data-dir`` is a GLUE layout; they ignore it).
PTQ methods calibrate on contexts of the training split (never the evaluated examples); the sharpness metric
measures the LM loss on context + gold continuation of seeded evaluation examples.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from bench.tasks.glue import SST2
from bench.tasks.lm import PerplexityTask
from torch.nn import functional as F
from tqdm.auto import tqdm

from bench import hookimpl, hub
from bench.api import Task, TaskData

Example = tuple[str, list[str], int]  # context, choices (without the delimiter), gold index
Request = tuple[list[int], list[int]]  # context token ids, continuation token ids


@dataclass
class MCRecipe:
    """Scoring and calibration settings (``--set hellaswag.batch_size=4``); nothing is fine-tuned."""

    batch_size: int = 8  # sequences per forward pass (a choice each)
    max_length: int = 2048  # tokens a scored sequence keeps, cut on the left (harness)
    add_bos: bool = False  # prepend the tokenizer's BOS token (harness: add_bos_token; Gemma needs it)
    calib_batch_size: int = 8
    # at most this many examples for the sharpness metrics (fwd+bwd each step): 64 HellaSwag examples are about
    # the tokens of the perplexity tasks' 8 windows of 512
    loss_examples: int = 64


# --------------------------------------------------------------------------- scoring


def encode_pair(tokenizer, context: str, continuation: str, *, add_bos: bool = False) -> Request:
    """Token ids of the context and of the continuation, split as the harness splits them.

    Tokenizing the whole text once (not the continuation alone) gives the continuation the tokens it really
    has after this context; trailing spaces of the context belong to the continuation (BPE joins them to the
    next word).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    prefix = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    if not prefix and not ctx:  # no context token to predict the first continuation token from (harness)
        prefix = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id]
    return prefix + ctx, whole[len(ctx) :]


def _pad_id(tokenizer) -> int:
    """Any id works for padding (it is masked out); the tokenizer's own when it has one."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and the ``attention_mask`` marking real tokens (decoder tokenizers often lack
    a pad token, so ``tokenizer.pad`` is not used)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _model_input(request: Request, max_length: int) -> tuple[list[int], int]:
    """The tokens fed to the model (the last one is only predicted, never fed) and how many are scored: the
    continuation's, or its last ``max_length`` when it alone is longer."""
    ctx, cont = request
    whole = (ctx + cont)[-(max_length + 1) :]
    return whole[:-1], min(len(cont), len(whole) - 1)


@torch.no_grad()
def score_requests(
    model, requests: Sequence[Request], *, batch_size: int, max_length: int, pad_id: int, device="cpu", desc=""
) -> list[float]:
    """Sum of log-probabilities of each request's continuation tokens given its context, in request order."""
    inputs = [_model_input(r, max_length) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i][0]))  # longest first: little padding
    scores = [0.0] * len(requests)
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        chunk = [i for i in order[start : start + batch_size] if inputs[i][1] > 0]  # no token: log-prob 0
        if not chunk:
            continue
        batch = pad_batch([inputs[i][0] for i in chunk], pad_id)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        for row, i in enumerate(chunk):
            fed, n_scored = inputs[i]
            targets = torch.tensor(requests[i][1][len(requests[i][1]) - n_scored :], device=logits.device)
            logp = F.log_softmax(logits[row, len(fed) - n_scored : len(fed)].float(), dim=-1)
            scores[i] = logp.gather(-1, targets[:, None]).sum().item()
    return scores


# --------------------------------------------------------------------------- metrics


def _choices(predictions, *, normalize: bool) -> np.ndarray:
    """Chosen index per example: first highest score (numpy's tie rule, as the harness)."""

    def pick(scored) -> int:
        ll = np.array([s for s, _ in scored], dtype=float)
        if normalize:  # a choice of zero characters counts as one, instead of dividing by zero
            ll = ll / np.array([max(n, 1) for _, n in scored], dtype=float)
        return int(np.argmax(ll))

    return np.array([pick(scored) for scored in predictions])


def mc_accuracy(predictions, references) -> float:
    """Fraction of examples whose highest log-likelihood choice is the gold one (the harness's ``acc``).

    ``predictions``: per example, a ``(log-likelihood, length in characters)`` pair per choice.
    """
    return float(np.mean(_choices(predictions, normalize=False) == np.asarray(references)))


def mc_accuracy_norm(predictions, references) -> float:
    """As ``mc_accuracy`` with each log-likelihood divided by its choice's length in characters (``acc_norm``):
    long choices are not penalized for having more tokens."""
    return float(np.mean(_choices(predictions, normalize=True) == np.asarray(references)))


# --------------------------------------------------------------------------- the task family


def columns(examples: Iterable[Example]) -> dict[str, list]:
    """Examples as the column dict a ``TaskData`` split holds (JSON-friendly, so it fingerprints)."""
    out: dict[str, list] = {"context": [], "choices": [], "label": []}
    for context, choices, label in examples:
        out["context"].append(context)
        out["choices"].append(list(choices))
        out["label"].append(int(label))
    return out


class MultipleChoiceTask(Task):
    """A zero-shot multiple-choice task: subclasses say where the data is and how a row becomes an example."""

    kind = "multiple-choice"
    metrics = ("mc_accuracy", "mc_accuracy_norm")
    primary_metric = "mc_accuracy"
    needs_finetune = False
    Recipe = MCRecipe
    target_delimiter: ClassVar[str] = " "
    hub_path: ClassVar[str] = ""
    hub_config: ClassVar[str | None] = None
    hub_splits: ClassVar[dict[str, str]] = {}  # ours -> the hub's; "train" feeds calibration
    eval_split: ClassVar[str] = "validation"

    load_model = PerplexityTask.load_model  # the same causal LM and tokenizer as the perplexity tasks

    @staticmethod
    def example(row: dict[str, Any]) -> Example:  # pragma: no cover - interface
        """One dataset row as (context, choices, gold index)."""
        raise NotImplementedError

    @property
    def hub_label(self) -> str:
        return "/".join(p for p in (self.hub_path, self.hub_config) if p)

    def load(self, data_dir: str | None = None) -> TaskData:
        """The hub's splits; no offline twin (a one-line error when the hub is off). ``data_dir`` (a GLUE layout)
        does not apply."""
        return hub.hub_or_offline(self.name, self.hub_label, self._from_hub, None)

    def _from_hub(self) -> TaskData:
        import datasets

        splits = {
            ours: columns(map(self.example, datasets.load_dataset(self.hub_path, self.hub_config, split=theirs)))
            for ours, theirs in self.hub_splits.items()
        }
        source = f"hub:{self.hub_label}/{self.hub_splits[self.eval_split]}"
        return TaskData(splits, source, eval_split=self.eval_split)

    def requests(self, tokenizer, split: dict, n: int, recipe: MCRecipe) -> list[Request]:
        """One (context, continuation) request per choice of the first ``n`` examples, example by example."""
        return [
            encode_pair(tokenizer, context, self.target_delimiter + choice, add_bos=recipe.add_bos)
            for context, choices in zip(split["context"][:n], split["choices"][:n], strict=True)
            for choice in choices
        ]

    def predict(self, model, tokenizer, data: TaskData, *, limit=None, device="cpu", recipe=None):
        """Per example, a (log-likelihood, length in characters) pair per choice; references are gold indices."""
        recipe = recipe or MCRecipe()
        split = data.splits[data.eval_split]
        n = len(split["label"]) if not limit else min(limit, len(split["label"]))
        scores = iter(
            score_requests(
                model,
                self.requests(tokenizer, split, n, recipe),
                batch_size=recipe.batch_size,
                max_length=recipe.max_length,
                pad_id=_pad_id(tokenizer),
                device=device,
                desc=f"eval {self.name}",
            )
        )
        predictions = [[(next(scores), len(choice)) for choice in choices] for choices in split["choices"][:n]]
        return predictions, list(split["label"][:n])

    def _sampled(self, split: dict, n: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).permutation(len(split["label"]))[:n]

    def calibration_batches(self, tokenizer, data: TaskData, n: int, *, seed: int, device="cpu", recipe=None):
        """``n`` seeded contexts of the training split (unlabeled: no choice, no answer), tokenized as scored."""
        recipe = recipe or MCRecipe()
        split = data.splits["train"]  # never the evaluation split: calibration must not see what is scored
        contexts = [
            encode_pair(tokenizer, split["context"][i], "", add_bos=recipe.add_bos)[0][-recipe.max_length :]
            for i in self._sampled(split, n, seed)
        ]
        return self._batched(contexts, tokenizer, recipe.calib_batch_size, device, labels=False)

    def loss_batches(self, tokenizer, data: TaskData, n: int, *, seed: int, device="cpu", recipe=None):
        """Seeded evaluation examples (at most ``loss_examples``) as context + gold continuation, with LM labels
        (padding masked): the sharpness metric probes the loss where the model is scored."""
        recipe = recipe or MCRecipe()
        split = data.splits[data.eval_split]
        texts = []
        for i in self._sampled(split, min(n, recipe.loss_examples), seed):
            gold = self.target_delimiter + split["choices"][i][split["label"][i]]
            ctx, cont = encode_pair(tokenizer, split["context"][i], gold, add_bos=recipe.add_bos)
            texts.append((ctx + cont)[-recipe.max_length :])
        return self._batched(texts, tokenizer, recipe.batch_size, device, labels=True)

    def _batched(self, sequences: list[list[int]], tokenizer, batch_size: int, device, *, labels: bool) -> list[dict]:
        batches = []
        for start in range(0, len(sequences), batch_size):
            batch = pad_batch(sequences[start : start + batch_size], _pad_id(tokenizer))
            if labels:
                batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            batches.append({k: v.to(device) for k, v in batch.items()})
        return batches

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over the real tokens (the model's own causal LM loss)."""
        return model(**batch).loss


# --------------------------------------------------------------------------- the tasks

SST2_PROMPT = "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:"  # the harness's GLUE sst2
SST2_CHOICES = ["negative", "positive"]  # label ids 0 and 1, as in GLUE


class SST2ZeroShot(MultipleChoiceTask):
    """SST-2 sentiment as a zero-shot choice between " negative" and " positive" (data: the ``sst2`` task's)."""

    name = "sst2-zs"

    @staticmethod
    def example(row: dict[str, Any]) -> Example:
        return SST2_PROMPT.format(sentence=row["sentence"]), SST2_CHOICES, row["label"]

    def load(self, data_dir: str | None = None) -> TaskData:
        """The ``sst2`` task's data (local copy, hub or Rotten Tomatoes twin, whichever it uses), as prompts."""
        sst2 = SST2().load(data_dir)
        splits = {
            name: columns(
                self.example({"sentence": s, "label": y})
                for s, y in zip(split["sentence"], split["label"], strict=True)
            )
            for name, split in sst2.splits.items()
        }
        return TaskData(splits, sst2.source, eval_split=sst2.eval_split)

    def data_sources(self) -> list[str]:
        return SST2().data_sources()  # the sst2 task loads the data


def hellaswag_clean(text: str) -> str:
    """The harness's HellaSwag clean-up: WikiHow rows carry ``[title]`` and other bracketed markup."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(MultipleChoiceTask):
    """Commonsense sentence completion: pick the ending of an ActivityNet / WikiHow scene (4 choices)."""

    name = "hellaswag"
    hub_path = "Rowan/hellaswag"
    hub_splits = {"train": "train", "validation": "validation"}

    @staticmethod
    def example(row: dict[str, Any]) -> Example:
        context = row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return hellaswag_clean(context), [hellaswag_clean(e) for e in row["endings"]], int(row["label"])


class ARCEasy(MultipleChoiceTask):
    """Grade-school science questions (AI2 ARC, Easy set), answered by the choice's text, not its letter."""

    name = "arc_easy"
    hub_path = "allenai/ai2_arc"
    hub_config = "ARC-Easy"
    hub_splits = {"train": "train", "test": "test"}
    eval_split = "test"

    @staticmethod
    def example(row: dict[str, Any]) -> Example:
        choices = row["choices"]
        return f"Question: {row['question']}\nAnswer:", list(choices["text"]), choices["label"].index(row["answerKey"])


@hookimpl
def register_tasks(register):
    register("sst2-zs", SST2ZeroShot, aliases=("sst2_zs",))
    register("hellaswag", HellaSwag)
    register("arc_easy", ARCEasy, aliases=("arc-easy",))


@hookimpl
def register_metrics(register):
    register("mc_accuracy", mc_accuracy, higher_is_better=True, percent=True)
    register("mc_accuracy_norm", mc_accuracy_norm, higher_is_better=True, percent=True)
