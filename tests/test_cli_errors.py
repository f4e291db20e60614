"""Bad input: one line naming the bad value (and the choices), exit code 2, nothing written."""

import pytest

from bench.cli import main

BAD_RUNS = [
    (
        ["--methods", "rtm"],
        "unknown method 'rtm' (did you mean 'rtn'?); choose from: awq, fp32, gan, gptq, lsq, prequant, rtn, "
        "smoothquant, squat, zsaq",
    ),
    (["--tasks", "sst3"], "unknown task 'sst3' (did you mean 'sst2'?)"),
    (["--model", "minilx"], "unknown model 'minilx' (did you mean 'minilm'?)"),
    (["--bits", "0"], "--bits: 0 is out of range; choose from 2..8"),
    (["--bits", "1"], "--bits: 1 is out of range; choose from 2..8"),
    (["--bits", "9"], "--bits: 9 is out of range; choose from 2..8"),
    (["--bits", "-4"], "--bits: -4 is out of range; choose from 2..8"),
    (["--bits", "x"], "--bits: 'x' is not an integer; choose from 2..8"),
    (["--bits", "4,"], "--bits '4,': empty item in the comma list"),
    (["--bits", "4,4"], "--bits '4,4': '4' is listed twice"),
    (["--bits", "4.5"], "--bits: '4.5' is not an integer"),
    (["--methods", "rtn,rtn"], "--methods 'rtn,rtn': 'rtn' is listed twice"),
    (["--act-bits", "16"], "--act-bits: 16 is out of range; choose from 2..8"),
    (["--granularity", "per-chanel"], "unknown granularity 'per-chanel' (did you mean 'per-channel'?)"),
    (["--set", "rtn.foo=1"], "unknown setting of 'rtn' 'foo'"),
    (["--set", "sst2.epochs=two"], "sst2.epochs='two': expected int"),
    (["--set", "sst2.lrr=1"], "unknown setting of 'sst2' 'lrr' (did you mean 'lr'?)"),
    (["--set", "task.lrr=1"], "unknown setting of 'task' 'lrr' (did you mean 'lr'?)"),
    (["--set", "gptq.damp=1"], "unknown --set scope 'gptq'; choose from: rtn, sst2, task"),  # not in --methods
    (["--set", "nonsense"], "--set 'nonsense': expected SCOPE.FIELD=VALUE"),
    (["--granularity", "per-group", "--group-size", "0"], "group size 0: must be a positive number"),
    (["--limit", "0"], "--limit 0: must be a positive number of examples"),
    (["--model", "org/some-model"], "model 'org/some-model' is a hub id but the hub is off"),
    # method settings are checked when the grid is planned, not when a cell reaches them
    (["--methods", "zsaq", "--set", "zsaq.rho=abc"], "zsaq.rho='abc': expected float"),
    (["--methods", "zsaq", "--set", "zsaq.rho=-0.1"], "settings of 'zsaq': rho=-0.1: must be at least 0"),
    (["--methods", "awq", "--set", "awq.grid=0"], "settings of 'awq': grid=0: must be at least 1"),
    (["--methods", "lsq", "--set", "lsq.kd_weight=2"], "settings of 'lsq': kd_weight=2.0: must be between 0 and 1"),
]


@pytest.mark.parametrize("argv,message", BAD_RUNS, ids=[" ".join(a) for a, _ in BAD_RUNS])
def test_bad_run_input(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == err.splitlines()[0], f"not one line: {err!r}"
    assert message in err
    assert "Traceback" not in err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    "argv,message",
    [
        (["list", "metric"], "unknown kind 'metric' (did you mean 'metrics'?)"),
        (["list", "methods", "rtm"], "unknown method 'rtm' (did you mean 'rtn'?)"),
        (["describe", "rtm"], "unknown name 'rtm' (did you mean 'rtn'?)"),
        (["describe", "sst3"], "unknown name 'sst3' (did you mean 'sst2'?)"),
        (["leaderboard", "{tmp}", "--layout", "wdie"], "unknown layout 'wdie' (did you mean 'wide'?)"),
        (["leaderboard", "{tmp}", "--format", "mdd"], "unknown reporter 'mdd' (did you mean 'md'?)"),
        (["leaderboard", "{tmp}/nope"], "does not exist"),
        (["leaderboard", "{tmp}"], "is not a quantbench run dir"),
        (["show", "{tmp}"], "is not a quantbench run dir"),
    ],
)
def test_bad_other_input(argv, message, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_help_explains_each_command(capsys):
    for cmd in ("run", "list", "describe", "plugins", "leaderboard", "show"):
        with pytest.raises(SystemExit) as exit_info:
            main([cmd, "--help"])
        assert exit_info.value.code == 0
        assert len(capsys.readouterr().out) > 200
