"""Zero-shot multiple choice: scores against a plain log-softmax reference, the two accuracies, data, end to end."""

import json
import math

import bench.tasks.multiple_choice as mc
import pytest
import torch
from bench.tasks.glue import SST2
from tiny import tiny_llama
from torch.nn import functional as F

from bench import hub, plugins
from bench.api import TaskData
from bench.cli import main
from bench.errors import BenchError

EXAMPLES = [  # contexts and choices of different lengths, so batches are padded
    ("the cat sat on the", ["mat", "moon and the stars", "dog"], 0),
    ("Question: what colour is the sky on a clear day?\nAnswer:", ["blue", "green"], 0),
    ("a", ["b c d e f g", "h"], 1),
]


@pytest.fixture(scope="module")
def tiny_decoder():
    return tiny_llama()


@pytest.fixture(scope="module")
def data():
    return TaskData({"validation": mc.columns(EXAMPLES)}, "test")


def _reference_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """One unpadded forward on context + continuation; log-softmax summed over the continuation's tokens."""
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    assert whole[: len(ctx)] == ctx and len(whole) > len(ctx)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logp[pos - 1, whole[pos]].item() for pos in range(len(ctx), len(whole)))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_scores_equal_a_plain_reference(tiny_decoder, data, batch_size):
    model, tokenizer = tiny_decoder
    task = mc.HellaSwag()  # any member of the family: scoring is shared
    preds, refs = task.predict(model, tokenizer, data, recipe=mc.MCRecipe(batch_size=batch_size))
    assert refs == [0, 0, 1]
    for (context, choices, _), scored in zip(EXAMPLES, preds, strict=True):
        assert [n for _, n in scored] == [len(c) for c in choices]  # characters of the choice, not the delimiter
        expected = [_reference_loglik(model, tokenizer, context, " " + c) for c in choices]
        assert [s for s, _ in scored] == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_limit_and_trailing_space(tiny_decoder, data):
    model, tokenizer = tiny_decoder
    preds, refs = mc.ARCEasy().predict(model, tokenizer, data, limit=2)
    assert len(preds) == len(refs) == 2
    # cut on the left: a 3-token window scores the continuation's last tokens with what context fits
    ctx, cont = [5, 6, 7], [8, 9]
    assert mc._model_input((ctx, cont), 3) == ([6, 7, 8], 2) and mc._model_input((ctx, cont), 1) == ([8], 1)
    # a context's trailing space moves to the continuation: "x: " + "y" scores as "x:" + " y"
    assert mc.encode_pair(tokenizer, "the cat sat on ", "mat") == mc.encode_pair(tokenizer, "the cat sat on", " mat")


def test_accuracies_against_hand_counts():
    predictions = [
        [(-1.0, 1), (-2.0, 10)],  # acc: 0; norm: -1.0 vs -0.2 -> 1
        [(-5.0, 10), (-4.0, 2)],  # acc: 1; norm: -0.5 vs -2.0 -> 0
        [(-3.0, 3), (-1.0, 1), (-2.0, 4)],  # acc: 1; norm: -1, -1, -0.5 -> 2
        [(-9.0, 3), (-8.0, 4), (-1.0, 5)],  # acc: 2; norm: 2
    ]
    references = [0, 0, 1, 2]  # acc right on 0, 2, 3; norm right on 1, 3
    assert mc.mc_accuracy(predictions, references) == 0.75
    assert mc.mc_accuracy_norm(predictions, references) == 0.5
    assert mc.mc_accuracy([[(-1.0, 1), (-1.0, 1)]], [0]) == 1.0  # ties go to the first choice, as numpy's argmax


def test_sst2_zs_offline_is_the_rotten_tomatoes_twin():
    data = mc.SST2ZeroShot().load()
    twin = SST2().load()
    assert data.source.startswith("offline:") and data.source == twin.source
    val, twin_val = data.splits["validation"], twin.splits["validation"]
    assert len(val["label"]) == len(twin_val["label"]) > 100 and val["label"] == twin_val["label"]
    assert val["context"][0] == f"{twin_val['sentence'][0]}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    assert val["choices"][0] == ["negative", "positive"] and len(data.splits["train"]["context"]) > 1000
    assert "offline twin" in mc.SST2ZeroShot().data_sources() and mc.HellaSwag().data_sources() == ["hub"]


