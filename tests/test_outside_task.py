"""An outside task of a kind quantbench never heard of, scored by a lower-is-better metric its plugin registers
(in-process, as a package's module would): a task declares which model kind it is the default of."""

import types

import pytest

from bench import hookimpl, models, plugins
from bench.api import Task
from bench.errors import BenchError, PluginError
from bench.grid import default_task


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
    @hookimpl
    def register_tasks(register):
        register("asr-toy", task_cls)

    @hookimpl
    def register_metrics(register):
        register("wer", wer, higher_is_better=False)

    module = types.ModuleType("asrplugin")
    module.register_tasks, module.register_metrics = register_tasks, register_metrics
    return plugins.load(extra=[("asrplugin", module)])


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
