"""Sweeps as grid axes: ``--sweep METHOD.FIELD=V1,V2`` (``bench.run(sweeps=...)``) is a ``--set`` per cell: each value
its own config, resume key and leaderboard variant, checked when the grid is planned; the baseline and reference
cells are not multiplied, and a swept run dir resumes like any other."""

import dataclasses
import json

import pytest
from bench.methods.gptq import GPTQConfig

import bench
from bench import plugins
from bench.api import hash_exempt
from bench.cli import build_parser, main
from bench.errors import BenchError
from bench.runner import GridRequest, _sweeps, plan


def _plan(methods, sweeps, **kw):
    request = GridRequest(
        methods=methods, bits=[2, 4], tasks=["sst2"], seeds=[0], model="bert-tiny", sweeps=_sweeps(sweeps), **kw
    )
    cells, _ = plan(request, plugins.default())
    return cells


def _variants(cells, method):
    return sorted({c.variant for c in cells if c.method == method})


def test_each_value_is_its_own_cell_key_and_variant():
    cells = _plan(["zsaq"], {"zsaq.steps": [30, 240, 960]})
    zsaq = [c for c in cells if c.method == "zsaq"]
    assert len(zsaq) == 3 * 2  # three values x two bit-widths
    assert _variants(cells, "zsaq") == ["steps=240", "steps=30", "steps=960"]
    assert sorted({c.method_config["steps"] for c in zsaq}) == [30, 240, 960]  # converted to the field's int
    assert len({c.config_hash for c in zsaq}) == 3
    assert len({c.key for c in cells}) == len(cells)
    # one baseline per grid and one reference, whatever the sweep
    assert sorted(c.bits_label for c in cells if c.method == "rtn") == ["W2A8", "W4A8"]
    assert _variants(cells, "rtn") == [""]
    assert len([c for c in cells if c.method == "fp32"]) == 1
    assert len(cells) == 6 + 2 + 1


def test_the_cli_form_the_dict_forms_and_a_set_cell_are_the_same_cells():
    keys = {c.key for c in _plan(["zsaq"], ["zsaq.steps=30,240"])}
    assert keys == {c.key for c in _plan(["zsaq"], {"zsaq.steps": "30, 240"})}
    assert keys == {c.key for c in _plan(["zsaq"], {"zsaq": {"steps": (30, 240)}})}
    one = {c.key for c in _plan(["zsaq"], None, settings={"zsaq": {"steps": "240"}}) if c.method == "zsaq"}
    assert one <= keys  # a swept value is exactly a --set for its cell: same key, so a run dir resumes either way


def test_two_sweeps_of_one_method_form_the_product_with_the_set_values():
    cells = _plan(["zsaq"], ["zsaq.steps=30,240", "zsaq.rho=0.1,0.2,0.3"], settings={"zsaq": {"lr": "1e-4"}})
    zsaq = [c for c in cells if c.method == "zsaq"]
    assert len(zsaq) == 2 * 3 * 2
    assert len(_variants(cells, "zsaq")) == 6
    assert "rho=0.2,steps=240,lr=0.0001" in _variants(cells, "zsaq")  # in the Config's field order
    assert {c.method_config["lr"] for c in zsaq} == {1e-4}
    assert len({c.key for c in cells}) == len(cells)
    assert len([c for c in cells if c.method == "rtn"]) == 2


def test_sweeps_of_two_methods_do_not_multiply_each_other():
    cells = _plan(["zsaq", "gptq"], {"zsaq.steps": [30, 240], "gptq.damp": [0.01, 0.1, 0.5]})
    assert len([c for c in cells if c.method == "zsaq"]) == 2 * 2
    assert len([c for c in cells if c.method == "gptq"]) == 3 * 2
    assert len([c for c in cells if c.method == "rtn"]) == 2


def test_a_sweep_of_the_baseline_keeps_one_plain_baseline():
    cells = _plan(["rtn"], {"rtn.clip": ["percentile", "mse"]})
    assert _variants(cells, "rtn") == ["", "clip=mse", "clip=percentile"]
    assert len([c for c in cells if c.method == "rtn"]) == 3 * 2
    # the default value is the plain baseline cell itself, never a second copy of it
    cells = _plan(["rtn"], {"rtn.clip": ["minmax", "mse"]})
    assert _variants(cells, "rtn") == ["", "clip=mse"] and len(cells) == len({c.key for c in cells}) == 2 * 2 + 1


