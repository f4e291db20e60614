"""Data isolation by construction: what each class of method can reach from its ``MethodContext``.

zero-shot (data_used="none"): nothing; calibration: unlabeled batches of the training split; labeled: also
labeled training batches. The evaluation split is a trap object here: any use of it fails the test, and the
"greedy" task below reads every split it is handed, as a careless method or task might.
"""

import pytest
import torch

from bench.api import Method, Task, TaskData
from bench.errors import BenchError
from bench.runner import Runner


class Trap:
    """Stands in for the evaluation split: touching it in any way fails the test."""

    def _fail(self, *args, **kwargs):
        raise AssertionError("a method reached the evaluation split")

    __getattr__ = __getitem__ = __len__ = __iter__ = __contains__ = __eq__ = __hash__ = _fail


TRAIN = {"sentence": ["good", "bad", "fine", "awful"], "label": [1, 0, 1, 0]}


def _data() -> TaskData:
    return TaskData({"train": TRAIN, "validation": Trap()}, "test:trap", eval_split="validation")


class GreedyTask(Task):
    """Reads every split of the data it is handed, then builds batches from the training split."""

    name = "greedy"

    @staticmethod
    def _read_all(data: TaskData) -> None:
        for split in data.splits.values():
            len(split)

    def calibration_batches(self, tokenizer, data, n, *, seed, device="cpu", recipe=None):
        self._read_all(data)
        labels = torch.tensor(data.splits["train"]["label"][:n])
        return [{"input_ids": torch.ones(len(labels), 3, dtype=torch.long), "labels": labels}]

    def train_batches(self, tokenizer, data, recipe, *, seed, epoch, device="cpu", examples=None, batch_size=None):
        self._read_all(data)
        yield {"input_ids": torch.ones(4, 3, dtype=torch.long), "labels": torch.tensor(data.splits["train"]["label"])}

    def train_steps(self, tokenizer, data, recipe, *, examples=None, batch_size=None):
        self._read_all(data)
        return 1


def _context(data_used: str):
    method = type("M", (Method,), {"data_used": data_used})()
    runner = Runner(plugins=None, store=None, resolved=None)
    return runner.method_context(method, GreedyTask(), tokenizer=None, data=_data(), recipe=None, seed=0)


def test_zero_shot_methods_get_no_data():
    context = _context("none")
    assert context.task_data is None and context.calibration is None and context.training is None


def test_calibration_methods_get_unlabeled_training_batches_only():
    context = _context("calibration")
    assert context.task_data is None and context.training is None
    batches = context.calibration_batches(4, "test")
    assert batches and all("labels" not in b and "label" not in b for b in batches)
    assert batches[0]["input_ids"].shape == (4, 3)


def test_labeled_methods_get_the_training_pool_and_never_the_evaluation_split():
    context = _context("labeled")
    assert context.task_data is None
    (batch,) = list(context.train_batches(0, method="test"))
    assert batch["labels"].tolist() == TRAIN["label"]
    assert context.steps_per_epoch(method="test") == 1
    assert all("labels" not in b for b in context.calibration_batches(2, "test"))


def test_training_view_leaves_the_evaluation_split_out():
    data = _data()
    view = data.training_only()
    assert list(view.splits) == ["train"] and view.splits["train"] is TRAIN
    with pytest.raises(KeyError):
        view.splits[view.eval_split]  # not training data in disguise
    with pytest.raises(BenchError, match="no 'train' split"):
        TaskData({"test": {"text": []}}, "x", eval_split="test").training_only("task 'lm'")
