"""Every leaderboard format from synthetic rows: files written, best cells marked, LaTeX escaped, plots valid."""

import json
import re

import pytest
from PIL import Image

from bench import plugins
from bench.leaderboard import build
from bench.plots import SHARPNESS, pareto_front, write_plots
from bench.reporters import latex_escape

MB = 2**20
from tiny import result_row as _row  # noqa: E402

SPECIAL = "clip_mse&50%"  # a variant whose label needs LaTeX escaping


def _rows():
    """fp32 reference; rtn (data-free) and gptq (calibration) at W8/W4; gptq scores better, rtn is smaller."""
    rows = [_row("fp32", "FP32", t, s, size=90 * MB, p50=10.0) for t, s in (("sst2", 0.9), ("cola", 0.5))]
    rows.append(_row("fp32", "FP32", "wikitext2", 14.6, size=90 * MB, p50=10.0))
    for method, data, gain, scale in (("rtn", "none", 0.0, 1.0), ("gptq", "calibration", 0.02, 1.1)):
        for w, drop in ((8, 0.01), (4, 0.08)):
            cell = {"data": data, "size": w * 3 * scale * MB, "p50": 4.0 + w * scale, "sharp": 10 * drop - gain}
            cell["kernel"] = f"int{w}pack"  # real kernels: simulated cells have no latency figure
            for seed in (0, 1):
                rows.append(_row(method, f"W{w}A32", "sst2", 0.9 - drop + gain + 0.01 * seed, seed=seed, **cell))
                rows.append(_row(method, f"W{w}A32", "cola", 0.5 - drop + gain, seed=seed, **cell))
                rows.append(_row(method, f"W{w}A32", "wikitext2", 14.6 + 40 * drop - 10 * gain, seed=seed, **cell))
    rows += [
        _row("rtn", "W4A32", t, s, variant=SPECIAL, size=13 * MB, p50=9.0) for t, s in (("sst2", 0.7), ("cola", 0.3))
    ]
    return rows


@pytest.fixture(scope="module")
def board():
    return build(_rows(), [], ["runs/a"])


@pytest.fixture(scope="module")
def rendered(board, tmp_path_factory):
    """Every built-in format rendered once into one directory, as `bench run` leaves a run dir."""
    out = tmp_path_factory.mktemp("board")
    reporters = plugins.load().reporters
    texts = {fmt: reporters.get(fmt)(board, out / f"leaderboard.{fmt}") for fmt in reporters.names()}
    return out, texts


def test_best_per_column_follows_each_metric_direction(board):
    best = board.best()
    assert best[("W4A32", "sst2")] == ("gptq", "calibration")  # accuracy: higher is better
    assert best[("W4A32", "avg")] == ("gptq", "calibration")
    assert best[("W4A32", "wikitext2")] == ("gptq", "calibration")  # perplexity: the lower one
    assert best[("W4A32", "size MB")] == ("rtn", "none")  # size: smaller
    assert best[("W8A32", "p50 ms")] == ("rtn", "none")  # latency: faster
    assert best[("W4A32", SHARPNESS)] == ("gptq", "calibration")  # sharpness: flatter
    assert not any(bits == "FP32" for bits, _ in best)  # the reference is not a contender
    assert board.lower_is_better("wikitext2") and not board.lower_is_better("sst2")


def test_a_lone_value_is_not_marked_best():
    rows = [_row("fp32", "FP32", "sst2", 0.9), _row("rtn", "W4A32", "sst2", 0.8), _row("rtn", "W8A32", "sst2", 0.85)]
    assert build(rows, [], []).best() == {}


def test_every_format_writes_its_files(rendered):
    out, texts = rendered
    for fmt in ("md", "csv", "json", "html", "latex"):
        assert (out / f"leaderboard.{fmt}").read_text().strip() == texts[fmt].strip()
    assert texts["png"] is None
    for name in ("leaderboard-bits.png", "leaderboard-pareto.png", "leaderboard-sharpness.png"):
        assert (out / name).stat().st_size > 10_000


