"""The leaderboard table from synthetic rows: layout, seeds, variants, grids, formats."""

import json

import pytest
from tiny import result_row

from bench import plugins
from bench.leaderboard import build


def _row(method, bits, task, seed, score, **kw):
    return result_row(method, bits, task, score, seed=seed, **kw)


@pytest.fixture
def board():
    rows = [
        _row("fp32", "FP32", "sst2", 0, 0.90),
        _row("fp32", "FP32", "sst2", 1, 0.92),
        _row("rtn", "W4A32", "sst2", 0, 0.80),
        _row("rtn", "W4A32", "sst2", 1, 0.84),
        _row("rtn", "W8A32", "sst2", 0, 0.89),
        _row("rtn", "W8A32", "sst2", 1, 0.91),
        _row("rtn", "W4A32", "sst2", 0, 0.86, variant="clip=mse"),
        _row("rtn", "W4A32 g128", "sst2", 0, 0.85),
        _row("rtn", "W4A32", "wikitext2", 0, 21.5, kind="language-modeling"),
    ]
    return build(rows, [], ["runs/a"])


def test_layout_and_aggregation(board):
    assert list(board.table.index) == [("fp32", "none"), ("rtn", "none"), ("rtn[clip=mse]", "none")]
    assert board.table.loc[("fp32", "none"), ("FP32", "sst2")] == "91.00 ± 1.41"  # x100, mean ± sample std
    assert board.table.loc[("rtn", "none"), ("W4A32", "sst2")] == "82.00 ± 2.83"
    assert board.table.loc[("rtn[clip=mse]", "none"), ("W4A32", "sst2")] == "86.00"
    assert board.table.loc[("rtn", "none"), ("W4A32 g128", "sst2")] == "85.00"
    assert board.table.loc[("rtn", "none"), ("W4A32", "wikitext2")] == "21.50"  # perplexity is not scaled
    first = board.table.columns[0]
    assert first[0] == "FP32"
    order = [c[0] for c in board.table.columns]
    assert order.index("W8A32") < order.index("W4A32") < order.index("W4A32 g128")


def test_reporters_render(board, tmp_path):
    reporters = plugins.load().reporters
    md = reporters.get("md")(board, tmp_path / "b.md")
    assert "| rtn[clip=mse]" in md and "W4A32 sst2" in md and "offline:y" in md
    data = json.loads(reporters.get("json")(board, tmp_path / "b.json"))
    rtn = next(e for e in data["leaderboard"] if e["method"] == "rtn")
    assert rtn["scores"]["W4A32"]["sst2"] == {
        "mean": pytest.approx(82.0),
        "std": pytest.approx(2.828, abs=1e-3),
        "n": 2,
    }
    csv = reporters.get("csv")(board, tmp_path / "b.csv")
    assert csv.splitlines()[0].startswith("method,data,FP32 sst2")
    html = reporters.get("html")(board, tmp_path / "b.html")
    assert "<table" in html and "rtn[clip=mse]" in html and "quantbench" in html


def test_newest_row_wins_when_a_cell_was_rerun_differently():
    rows = [_row("rtn", "W4A32", "sst2", 0, 0.5, finished="1"), _row("rtn", "W4A32", "sst2", 0, 0.7, finished="2")]
    board = build(rows, [], [])
    assert board.table.loc[("rtn", "none"), ("W4A32", "sst2")] == "70.00"
    assert any("newest row" in n for n in board.notes)


def test_average_only_over_percent_tasks_and_models_never_mixed():
    rows = [
        _row("rtn", "W4A32", "sst2", 0, 0.80),
        _row("rtn", "W4A32", "cola", 0, 0.40),
        _row("rtn", "W4A32", "wikitext2", 0, 20.0, kind="language-modeling"),
    ]
    board = build(rows, [], [])
    assert board.table.loc[("rtn", "none"), ("W4A32", "avg")] == "60.00"
    other = {**_row("rtn", "W4A32", "sst2", 0, 0.5), "model": "other"}
    board = build([rows[0], other], [], [])
    assert sorted(board.table.index) == [("rtn @m", "none"), ("rtn @other", "none")]


def test_empty_board():
    board = build([], [], [])
    assert board.table.empty and "no finished cells yet" in board.notes


def test_compression_column_and_an_outside_reporter(tmp_path, monkeypatch, capsys):
    import types

    from bench import hookimpl, plugins
    from bench.cli import main
    from bench.results import ResultStore

    rows = [
        _row("fp32", "FP32", "sst2", 0, 0.9, size=80, fp32_size=80),
        _row("rtn", "W4A32", "sst2", 0, 0.8, size=20, fp32_size=80),
    ]
    board = build(rows, [], [])
    assert board.table.loc[("rtn", "none"), ("W4A32", "compression")] == "x4.00"
    assert board.table.loc[("fp32", "none"), ("FP32", "compression")] == "x1.00"

    @hookimpl
    def register_reporters(register):  # what an outside package's module would hold
        register("tsv", lambda board, path: path.write_text(board.table.to_csv(sep="\t")) and "tsv written")

    module = types.ModuleType("tsvplugin")
    module.register_reporters = register_reporters
    loaded = plugins.load(extra=[("tsvplugin", module)])
    monkeypatch.setattr(plugins, "default", lambda: loaded)
    store = ResultStore(tmp_path / "run")
    for row in rows:
        store.append({**row, "key": row["method"]})
    assert main(["leaderboard", str(tmp_path / "run"), "--format", "tsv"]) == 0
    assert "tsv written" in capsys.readouterr().out
    assert "compression" in (tmp_path / "run" / "leaderboard.tsv").read_text()
