"""GLUE task plugins: local GLUE-shaped files, label ids, pair encoding, regression head, metrics, the group, e2e."""

import json
import math

import numpy as np
import pytest
import torch
from bench.tasks.glue import TASKS
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch.nn import functional as F

from bench import models, plugins
from bench.cli import main
from bench.errors import BenchError
from bench.runner import expand_groups

ALL = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli-mm", "qnli", "rte", "wnli"]
N_TRAIN, N_DEV = 12, 10
SENTENCES = [
    "a man is playing a guitar .",
    'she said "wait and walked out .',  # an unbalanced quote: must not swallow the rows after it
    '"quiet , " said the old man .',  # a field that starts with a quote
    "the cat sat on the mat .",
    "it rained all day in the city .",
    "two dogs run across the field .",
    "the film was a quiet triumph .",
    "nobody expected the answer to be so simple .",
]
MNLI_IDS = {"entailment": 0, "neutral": 1, "contradiction": 2}  # the hub's ClassLabel order
NLI2_IDS = {"entailment": 0, "not_entailment": 1}
STSB_HEADER = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
MNLI_HEADER = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse sentence2_parse "
    "sentence1 sentence2".split()
)


def _pair(i: int, offset: int) -> tuple[str, str]:
    return SENTENCES[(i + offset) % len(SENTENCES)], SENTENCES[(i + offset + 1) % len(SENTENCES)]


def _score(i: int) -> str:
    return f"{(i * 0.55) % 5:.3f}"


def _name(names, i: int) -> str:
    return list(names)[i % len(names)]


# task -> (GLUE dir, header (None: CoLA has none), fields of example i); example i has label id i % classes
LAYOUTS = {
    "cola": ("CoLA", None, lambda i, a, b: ["gj04", str(i % 2), "" if i % 2 else "*", a]),
    "sst2": ("SST-2", ["sentence", "label"], lambda i, a, b: [a, str(i % 2)]),
    "mrpc": (
        "MRPC",
        ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],  # the real files start with a BOM
        lambda i, a, b: [str(i % 2), str(100 + i), str(200 + i), a, b],
    ),
    "qqp": (
        "QQP",
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        lambda i, a, b: [str(i), str(2 * i), str(2 * i + 1), a, b, str(i % 2)],
    ),
    "stsb": (
        "STS-B",
        STSB_HEADER,
        lambda i, a, b: [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b, _score(i)],
    ),
    "qnli": ("QNLI", ["index", "question", "sentence", "label"], lambda i, a, b: [str(i), a, b, _name(NLI2_IDS, i)]),
    "rte": ("RTE", ["index", "sentence1", "sentence2", "label"], lambda i, a, b: [str(i), a, b, _name(NLI2_IDS, i)]),
    "wnli": ("WNLI", ["index", "sentence1", "sentence2", "label"], lambda i, a, b: [str(i), a, b, str(i % 2)]),
}
DEV_OFFSET = {"dev.tsv": 3, "dev_matched.tsv": 3, "dev_mismatched.tsv": 5}