def test_md_bolds_the_best_score_of_each_grid_long_and_every_best_cell_wide(board, rendered, tmp_path):
    _, texts = rendered
    md = texts["md"]  # long by default
    view = board.view("long")
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) % (2 + len(view.table)) == 0  # three tasks: wrapped into tables of the same rows
    assert sum(line.count("**") for line in table) == 2 * len(view.best) and max(map(len, table)) <= 120
    assert {column for _, column in view.best} == {"sst2", "cola", "wikitext2", "avg"}  # scores only
    for index, column in view.best:
        assert f"**{view.table.at[index, column]}**" in md, (column, index)
    assert "**82.50 ± 0.71**" not in md and "**84.50 ± 0.71**" in md  # rtn W4 sst2 loses to gptq
    _, wide = board.write("md", tmp_path / "wide.md", layout="wide")  # the pivot: every column's best
    table = [line for line in wide.splitlines() if line.startswith("|")]
    assert sum(line.count("**") for line in table) == 2 * len(board.best())
    for column, index in board.best().items():
        shown = board.table.at[index, column]
        assert f"**{shown}**" in wide, (column, index)
    assert "**82.50 ± 0.71**" not in wide and "**84.50 ± 0.71**" in wide


def test_html_and_latex_render_the_long_layout_when_asked(board, tmp_path):
    view = board.view("long")
    _, page = board.write("html", tmp_path / "long.html", layout="long")
    marked = re.findall(r'<td[^>]*class="[^"]*\bbest\b[^"]*"[^>]*>([^<]*)</td>', page)
    assert sorted(marked) == sorted(view.table.at[i, c] for i, c in view.best)
    assert ">bits</th>" in page and "best quantized score of its grid" in page
    _, tex = board.write("latex", tmp_path / "long.tex", layout="long")
    assert r"\begin{tabular}{lll" in tex and tex.count(r"\textbf{") == len(view.best)
    assert r"rtn[clip\_mse\&50\%]" in tex


def test_html_marks_best_cells_with_a_class_and_embeds_plots(board, rendered):
    out, texts = rendered
    page = texts["html"]
    marked = re.findall(r'<td[^>]*class="[^"]*\bbest\b[^"]*"[^>]*>([^<]*)</td>', page)
    assert sorted(marked) == sorted(board.table.at[i, c] for c, i in board.best().items())
    for name in ("leaderboard-bits.png", "leaderboard-pareto.png", "leaderboard-sharpness.png"):
        assert f'<img src="{name}"' in page and (out / name).exists()
    assert "model</dt><dd>m (package:x)" in page and "offline:y" in page and "torch</dt>" in page


def test_json_flags_the_best_cells(rendered):
    _, texts = rendered
    data = json.loads(texts["json"])
    gptq = next(e for e in data["leaderboard"] if e["method"] == "gptq")
    rtn = next(e for e in data["leaderboard"] if e["method"] == "rtn")
    assert gptq["scores"]["W4A32"]["sst2"]["best"] is True and "best" not in rtn["scores"]["W4A32"]["sst2"]
    assert rtn["scores"]["W4A32"]["size MB"]["best"] is True


def test_latex_is_booktabs_escaped_and_bolds_the_best(board, rendered):
    _, texts = rendered
    tex = texts["latex"]
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\multicolumn"):
        assert rule in tex
    assert r"rtn[clip\_mse\&50\%]" in tex and SPECIAL not in tex
    assert r"84.50 $\pm$ 0.71" in tex and "±" not in tex.split(r"\begin{table}")[1]
    assert tex.count(r"\textbf{") == len(board.best())


def test_latex_escape_handles_every_special_character():
    assert latex_escape(r"a_b&c%d$e#f{g}h~i^j\k") == (
        r"a\_b\&c\%d\$e\#f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k"
    )


def test_plots_are_valid_images(rendered):
    out, _ = rendered
    for name in ("leaderboard-bits.png", "leaderboard-pareto.png", "leaderboard-sharpness.png"):
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 250
            assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(256)) > 10  # not a blank canvas


def test_no_sharpness_plot_without_the_column_and_nothing_for_an_empty_board(tmp_path):
    unmeasured = [{**r, "sharpness": None} for r in _rows()]  # a run with --no-sharpness
    written = write_plots(build(unmeasured, [], []), tmp_path, "b")
    assert [p.name for p in written] == ["b-bits.png", "b-pareto.png"]
    assert write_plots(build([], [], []), tmp_path, "e") == []
    page = plugins.load().reporters.get("html")(build([], [], []), tmp_path / "e.html")
    assert "no finished cells" in page and "<img" not in page


@pytest.mark.parametrize(
    ("scores", "higher", "front"),
    [
        ([50, 60, 55, 70], True, [0, 1, 3]),  # costs 1..4: the 55 at cost 3 is beaten by the 60 at cost 2
        ([20, 15, 18, 10], False, [0, 1, 3]),  # lower is better (perplexity)
    ],
)
def test_pareto_front(scores, higher, front):
    assert pareto_front([1, 2, 3, 4], scores, higher) == front
    assert pareto_front([2, 1], [5, 5], True) == [1]  # same score, cheaper wins
