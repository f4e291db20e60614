"""The Python API: ``bench.run`` and ``bench.leaderboard`` do what the CLI does (the CLI only calls them), the
README's example runs as printed, and a model's kind decides its default task and granularity after resolving."""

import json
import re
from pathlib import Path

import pytest
from tiny import in_process_plugin, tiny_llama

import bench
from bench import plugins
from bench.errors import BenchError
from bench.runner import GridRequest, plan

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path, capsys):
    code = _readme_example().replace("results/notebook", str(tmp_path / "notebook"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    result, board = scope["result"], scope["board"]
    assert result.counts == {"planned": 3, "skipped": 0, "ok": 3, "failed": 0}
    assert str(result.counts) in capsys.readouterr().out  # what the example says it prints
    assert sorted(scope["scores"]) == [("fp32", "FP32"), ("rtn", "W4A32"), ("rtn", "W8A32")]
    assert result.board.table.equals(board.table)  # the run's table is the run dir's table
    for fmt in ("md", "csv", "json", "html"):
        assert (tmp_path / "notebook" / f"leaderboard.{fmt}").exists()
    assert "\\toprule" in (tmp_path / "notebook" / "table.tex").read_text()
    stored = [json.loads(line) for line in (tmp_path / "notebook" / "results.jsonl").read_text().splitlines()]
    assert result.rows == stored  # the rows returned are the rows written
    again = bench.run(**_example_kwargs(tmp_path / "notebook"))
    assert again.counts["skipped"] == 3 and again.rows == stored  # resumed: nothing ran twice


def _example_kwargs(out):
    return dict(
        methods=["rtn"],
        bits=[4, 8],
        model="bert-tiny",
        settings={"sst2": {"max_train_examples": 128}},
        limit=64,
        sharpness=False,
        latency=False,
        out=out,
    )


def test_leaderboard_is_callable_and_still_a_module(tmp_path):
    import bench.leaderboard as module

    assert bench.leaderboard is module and callable(bench.leaderboard)
    assert module.Leaderboard and module.build  # outside reporters import from it as before
    with pytest.raises(BenchError, match="does not exist"):
        bench.leaderboard([tmp_path / "nope"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"settings": {"zsaq.rho": "abc"}, "methods": "zsaq"}, "zsaq.rho='abc': expected float"),
        ({"bits": [1]}, "bits: 1 is out of range; choose from 2..8"),
        ({"methods": "rtm"}, "unknown method 'rtm' (did you mean 'rtn'?)"),
        ({"limit": 0}, "--limit 0: must be a positive number of examples"),
        ({"settings": {"rtn": {"clip": "mse"}, "nonsense": 1}}, "setting 'nonsense': expected 'SCOPE.FIELD'"),
    ],
)
def test_bad_values_raise_before_anything_is_written(tmp_path, kwargs, message):
    out = tmp_path / "run"
    with pytest.raises(BenchError) as info:
        bench.run(model="bert-tiny", out=out, **kwargs)
    assert message in str(info.value)
    assert not out.exists()


def _decoder_dir(tmp_path) -> Path:
    model, _ = tiny_llama()
    model.save_pretrained(tmp_path / "decoder")
    return tmp_path / "decoder"


def test_a_decoder_named_by_its_directory_gets_the_decoder_defaults(tmp_path):
    """Defaults follow the resolved model's kind (from its config), not the alias table: before, a decoder given
    by hub id or directory got the encoder's task and per-channel weights."""
    request = GridRequest(methods=["rtn"], bits=[4], model=str(_decoder_dir(tmp_path)))
    cells, resolved = plan(request, plugins.default())
    assert resolved.kind == "decoder"
    assert {c.task for c in cells} == {"wikitext2"}
    assert {c.spec.granularity for c in cells if c.spec} == {"per-group"}
    encoder, _ = plan(GridRequest(methods=["rtn"], bits=[4], model="bert-tiny"), plugins.default())
    assert {c.task for c in encoder} == {"sst2"} and {c.spec.granularity for c in encoder if c.spec} == {"per-channel"}


def test_a_model_of_no_known_kind_must_name_its_tasks(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "no-such-type"}))
    with pytest.raises(BenchError, match="name its tasks"):
        plan(GridRequest(methods=["rtn"], bits=[4], model=str(tmp_path / "odd")), plugins.default())


class _SaysItsName(bench.api.Method):
    """One class registered under two names: each run of it must know which name it ran as."""

    def quantize(self, model, spec, context):
        context.report["ran_as"] = self.name
        return bench.quant.quantize_model(model, spec, keep_fp=context.keep_fp)


def test_a_method_knows_the_name_it_was_registered_under(tmp_path):
    def register_methods(register):
        register("name-a", _SaysItsName)
        register("name-b", _SaysItsName)

    loaded = in_process_plugin("twonames", register_methods=register_methods)
    kwargs = {**_example_kwargs(tmp_path / "names"), "methods": ["name-a", "name-b"], "bits": [4], "formats": ()}
    result = bench.run(**kwargs, reference=False, baseline=False, plugins=loaded)
    assert {r["method"]: r["method_info"]["ran_as"] for r in result.rows} == {"name-a": "name-a", "name-b": "name-b"}
    assert _SaysItsName().name == "_saysitsname"  # built by hand: its class name
