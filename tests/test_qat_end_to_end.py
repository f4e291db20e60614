"""lsq, squat and prequant through `bench run` on the 4 M-parameter test encoder; the labeled-data task API
(``Task.train_batches``) and what the runner hands to labeled vs zero-shot methods."""

import json

import numpy as np
import pytest
import torch
from bench.tasks.glue import SST2
from bench.tasks.lm import LMRecipe, WikiText2
from tiny import in_process_plugin

from bench import hub, plugins
from bench.api import Method, TaskData
from bench.cli import main

BUDGET = [
    f"--set={m}.{k}={v}"
    for m in ("lsq", "squat", "prequant")
    for k, v in (("max_train_examples", 16), ("batch_size", 8))
]
TINY = ["--model", "bert-tiny", "--set", "sst2.max_train_examples=128", "--limit", "32", "--no-latency", *BUDGET]


def _rows(run_dir):
    return {r["method"]: r for r in map(json.loads, (run_dir / "results.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "run"
    assert main(["run", "--methods", "lsq,squat,prequant", "--bits", "2", *TINY, "--out", str(out)]) == 0
    return out


def test_qat_methods_run_end_to_end(qat_run):
    rows = _rows(qat_run)
    assert set(rows) == {"fp32", "rtn", "lsq", "squat", "prequant"}  # rtn: the baseline every grid carries
    for name in ("lsq", "squat", "prequant"):
        row = rows[name]
        assert row["status"] == "ok", row["error"]
        assert row["data_used"] == "labeled" and row["bits"] == "W2A32"
        assert row["method_info"]["train_steps"] == 2  # 16 examples, batches of 8
        assert row["sharpness"]["value"] >= 0 and row["size_bytes"] < row["fp32_size_bytes"]
    info = rows["prequant"]["method_info"]
    assert 0 < info["trainable_fraction"] < 0.01 and info["outlier_fraction"] == pytest.approx(0.005, abs=0.003)
    assert rows["squat"]["method_info"]["sam_gap_mean"] is not None
    assert rows["fp32"]["method_info"] is None
    md = (qat_run / "leaderboard.md").read_text()
    assert "| squat" in md and "| lsq" in md and "| prequant" in md


class _Probe(Method):
    seen: list = []

    def quantize(self, model, spec, context):
        pretrained = context.pretrained_model()
        fine_tuned = dict(model.named_parameters())
        same = [torch.equal(p, fine_tuned[n]) for n, p in pretrained.named_parameters()]
        training = context.training
        first = next(iter(training.batches(0, examples=8, batch_size=4))) if training else None
        _Probe.seen.append((self.data_used, training is not None, first, all(same)))
        return model


class _LabeledProbe(_Probe):
    data_used = "labeled"


def test_runner_hands_training_data_only_to_labeled_methods(monkeypatch, tmp_path):
    def register_methods(register):
        register("probe-none", _Probe)
        register("probe-labeled", _LabeledProbe)

    loaded = in_process_plugin("probes", register_methods=register_methods)
    monkeypatch.setattr(plugins, "default", lambda: loaded)
    _Probe.seen.clear()
    argv = ["run", "--methods", "probe-none,probe-labeled", "--bits", "4", *TINY[: -len(BUDGET)], "--no-sharpness"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    (none, none_has, _, none_same), (labeled, has, batch, same) = _Probe.seen
    assert (none, none_has) == ("none", False)  # a zero-shot method never gets labeled data
    assert (labeled, has) == ("labeled", True)
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == (4,)
    assert not none_same and not same  # pretrained() is the pre-trained model, not the fine-tuned one


@pytest.fixture(scope="module")
def sst2():
    task = SST2()
    return task, task.load(), hub.package_dir("cognition") / "model"


def test_glue_train_batches_are_a_seeded_pool_reshuffled_per_epoch(sst2):
    from transformers import AutoTokenizer

    task, data, tok_dir = sst2
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    recipe = task.Recipe()

    def epoch(e, seed=0):
        batches = list(task.train_batches(tokenizer, data, recipe, seed=seed, epoch=e, examples=40, batch_size=16))
        return batches, sorted(
            sum((tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True) for b in batches), [])
        )

    first, texts0 = epoch(0)
    second, texts1 = epoch(1)
    assert [len(b["labels"]) for b in first] == [16, 16, 8]
    assert task.train_steps(tokenizer, data, recipe, examples=40, batch_size=16) == 3
    assert texts0 == texts1 and not torch.equal(first[0]["input_ids"], second[0]["input_ids"])  # same pool, new order
    assert epoch(0, seed=1)[1] != texts0  # another seed, another pool
    assert task.train_steps(tokenizer, data, recipe) == 125  # the recipe's 4,000 examples in batches of 32
    n = len(data.splits["train"]["label"])
    assert task.train_steps(tokenizer, data, recipe, examples=0) == int(np.ceil(n / 32))  # 0: the whole split


def test_lm_train_batches_are_non_overlapping_windows():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hub.package_dir("cognition") / "model")
    words = " ".join(f"word{i}" for i in range(600))
    data = TaskData({"train": {"text": [words]}, "test": {"text": ["x"]}}, "test", eval_split="test")
    task, recipe = WikiText2(), LMRecipe(calib_seq_len=64, calib_batch_size=4)
    ids = task.token_ids(tokenizer, data, "train")
    n = len(ids) // 64
    batches = list(task.train_batches(tokenizer, data, recipe, seed=0, epoch=0))
    assert sum(len(b["input_ids"]) for b in batches) == n and task.train_steps(tokenizer, data, recipe) == -(-n // 4)
    starts = sorted(int(torch.nonzero(ids.unfold(0, 64, 1).eq(w).all(1))[0]) for b in batches for w in b["input_ids"])
    assert starts == [64 * i for i in range(n)]  # every window exactly once, none overlapping
    assert len(list(task.train_batches(tokenizer, data, recipe, seed=0, epoch=0, examples=3))) == 1