def _write(path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    path.write_text("".join("\t".join(fields) + "\n" for fields in lines), encoding="utf-8")


def _mnli_row(i: int, a: str, b: str, n_annotators: int) -> list[str]:
    gold = _name(MNLI_IDS, i)
    return [str(i), str(i), f"{i}e", "fiction", f"( {a} )", f"( {b} )", f"(ROOT {a})", f"(ROOT {b})", a, b] + [gold] * (
        n_annotators + 1
    )


def write_glue(root) -> None:
    """The original GLUE download's layout, a handful of rows per file."""
    for folder, header, row in LAYOUTS.values():
        _write(root / folder / "train.tsv", header, [row(i, *_pair(i, 0)) for i in range(N_TRAIN)])
        _write(root / folder / "dev.tsv", header, [row(i, *_pair(i, 3)) for i in range(N_DEV)])
    # QQP's training file has rows with missing fields; the hub's builder drops them
    with open(root / "QQP" / "train.tsv", "a", encoding="utf-8") as f:
        f.write("999\t1\t2\ta question cut short?\n")
    # MNLI: train has one annotator label, the dev files five; gold_label is the last column
    _write(
        root / "MNLI" / "train.tsv",
        [*MNLI_HEADER, "label1", "gold_label"],
        [_mnli_row(i, *_pair(i, 0), 1) for i in range(N_TRAIN)],
    )
    for dev in ("dev_matched.tsv", "dev_mismatched.tsv"):
        header = [*MNLI_HEADER, *(f"label{k}" for k in range(1, 6)), "gold_label"]
        _write(root / "MNLI" / dev, header, [_mnli_row(i, *_pair(i, DEV_OFFSET[dev]), 5) for i in range(N_DEV)])


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_data")
    write_glue(root)
    return root


@pytest.fixture(scope="module")
def tiny():
    return models.resolve("bert-tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.location)


# --------------------------------------------------------------------------- local data


@pytest.mark.parametrize("name", ALL)
def test_local_glue_layout_loads_like_the_hub(name, glue_dir):
    task = TASKS[name]()
    data = task.load(str(glue_dir))
    spec = task.spec
    eval_split = {"mnli": "validation_matched", "mnli-mm": "validation_mismatched"}.get(name, "validation")
    folder = "MNLI" if name.startswith("mnli") else LAYOUTS[name][0]
    assert data.source == f"local:{(glue_dir / folder).resolve()}"
    assert data.eval_split == eval_split and set(data.splits) == {"train", eval_split}
    offset = DEV_OFFSET.get({"mnli": "dev_matched.tsv", "mnli-mm": "dev_mismatched.tsv"}.get(name, "dev.tsv"))
    for split, n, shift in (("train", N_TRAIN, 0), (eval_split, N_DEV, offset)):
        columns = data.splits[split]
        assert list(columns) == [*spec.text_keys, "label"]
        assert len(columns["label"]) == n  # QQP's cut-short row is skipped
        for i in range(n):
            a, b = _pair(i, shift)
            assert columns[spec.text_keys[0]][i] == a
            if len(spec.text_keys) == 2:
                assert columns[spec.text_keys[1]][i] == b
        if name == "stsb":
            assert columns["label"] == [float(np.float32(_score(i))) for i in range(n)]
        else:
            classes = 3 if name.startswith("mnli") else 2
            assert columns["label"] == [i % classes for i in range(n)]


def test_string_labels_map_to_the_hub_ids(glue_dir):
    mnli = TASKS["mnli"]().load(str(glue_dir)).splits["validation_matched"]
    raw = [_name(MNLI_IDS, i) for i in range(N_DEV)]
    assert mnli["label"] == [MNLI_IDS[r] for r in raw]
    for name in ("rte", "qnli"):
        labels = TASKS[name]().load(str(glue_dir)).splits["validation"]["label"]
        assert labels == [NLI2_IDS[_name(NLI2_IDS, i)] for i in range(N_DEV)]


def test_quotes_do_not_break_parsing(glue_dir):
    train = TASKS["sst2"]().load(str(glue_dir)).splits["train"]
    assert train["sentence"][1] == SENTENCES[1] and train["sentence"][2] == SENTENCES[2]
    assert len(train["sentence"]) == N_TRAIN  # the unbalanced quote swallowed no row


def test_rows_missing_a_field_are_skipped_loudly(glue_dir, caplog):
    data = TASKS["qqp"]().load(str(glue_dir))
    assert "a question cut short?" not in data.splits["train"]["question1"]
    assert "skipped 1 row(s) with a missing field" in caplog.text


def test_mnli_views_share_one_training_set(glue_dir):
    matched, mismatched = TASKS["mnli"](), TASKS["mnli-mm"]()
    m, mm = matched.load(str(glue_dir)), mismatched.load(str(glue_dir))
    assert m.fingerprint("train") == mm.fingerprint("train")
    assert m.splits["validation_matched"] != mm.splits["validation_mismatched"]
    assert mismatched.finetune_name == "mnli" and matched.Recipe() == mismatched.Recipe()


def test_parquet_with_hub_columns(glue_dir, tmp_path):
    import pandas as pd

    rte = {"sentence1": ["p one", "p two"], "sentence2": ["h one", "h two"], "label": [1, 0], "idx": [0, 1]}
    for split in ("train", "validation"):  # next to the TSVs: parquet wins
        (tmp_path / "RTE").mkdir(exist_ok=True)
        pd.DataFrame(rte).to_parquet(tmp_path / "RTE" / f"{split}.parquet")
    _write(
        tmp_path / "RTE" / "train.tsv", ["index", "sentence1", "sentence2", "label"], [["0", "x", "y", "entailment"]]
    )
    data = TASKS["rte"]().load(str(tmp_path))
    assert data.splits["validation"] == {k: rte[k] for k in ("sentence1", "sentence2", "label")}
    # a hub snapshot: lower-case config directories and sharded file names
    stsb = {"sentence1": ["a", "b", "c"], "sentence2": ["d", "e", "f"], "label": [0.5, 4.2, 2.0]}
    (tmp_path / "stsb").mkdir()
    for split in ("train", "validation"):
        pd.DataFrame(stsb).to_parquet(tmp_path / "stsb" / f"{split}-00000-of-00001.parquet")
    data = TASKS["stsb"]().load(str(tmp_path))
    assert data.source == f"local:{(tmp_path / 'stsb').resolve()}" and data.splits["train"]["label"] == [
        float(np.float32(v))
        for v in stsb["label"]  # the hub stores scores as float32
    ]


def test_missing_or_bad_local_files_are_named(tmp_path):
    with pytest.raises(BenchError, match=r"wnli: no local copy in .*WNLI/\{train.tsv,dev.tsv\}"):
        TASKS["wnli"]().load(str(tmp_path))
    _write(tmp_path / "RTE" / "train.tsv", ["index", "sentence1", "sentence2", "label"], [["0", "a", "b", "maybe"]])
    _write(tmp_path / "RTE" / "dev.tsv", ["index", "sentence1", "sentence2"], [["0", "a", "b"]])
    with pytest.raises(BenchError, match=r"RTE/train.tsv: data row 1: label 'maybe'"):
        TASKS["rte"]().load(str(tmp_path))


def test_without_hub_or_local_copy_the_error_asks_for_data_dir():
    with pytest.raises(BenchError) as info:
        TASKS["cola"]().load()
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("cola has no offline source; it needs the hub (nyu-mll/glue/cola)")
    assert "--data-dir DIR with DIR/CoLA/{train.tsv,dev.tsv}" in message


def test_missing_data_ends_the_run_with_exit_code_2(tmp_path, capsys):
    rc = main(["run", "--model", "bert-tiny", "--tasks", "cola", "--bits", "4", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cola has no offline source" in err[0] and "--data-dir" in err[0]
    assert not (tmp_path / "run").exists()  # nothing written


def test_hub_loading_uses_the_mnli_config_for_mnli_mm(monkeypatch):
    import datasets

    calls = []

    class Split:
        def __init__(self, name):
            self.name = name

        def to_dict(self):
            return {"premise": [self.name], "hypothesis": ["h"], "label": [0], "idx": [0]}

    def fake_load_dataset(path, name):
        calls.append((path, name))
        return {s: Split(s) for s in ("train", "validation_matched", "validation_mismatched")}

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = TASKS["mnli-mm"]().load()
    assert calls == [("nyu-mll/glue", "mnli")]
    assert data.source == "hub:nyu-mll/glue/mnli" and data.eval_split == "validation_mismatched"
    assert set(data.splits) == {"train", "validation_mismatched"}


# --------------------------------------------------------------------------- encoding, heads, loss


def test_pairs_are_tokenized_as_pairs(glue_dir, tokenizer):
    for name in ALL:
        task = TASKS[name]()
        data = task.load(str(glue_dir))
        (batch,) = task.calibration_batches(tokenizer, data, 4, seed=0)
        assert "labels" not in batch and batch["input_ids"].shape[0] == 4
        segments = {int(t) for t in batch["token_type_ids"][batch["attention_mask"].bool()]}
        assert segments == ({0} if name in ("cola", "sst2") else {0, 1}), name


def test_recipes_give_pairs_128_tokens():
    for name in ALL:
        recipe = TASKS[name].Recipe()
        assert recipe.max_length == (64 if name in ("cola", "sst2") else 128)
        assert recipe.lr > 0 and recipe.epochs >= 1 and recipe.max_train_examples == 4000


def test_stsb_is_a_regression_task(glue_dir, tiny, tokenizer):
    task = TASKS["stsb"]()
    assert task.kind == "regression" and task.metrics == ("pearson", "spearmanr") and task.primary_metric == "pearson"
    data = task.load(str(glue_dir))
    net, _ = task.load_model(tiny)
    assert net.config.num_labels == 1 and net.config.problem_type == "regression"
    preds, refs = task.predict(net, tokenizer, data, limit=5)
    assert (
        len(preds) == 5 and all(isinstance(p, float) for p in preds) and refs == data.splits["validation"]["label"][:5]
    )
    (batch,) = task.loss_batches(tokenizer, data, 6, seed=1)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (6,)
    with torch.no_grad():
        expected = F.mse_loss(net(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, 0], batch["labels"])
        assert torch.allclose(task.loss(net, batch), expected)


@pytest.mark.parametrize("name", ["sst2", "stsb"])
def test_predictions_in_length_order_are_each_examples_own(glue_dir, tiny, tokenizer, name):
    """predict batches examples shortest first (less padding); each prediction must still be its own example's,
    in the split's order: checked against a reference loop that runs one unpadded example at a time."""
    task = TASKS[name]()
    data = task.load(str(glue_dir))
    net, _ = task.load_model(tiny)
    val = data.splits["validation"]
    lengths = [sum(len(val[k][i]) for k in task.spec.text_keys) for i in range(len(val["label"]))]
    assert lengths != sorted(lengths)  # the split is not already in length order: the test can fail
    preds, refs = task.predict(net, tokenizer, data, recipe=task.Recipe(eval_batch_size=4))
    expected = []
    with torch.no_grad():
        for i in range(len(val["label"])):
            enc = tokenizer(*[val[k][i] for k in task.spec.text_keys], return_tensors="pt", truncation=True)
            logits = net(**enc).logits[0]
            expected.append(int(logits.argmax()) if task.spec.label_names else float(logits[0]))
    assert refs == list(val["label"])
    if task.spec.label_names:
        assert preds == expected
    else:
        assert np.allclose(preds, expected, atol=1e-5)


def test_loss_batches_are_seeded_labeled_eval_examples(glue_dir, tiny, tokenizer):
    task = TASKS["rte"]()
    data = task.load(str(glue_dir))
    net, _ = task.load_model(tiny)
    assert net.config.num_labels == 2 and net.config.id2label == {0: "entailment", 1: "not_entailment"}
    batches = task.loss_batches(tokenizer, data, 7, seed=3)
    again = task.loss_batches(tokenizer, data, 7, seed=3)
    other = task.loss_batches(tokenizer, data, 7, seed=4)
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.dtype == torch.long and len(labels) == 7 and set(labels.tolist()) <= {0, 1}
    assert torch.equal(labels, torch.cat([b["labels"] for b in again]))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other, strict=True))
    val = data.splits["validation"]
    label_of = {
        tuple(tokenizer(a, b)["input_ids"]): y
        for a, b, y in zip(val["sentence1"], val["sentence2"], val["label"], strict=True)
    }
    for ids, mask, label in zip(batches[0]["input_ids"], batches[0]["attention_mask"], labels, strict=True):
        assert label_of[tuple(ids[mask.bool()].tolist())] == label  # an evaluation example, with its own label
    keys = set(batches[0])
    with torch.no_grad():
        loss = task.loss(net, batches[0])
        expected = F.cross_entropy(net(**{k: v for k, v in batches[0].items() if k != "labels"}).logits, labels)
    assert torch.allclose(loss, expected) and set(batches[0]) == keys  # the batch is left as it was


# --------------------------------------------------------------------------- metrics and the group

OFFICIAL = {
    "cola": {"matthews_correlation"},
    "stsb": {"pearson", "spearmanr"},
    "mrpc": {"f1", "accuracy"},
    "qqp": {"f1", "accuracy"},
}
REFS, PREDS = [0, 1, 1, 0, 1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 1, 1, 1, 1, 0]
REFS3, PREDS3 = [0, 1, 2, 2, 1, 0, 1, 2, 0, 1], [0, 2, 2, 2, 1, 0, 0, 2, 1, 1]
SCORES, OUTPUTS = [0.5, 1.2, 4.8, 3.3, 2.0, 2.1, 5.0, 0.0], [0.9, 1.0, 4.1, 3.9, 2.5, 1.7, 4.4, 0.3]
EXPECTED = {
    "accuracy": lambda p, r: accuracy_score(r, p),
    "f1": lambda p, r: f1_score(r, p),
    "matthews_correlation": lambda p, r: matthews_corrcoef(r, p),
    "pearson": lambda p, r: pearsonr(p, r)[0],
    "spearmanr": lambda p, r: spearmanr(p, r)[0],
}


@pytest.mark.parametrize("name", ALL)
def test_official_metrics_equal_sklearn_and_scipy(name):
    task, registry = TASKS[name], plugins.load().metrics
    assert set(task.metrics) == OFFICIAL.get(name, {"accuracy"})
    assert task.primary_metric == {"cola": "matthews_correlation", "stsb": "pearson"}.get(
        name, "f1" if name in ("mrpc", "qqp") else "accuracy"
    )
    preds, refs = {"stsb": (OUTPUTS, SCORES), "mnli": (PREDS3, REFS3), "mnli-mm": (PREDS3, REFS3)}.get(
        name, (PREDS, REFS)
    )
    for metric in task.metrics:
        assert registry.get(metric)(preds, refs) == pytest.approx(EXPECTED[metric](preds, refs), abs=1e-12)


def test_glue_group_expands_to_every_task():
    loaded = plugins.load()
    assert expand_groups(loaded, ["glue"]) == ALL
    assert expand_groups(loaded, ["rte", "glue"])[:2] == ["rte", "cola"]  # no duplicates, first mention wins
    assert expand_groups(loaded, ["sts-b", "sst-2"]) == ["stsb", "sst2"]


def test_end_to_end_on_local_glue_files(glue_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--model", "bert-tiny", "--tasks", "rte,stsb", "--data-dir", str(glue_dir), "--bits", "4"]
    assert main([*argv, "--set", "task.max_train_examples=16", "--limit", "8", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["task"], r["bits"]) for r in rows) == [
        ("rte", "FP32"),
        ("rte", "W4A32"),
        ("stsb", "FP32"),
        ("stsb", "W4A32"),
    ]
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert row["data_source"].startswith("local:") and row["eval_examples"] == 8
        assert math.isfinite(row["score"]) and row["score"] == row["metrics"][row["primary_metric"]]
    stsb = next(r for r in rows if r["task"] == "stsb")
    assert stsb["task_kind"] == "regression" and set(stsb["metrics"]) == {"pearson", "spearmanr"}
    assert stsb["finetune"]["recipe"]["max_train_examples"] == 16 and stsb["finetune"]["recipe"]["max_length"] == 128
