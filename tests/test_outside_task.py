"""An outside task of a kind quantbench never heard of, scored by a lower-is-better metric its plugin registers
(in-process, as a package's module would): the leaderboard ranks it by the registered direction (best = lowest)
and shows it as registered (not x100); a task declares which model kind it is the default of."""

import pytest
from tiny import in_process_plugin, result_row

from bench import models, plugins
from bench.api import Task
from bench.errors import BenchError, PluginError
from bench.grid import default_task
from bench.leaderboard import DELTA, build


class ToyASR(Task):
    """A speech task: word error rate, a fraction where lower is better."""

    kind = "speech-recognition"
    metrics = ("wer",)
    primary_metric = "wer"
    needs_finetune = False
    default_for_kinds = ("speech",)


def wer(predictions, references) -> float:
    return sum(p != r for p, r in zip(predictions, references, strict=True)) / len(references)


def _plugin(task_cls=ToyASR) -> plugins.Plugins:
    def register_tasks(register):
        register("asr-toy", task_cls)

    def register_metrics(register):
        register("wer", wer, higher_is_better=False)

    return in_process_plugin("asrplugin", register_tasks=register_tasks, register_metrics=register_metrics)


def _rows():
    rows = []
    for seed in (0, 1):
        for method, bits, score in [("fp32", "FP32", 0.10), ("rtn", "W4A32", 0.30), ("gptq", "W4A32", 0.20)]:
            row = result_row(
                method, bits, "asr-toy", score + (0.01 if seed else -0.01), seed=seed, kind="speech-recognition"
            )
            rows.append({**row, "primary_metric": "wer", "role": {"fp32": "reference", "rtn": "baseline"}.get(method)})
        rows.append({**result_row("awq", "W4A32", "asr-toy", 0.25, seed=seed), "primary_metric": "wer", "role": None})
    return rows


def test_lower_is_better_metric_ranks_lowest_best_and_is_not_scaled(tmp_path):
    loaded = _plugin()
    board = build(_rows(), [], [], metrics=loaded.metrics)
    assert board.table.loc[("gptq", "none"), ("W4A32", "asr-toy")] == "0.20 ± 0.01"  # as stored: not x100
    assert board.table.loc[("fp32", "none"), ("FP32", "asr-toy")] == "0.10 ± 0.01"
    assert board.lower_is_better("asr-toy") and board.lower_is_better(f"{DELTA}fp32")
    best = board.best()
    assert best[("W4A32", "asr-toy")] == ("gptq", "none")  # the lowest error, not the highest
    assert best[("W4A32", f"{DELTA}fp32")] == ("gptq", "none")  # the smallest increase over the reference
    assert any(note.startswith("asr-toy: wer on") for note in board.notes)  # no "x100"
    md = loaded.reporters.get("md")(board, tmp_path / "b.md")
    assert "**0.20 ± 0.01**" in md


def test_the_same_rows_without_the_plugin_read_as_stored():
    """A metric no installed plugin registers (a run dir from elsewhere): unscaled, higher taken as better, and
    the notes say so instead of ranking it silently."""
    board = build(_rows(), [], [], metrics=plugins.default().metrics)
    assert board.best()[("W4A32", "asr-toy")] == ("rtn", "none")
    assert any("no installed plugin registers" in note for note in board.notes)


def _model(kind: str) -> models.ResolvedModel:
    return models.ResolvedModel("m", "/nowhere", "local:/nowhere", kind)


def test_a_task_declares_the_default_task_of_a_model_kind():
    loaded = _plugin()
    assert default_task(loaded, _model("speech")) == "asr-toy"
    assert default_task(loaded, _model("encoder")) == "sst2" and default_task(loaded, _model("decoder")) == "wikitext2"
    with pytest.raises(BenchError, match="no installed task is the default for model 'm' \\(kind vision\\)"):
        default_task(loaded, _model("vision"))


def test_two_tasks_claiming_one_kind_is_an_error_naming_both():
    greedy = type("GreedyASR", (ToyASR,), {"default_for_kinds": ("encoder",)})
    with pytest.raises(PluginError, match="several tasks claim .* encoder models: asr-toy \\(asrplugin.*sst2"):
        default_task(_plugin(greedy), _model("encoder"))