@pytest.mark.parametrize("task,hub_id", [(mc.HellaSwag, "Rowan/hellaswag"), (mc.ARCEasy, "allenai/ai2_arc/ARC-Easy")])
def test_hub_only_tasks_fail_offline_in_one_line(task, hub_id):
    with pytest.raises(BenchError) as err:
        task().load()
    message = str(err.value)
    assert "\n" not in message and hub_id in message and task.name in message


def test_harness_preprocessing_of_hub_rows():
    row = {
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to plant a tree [title] Dig a hole.",
        "ctx_b": "then you",
        "endings": ["put the tree in. [step] Water it.", " leave."],
        "label": "0",
    }
    context, choices, gold = mc.HellaSwag.example(row)
    assert context == "Home and Garden: How to plant a tree. Dig a hole. Then you"
    assert choices == ["put the tree in. Water it.", "leave."] and gold == 0
    arc = {
        "question": "Which is a metal?",
        "choices": {"text": ["wood", "iron"], "label": ["A", "B"]},
        "answerKey": "B",
    }
    assert mc.ARCEasy.example(arc) == ("Question: Which is a metal?\nAnswer:", ["wood", "iron"], 1)


def test_hub_rows_become_examples_with_their_source(monkeypatch):
    import datasets

    arc = {
        "question": "Which is a metal?",
        "choices": {"text": ["wood", "iron"], "label": ["1", "2"]},
        "answerKey": "2",
    }
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return [arc] * (3 if split == "test" else 1)

    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = mc.ARCEasy().load()
    assert sorted(calls) == [("allenai/ai2_arc", "ARC-Easy", "test"), ("allenai/ai2_arc", "ARC-Easy", "train")]
    assert data.source == "hub:allenai/ai2_arc/ARC-Easy/test" and data.eval_split == "test"
    assert data.splits["test"]["label"] == [1, 1, 1] and len(data.splits["train"]["context"]) == 1


def test_calibration_and_loss_batches(tiny_decoder):
    model, tokenizer = tiny_decoder
    split = mc.columns(EXAMPLES * 3)
    data = TaskData({"train": split, "validation": split}, "test")
    task = mc.HellaSwag()
    calib = task.calibration_batches(tokenizer, data, 5, seed=0, recipe=mc.MCRecipe(calib_batch_size=2))
    assert [len(b["input_ids"]) for b in calib] == [2, 2, 1] and all("labels" not in b for b in calib)
    batches = task.loss_batches(tokenizer, data, 100, seed=0, recipe=mc.MCRecipe(batch_size=4, loss_examples=6))
    assert [len(b["input_ids"]) for b in batches] == [4, 2]
    batch = batches[0]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    before = {k: v.clone() for k, v in batch.items()}
    assert math.isfinite(task.loss(model, batch).item())
    assert all(torch.equal(before[k], batch[k]) for k in batch)  # sharpness re-evaluates the same batch


@pytest.fixture
def mc_plugins(monkeypatch):
    """The installed plugins, plus this module when its entry point is not installed yet."""
    loaded = plugins.default()
    if "sst2-zs" not in loaded.tasks:
        loaded = plugins.load(extra=[("mc", mc)])
        monkeypatch.setattr(plugins, "default", lambda: loaded)
    return loaded


def test_sst2_zs_end_to_end(mc_plugins, tiny_decoder, tmp_path):
    model, tokenizer = tiny_decoder
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tmp_path / "model"), "--tasks", "sst2-zs", "--bits", "4", "--limit", "8"]
    argv += ["--set", "sst2-zs.loss_examples=16", "--no-latency", "--out", str(out)]  # sharpness: fwd+bwd per step
    assert main(argv) == 0
    rows = {r["bits"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    # a decoder given by its directory gets the decoder's default grid (groups of 128), as an alias does
    rows["W4A32"] = rows.pop("W4A32 g128")
    assert set(rows) == {"FP32", "W4A32"}
    for row in rows.values():
        assert row["status"] == "ok", row["error"]
        assert row["task_kind"] == "multiple-choice" and row["eval_examples"] == 8
        assert set(row["metrics"]) == {"mc_accuracy", "mc_accuracy_norm"}
        assert row["score"] == row["metrics"]["mc_accuracy"] and row["score"] * 8 == round(row["score"] * 8)
        assert row["data_source"].startswith("offline:rotten-tomatoes") and row["sharpness"]["value"] >= 0
    assert rows["W4A32"]["quantized"]["kept_fp"] == ["lm_head"]
    assert "sst2-zs" in (out / "leaderboard.md").read_text()
