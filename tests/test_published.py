"""results/published: the committed reference study re-renders from its committed rows, and its verdicts follow
the stated rule (benchmarks/study.py)."""

import dataclasses
import importlib.util
import itertools
import json
import re
import sys
from pathlib import Path

import pytest

from bench.cli import main

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
study = importlib.util.module_from_spec(spec)
sys.modules["study"] = study
spec.loader.exec_module(study)

STUDIES = [c for c in study.CLAIMS if (ROOT / c.run_dir / "results.jsonl").is_file()]
# the one field of the render's own time; the md table wraps its provenance at 120 columns, inside the stamp too
RENDERED = re.compile(r"rendered:\s*[0-9T:+\-\s]*[0-9]")


def _unstamped(text: str) -> str:
    return RENDERED.sub("rendered: -", text)


def test_the_study_is_published():
    assert STUDIES, "results/published has no study rows"
    assert (ROOT / study.PUBLISHED / "README.md").is_file() and (ROOT / study.PUBLISHED / "index.html").is_file()


@pytest.mark.parametrize("claim", STUDIES, ids=lambda c: c.name)
@pytest.mark.parametrize("fmt", ["md", "csv", "json"])
def test_bench_leaderboard_re_renders_the_committed_table(claim, fmt, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the tables name their run dir as make leaderboard passes it: relative
    out = tmp_path / f"leaderboard.{fmt}"
    assert main(["leaderboard", str(claim.run_dir), "--format", fmt, "--output", str(out)]) == 0
    committed = (ROOT / claim.run_dir / f"leaderboard.{fmt}").read_text()
    if fmt == "json":
        mine, theirs = json.loads(out.read_text()), json.loads(committed)
        mine["provenance"].pop("rendered"), theirs["provenance"].pop("rendered")
        assert mine == theirs
    else:
        assert _unstamped(out.read_text()) == _unstamped(committed)


def test_re_rendering_the_same_rows_rewrites_no_file(tmp_path, monkeypatch):
    """Only the "rendered" time would differ: the study keeps the committed one, so `make leaderboard` after new rows
    of one study leaves the others' files alone; one row more or less, and the table takes the new time."""
    monkeypatch.chdir(ROOT)
    claim = STUDIES[0]
    committed = json.loads((ROOT / claim.run_dir / "leaderboard.json").read_text())["provenance"]["rendered"]
    ok, failed = study.collected(claim)
    for fmt in study.FORMATS:
        (tmp_path / f"leaderboard.{fmt}").write_bytes((ROOT / claim.run_dir / f"leaderboard.{fmt}").read_bytes())

    same = study.leaderboard.build(ok, failed, [str(claim.run_dir)])
    study.keep_stamp(same, tmp_path)
    assert same.provenance["rendered"] == committed

    fewer = study.leaderboard.build(ok[1:], failed, [str(claim.run_dir)])
    now = fewer.provenance["rendered"]
    study.keep_stamp(fewer, tmp_path)
    assert fewer.provenance["rendered"] == now != committed


def test_readme_verdicts_come_from_the_committed_rows(monkeypatch):
    monkeypatch.chdir(ROOT)
    committed = (ROOT / study.PUBLISHED / "README.md").read_text()
    assert RENDERED.sub("", study.readme(list(study.CLAIMS)) + "\n") == RENDERED.sub("", committed)
    for claim in study.CLAIMS:
        assert f"## {claim.name}" in committed


@pytest.mark.parametrize(
    ("better", "margin", "expected"),
    [
        ([], 0.0, "not run"),
        ([1.0], 0.0, "inconclusive (one seed)"),
        ([0.5, 0.2, 0.9], 0.0, "reproduced"),  # every seed
        ([-0.5, -0.2, -0.9], 0.0, "not reproduced"),
        ([0.0, 0.0, 0.0], 0.0, "not reproduced"),  # no gain at all is not "beats"
        ([0.0, 0.0, 0.0], 0.5, "reproduced"),  # ... but is "within 0.5 of"
        ([-0.3, -0.1, -0.2], 0.5, "reproduced"),
        ([2.0, -1.9, 0.1], 0.0, "inconclusive"),
        ([3.0, 2.8, 3.1, -0.1], 0.0, "reproduced"),  # one seed against, the paired t-test for (p < 0.05)
    ],
)
def test_verdict_rule(better, margin, expected):
    assert study.verdict(better, margin) == expected


def test_paired_differences_respect_the_metrics_direction():
    """Perplexity is lower-is-better: a lower contender is better; sharpness always lower-is-better."""
    from tests.tiny import result_row

    rows = []
    for seed, (mine, base) in enumerate([(20.0, 22.0), (21.0, 22.5)]):
        rows.append(result_row(method="gptq", bits="W4A32", seed=seed, task="wikitext2", score=mine))
        rows.append(result_row(method="rtn", bits="W4A32", seed=seed, task="wikitext2", score=base))
    claim = study.Claim("x", "x", "x", (), (study.Test("gptq", "rtn", "W4A32"),))
    (out,) = study.measure(claim, rows)
    assert out.seeds == [0, 1] and out.better == pytest.approx([2.0, 1.5]) and out.verdict == "reproduced"


def test_a_cell_rerun_under_a_newer_config_supersedes_the_old_row():
    """A plugin whose settings gained a field (gptq.static_groups) reruns its cells under new keys; the study,
    like the table, reads the newest row of each (label, grid, task, seed), whatever order the file has them in."""
    from tests.tiny import result_row

    rows = [
        result_row(method="gptq", bits="W4A32", task="wikitext2", score=18.0, finished="2026-12-01T04:00"),  # new
        result_row(method="gptq", bits="W4A32", task="wikitext2", score=23.0, finished="2026-11-30T21:00"),  # old
        result_row(method="rtn", bits="W4A32", task="wikitext2", score=22.0),
    ]
    claim = study.Claim("x", "x", "x", (), (study.Test("gptq", "rtn", "W4A32"),))
    (out,) = study.measure(claim, rows)
    assert out.contender == [18.0]


@pytest.mark.parametrize(
    ("test", "better", "expected"),
    [
        (
            study.Test("zsaq", "rtn", "W4A8"),
            [-1.0, -1.5, -0.5],
            "zsaq is worse than rtn at W4A8 by 1.00 ± 0.50 points; the claim held on 0 of 3 seeds: **not reproduced**.",
        ),
        (  # the sign of the mean, not of each seed: a mean of magnitudes would read 1.00 here
            study.Test("squat", "lsq", "W2A8", margin=0.5),
            [1.0, -1.0, 0.6],
            "squat is better than lsq at W2A8 by 0.20 ± 1.06 points (0.5 allowed); the claim held on 2 of 3 seeds: "
            "**inconclusive**.",
        ),
        (study.Test("zsaq", "gan", "W4A8", "sharpness"), [], "zsaq flatter than gan at W4A8: not run yet."),
    ],
)
def test_each_outcome_is_said_in_words(test, better, expected):
    out = study.Outcome(test, seeds=list(range(len(better))), better=better)
    assert study.in_words(out, "points") == expected


def _labels_run_by(claim) -> set[str]:
    """The leaderboard labels a claim's runs produce: each method as `bench run` names its variant (the settings
    that differ from its defaults, as bench.grid writes them), plus the reference and the baseline."""
    from bench import plugins
    from bench.grid import _variant, configured

    registry, labels = plugins.default(), {"fp32", "rtn"}
    for args in claim.runs:
        pairs = list(zip(args, args[1:], strict=False))
        sets = dict(value.split("=", 1) for flag, value in pairs if flag == "--set")
        sweeps = dict(value.split("=", 1) for flag, value in pairs if flag == "--sweep")
        for method in args[args.index("--methods") + 1].split(","):
            mine = {k.split(".", 1)[1]: v for k, v in sets.items() if k.startswith(f"{method}.")}
            swept = {k.split(".", 1)[1]: v.split(",") for k, v in sweeps.items() if k.startswith(f"{method}.")}
            points = [dict(zip(swept, values, strict=True)) for values in itertools.product(*swept.values())]
            settings = registry.methods.get(method).Config
            for point in points:
                variant = _variant(settings(), dataclasses.asdict(configured(method, settings, mine, point)))
                labels.add(method + (f"[{variant}]" if variant else ""))
    return labels


@pytest.mark.parametrize("claim", study.CLAIMS, ids=lambda c: c.name)
def test_every_claim_compares_labels_its_runs_produce(claim):
    """A typo in a label ('train_generator=false' for the table's 'False') would read "not run" forever."""
    labels = _labels_run_by(claim)
    for test in claim.tests:
        assert {test.contender, test.rival} <= labels, f"{test.text()}: the runs make {sorted(labels)}"