@pytest.mark.parametrize(
    "methods, sweeps, settings, message",
    [
        (["zsaq"], {"zsaq.steps": [30, "abc", 90]}, {}, "zsaq.steps='abc': expected int"),
        (["zsaq"], ["zsaq.steps=30,-1"], {}, "settings of 'zsaq': steps=-1: must be at least 0"),
        (["rtn"], ["rtn.clip=mse,msee"], {}, "unknown value for rtn.clip 'msee' (did you mean 'mse'?)"),
        (["zsaq"], ["zsaq.stepz=30"], {}, "unknown setting of 'zsaq' 'stepz' (did you mean 'steps'?)"),
        (["zsaq"], ["zsq.steps=30"], {}, "unknown method 'zsq' (did you mean 'zsaq'?)"),
        (["zsaq"], ["gptq.damp=0.1,0.2"], {}, "--sweep gptq.damp: 'gptq' is not a method of this run (zsaq)"),
        (["zsaq"], ["sst2.lr=1e-4"], {}, "unknown method 'sst2'"),  # tasks' recipes are not swept
        (["zsaq"], ["zsaq.steps=30"], {"zsaq": {"steps": "60"}}, "zsaq.steps is both swept (--sweep) and set"),
        (["zsaq"], ["zsaq.steps=30,030"], {}, "--sweep zsaq.steps=30,030: '030' is listed twice"),
        (["zsaq"], ["zsaq.steps=30,", "zsaq.rho=0.1"], {}, "empty value in the list"),
        (["zsaq"], ["zsaq.steps=30", "zsaq.steps=60"], {}, "--sweep zsaq.steps: swept twice"),
        (["zsaq"], ["zsaq.steps"], {}, "--sweep 'zsaq.steps': expected METHOD.FIELD=V1,V2,..."),
        (["zsaq"], {"steps": [30]}, {}, "--sweep 'steps': expected METHOD.FIELD=V1,V2,..."),
        (["zsaq"], {"zsaq.steps": []}, {}, "empty value in the list"),
    ],
)
def test_bad_sweeps_are_refused_when_planned(methods, sweeps, settings, message):
    with pytest.raises(BenchError) as info:
        _plan(methods, sweeps, settings=settings)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "zsaq", "--sweep", "zsaq.steps=30,x"], "zsaq.steps='x': expected int"),
        (
            ["--methods", "zsaq", "--sweep", "zsaq.stpes=30"],
            "unknown setting of 'zsaq' 'stpes' (did you mean 'steps'?)",
        ),
        (["--sweep", "gptq.damp=0.1"], "'gptq' is not a method of this run (rtn)"),
        (["--sweep", "rtn.clip=mse", "--set", "rtn.clip=percentile"], "rtn.clip is both swept (--sweep) and set"),
    ],
)
def test_cli_bad_sweep_is_one_line_exit_2_nothing_written(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == err.splitlines()[0] and message in err and "Traceback" not in err
    assert not out.exists()


def test_run_help_explains_sweep_with_an_example():
    run = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith(" run"))
    help_text = " ".join(run.format_help().split())
    assert "--sweep METHOD.FIELD=V1,V2,..." in help_text and "--sweep METHOD.steps=60,240,960" in help_text


def _kwargs(out, clips):
    return dict(
        methods=["rtn"],
        bits=[4],
        model="bert-tiny",
        settings={"sst2": {"max_train_examples": 128}},
        sweeps={"rtn.clip": clips},
        limit=64,
        sharpness=False,
        latency=False,
        formats=("md",),
        out=out,
    )


def test_a_swept_run_has_a_row_and_a_leaderboard_variant_per_value_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    first = bench.run(**_kwargs(out, ["percentile"]))
    assert first.counts == {"planned": 3, "skipped": 0, "ok": 3, "failed": 0}  # fp32, rtn, rtn[clip=percentile]
    # adding a value runs only its cells
    second = bench.run(**_kwargs(out, ["percentile", "mse"]))
    assert second.counts == {"planned": 4, "skipped": 3, "ok": 1, "failed": 0}
    rows = {(r["method"], r["variant"]): r for r in second.rows}
    assert set(rows) == {("fp32", ""), ("rtn", ""), ("rtn", "clip=percentile"), ("rtn", "clip=mse")}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows[("rtn", "clip=mse")]["method_config"] == {"clip": "mse"}
    assert len({r["key"] for r in rows.values()}) == 4
    methods = set(second.board.table.index.get_level_values("method"))
    assert {"fp32", "rtn", "rtn[clip=percentile]", "rtn[clip=mse]"} <= methods
    board_md = (out / "leaderboard.md").read_text()
    assert "rtn[clip=mse]" in board_md and "rtn[clip=percentile]" in board_md
    # the same command again: every cell skipped, nothing appended
    lines = (out / "results.jsonl").read_text().splitlines()
    again = bench.run(**_kwargs(out, ["percentile", "mse"]))
    assert again.counts == {"planned": 4, "skipped": 4, "ok": 0, "failed": 0}
    assert (out / "results.jsonl").read_text().splitlines() == lines
    assert [json.loads(line)["key"] for line in lines] == [r["key"] for r in first.rows] + [
        rows[("rtn", "clip=mse")]["key"]
    ]


def test_a_setting_added_later_keeps_the_keys_of_cells_at_its_default():
    """``added_setting``: gptq.first_token_weight came after the published GPTQ rows; at its default (the former
    behaviour) the cells keep their keys and resume, any other value is its own key and variant."""
    cells = _plan(["gptq"], {"gptq.first_token_weight": [1, 64]})
    gptq = {c.variant: c for c in cells if c.method == "gptq" and c.bits_label == "W4A32"}
    assert sorted(gptq) == ["", "first_token_weight=64"]
    assert gptq[""].method_config["first_token_weight"] == 1.0  # recorded in the row either way
    without = {k: v for k, v in gptq[""].method_config.items() if k != "first_token_weight"}
    before = dataclasses.replace(gptq[""], method_config=without, hash_exempt=frozenset())
    assert gptq[""].key == before.key  # the key a cell had before the field existed
    assert gptq["first_token_weight=64"].key != before.key
    assert hash_exempt(GPTQConfig(first_token_weight=64)) == frozenset()
