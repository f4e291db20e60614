"""Built-in leaderboard formats (md, csv, json, html, latex, png), registered as an ordinary reporter plugin.

A reporter is ``render(board, path) -> str | None``: it writes ``path`` and returns text to print (None for
png, which writes its figures next to ``path``). The text tables render ``board.view(layout)``: md long by
default (the table ``bench run`` prints), html and latex wide, any of them as ``board.layout`` asks; csv and json
keep one layout. Every format marks the best cells ``Leaderboard.best`` decides (long: each grid's best scores).
"""

from __future__ import annotations

import html
import json
import re
import textwrap
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from bench import hookimpl
from bench.leaderboard import COSTS, Leaderboard, View

WIDTH = 120  # the long md table fits a terminal this wide: method labels are cut to fit (the notes give them whole)
MIN_LABEL = 12  # ... but never below this
LEGEND = {
    "long": "best quantized score of its grid",
    "wide": "best quantized value of the column",
}


def _marked(view: View, mark, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """The view's table (or ``table``: it escaped) with ``mark(text)`` applied to each cell it marks best."""
    table = (view.table if table is None else table).copy()
    for index, column in view.best:
        table.at[index, column] = mark(table.at[index, column])
    return table


def _md_table(view: View, groups: list[list] | None = None, wrap: bool = False) -> str:
    """The view's md table; the long one as one pipe table per group of columns (default: one of all), each
    repeating the row labels, and with ``wrap`` a group wider than ``WIDTH`` in as many tables as it takes."""
    table = view.flat(_marked(view, lambda text: f"**{text}**"))
    if not view.long:
        return table.to_markdown(index=False, disable_numparse=True)
    keys = list(table.columns[: len(view.table.index.names)])
    parts = []
    for group in groups or [list(view.table.columns)]:
        parts.append([*keys, group[0]])
        for column in group[1:]:
            if wrap and _width(_pipe_table(table[[*parts[-1], column]])) > WIDTH:
                parts.append([*keys])
            parts[-1].append(column)
    return "\n\n".join(_pipe_table(table[columns]) for columns in parts)


def _pipe_table(table: pd.DataFrame) -> str:
    """A markdown pipe table whose columns are as wide as their widest cell (tabulate pads each header by two more:
    twenty columns of a 120-column terminal, where the wide table keeps its old look)."""
    header = [str(c) for c in table.columns]
    rows = [[str(v) for v in row] for row in table.itertuples(index=False)]
    widths = [max(map(len, column)) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def _width(text: str) -> int:
    return max(map(len, text.splitlines()))


def _fitted(view: View) -> tuple[View, str]:
    """The long view's md table fitted to ``WIDTH``, in the first of these ways that fits: as it is; method labels
    cut (``…#k``, given whole in the view's notes, never below ``MIN_LABEL``); split into a table of the scores and
    one of the costs (size, latency, method time), labels cut as far as that needs; the split tables, labels cut to
    ``MIN_LABEL``, each wrapped into as many tables as it takes (many tasks)."""
    columns = list(view.table.columns)
    costs = [c for c in columns if c in COSTS]
    splits = [[columns]]
    if costs and len(costs) < len(columns):
        splits.append([[c for c in columns if c not in costs], costs])
    longest = max(len(index[0]) for index in view.table.index)
    for groups in splits:
        excess = _width(_md_table(view, groups)) - WIDTH
        if excess <= longest - MIN_LABEL or excess <= 0:
            fitted = view.abbreviated(longest - excess) if excess > 0 else view
            return fitted, _md_table(fitted, groups)
    fitted = view.abbreviated(MIN_LABEL)
    return fitted, _md_table(fitted, splits[-1], wrap=True)


def _wrapped(text: str, first: str = "") -> str:
    """``text`` in lines of at most ``WIDTH`` (a markdown list item's lines indented under its first), never
    breaking a word: a long path stays whole."""
    indent = " " * len(first)
    return textwrap.fill(
        text, WIDTH, initial_indent=first, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


def render_md(board: Leaderboard, path: Path) -> str:
    """Markdown table, long by default (a row per method x grid, fits 120 columns: the table ``bench run``
    prints); best quantized score of each grid in bold (wide: best non-FP32 value of each column)."""
    layout = board.layout or "long"
    lines = ["# quantbench leaderboard", ""]
    notes = list(board.notes)
    if board.table.empty:
        lines.append("_no finished cells_")
    else:
        view = board.view(layout)
        view, table = _fitted(view) if layout == "long" else (view, _md_table(view))
        lines.append(table)
        if view.best:
            lines += ["", f"**bold** = {LEGEND[layout]}"]
        notes = view.notes + notes
    lines += ["", *(_wrapped(note, "- ") for note in notes), "", "<sub>"]
    lines.append(_wrapped(" · ".join(f"{k}: {v}" for k, v in board.provenance.items())))
    lines.append("</sub>")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def render_csv(board: Leaderboard, path: Path) -> str:
    """The numbers (means over seeds), one row per method, one column per bit-width x task."""
    means = board.means.copy()
    if not means.empty:
        means.columns = board.flat_columns()
    text = means.reset_index().to_csv(index=False, float_format="%.4f")
    path.write_text(text)
    return text


def render_json(board: Leaderboard, path: Path) -> str:
    """Every cell's mean, std and n over seeds, by method, bit-width and column; best cells flagged; notes."""
    entries = []
    for i, (method, data) in enumerate(board.means.index):
        cells = {}
        for j, (bits, task) in enumerate(board.means.columns):
            mean = board.means.iat[i, j]
            if mean == mean:  # not NaN
                std = board.stds.iat[i, j]
                cells.setdefault(bits, {})[task] = {
                    "mean": float(mean),
                    "std": None if std != std else float(std),
                    "n": int(board.counts.iat[i, j]),
                }
        entries.append({"method": method, "data_used": data, "scores": cells})
    for (bits, column), (method, data) in board.best().items():
        entry = next(e for e in entries if (e["method"], e["data_used"]) == (method, data))
        entry["scores"][bits][column]["best"] = True
    text = json.dumps({"leaderboard": entries, "notes": board.notes, "provenance": board.provenance}, indent=2)
    path.write_text(text + "\n")
    return text


def _html_table(view: View | None) -> str:
    """The table with the best cells in class ``best`` and the reference row in class ``reference``."""
    if view is None:
        return "<p>no finished cells</p>"
    classes = pd.DataFrame("", index=view.table.index, columns=view.table.columns)
    for i, reference in enumerate(view.reference):
        if reference:
            classes.iloc[i, :] = "reference"
    for index, column in view.best:
        classes.at[index, column] = "best"
    styler = (
        view.table.style.set_uuid("leaderboard")
        .set_td_classes(classes)
        .set_table_attributes('class="leaderboard"')
        .format(escape="html")
        .format_index(escape="html", axis=0)
        .format_index(escape="html", axis=1)
    )
    return styler.to_html()


def _figures(board: Leaderboard, path: Path) -> str:
    """Draws the plots next to the page and embeds them by relative name, so the folder can be moved as a whole."""
    from bench import plots

    images = plots.write_plots(board, path.parent, path.stem)
    return "".join(
        f'<figure><img src="{html.escape(quote(image.name))}" alt="{html.escape(image.stem)}">'
        f"<figcaption>{html.escape(image.stem)}</figcaption></figure>"
        for image in images
    )


def render_html(board: Leaderboard, path: Path) -> str:
    """A self-contained page (table, notes, plots, provenance footer) for the run dir; the wide table unless the
    board asks for the long one."""
    layout = board.layout or "wide"
    view = None if board.table.empty else board.view(layout)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in (view.notes if view else []) + board.notes)
    footer = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in board.provenance.items())
    legend = f'<p class="legend"><span class="best">highlighted</span> = {LEGEND[layout]}</p>'
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>quantbench leaderboard</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table.leaderboard {{ border-collapse: collapse; }}
table.leaderboard th, table.leaderboard td {{ padding: .3rem .7rem; border-bottom: 1px solid #ddd; text-align: right;
  white-space: nowrap; }}
.scroll {{ overflow-x: auto; }}
table.leaderboard td.best, .legend .best {{ font-weight: bold; background: #e6f4ea; }}
table.leaderboard td.reference {{ color: #555; font-style: italic; }}
figure {{ display: inline-block; margin: 1rem 1rem 0 0; }}
figure img {{ max-width: 100%; }}
figcaption {{ font-size: .8rem; color: #666; }}
footer {{ margin-top: 2rem; font-size: .8rem; color: #666; }}
dt {{ font-weight: bold; }} dd {{ margin: 0 0 .3rem 1rem; }}
</style></head><body>
<h1>quantbench leaderboard</h1>
<div class="scroll">{_html_table(view)}</div>
{legend if view and view.best else ""}
<ul class="notes">{notes}</ul>
<section class="plots">{_figures(board, path)}</section>
<footer><dl>{footer}</dl></footer>
</body></html>
"""
    path.write_text(page)
    return page


LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: object) -> str:
    """Escape LaTeX's special characters in one pass (so the braces of ``\\textbackslash{}`` stay braces)."""
    escaped = re.sub(r"[\\&%$#_{}~^]", lambda m: LATEX_SPECIAL[m.group()], str(text))
    return escaped.replace("±", r"$\pm$")


def render_latex(board: Leaderboard, path: Path) -> str:
    """A booktabs table for papers (needs ``\\usepackage{booktabs}``); best quantized value per column in bold (the
    wide table unless the board asks for the long one).

    Every label and value is escaped here, then pandas is told not to escape again, so ``\\textbf`` survives.
    """
    layout = board.layout or "wide"
    view = None if board.table.empty else board.view(layout)
    lines = ["% quantbench leaderboard; needs \\usepackage{booktabs}"]
    lines += [f"% {note}" for note in (view.notes if view else []) + board.notes]
    lines += [f"% {key}: {value}" for key, value in board.provenance.items()]
    if view is None:
        lines.append("% no finished cells")
    else:
        table = _marked(view, lambda text: f"\\textbf{{{text}}}", view.table.map(latex_escape))
        table.index = pd.MultiIndex.from_tuples(
            [tuple(map(latex_escape, i)) for i in table.index], names=list(map(latex_escape, table.index.names))
        )
        if isinstance(table.columns, pd.MultiIndex):
            table.columns = pd.MultiIndex.from_tuples(
                [tuple(map(latex_escape, c)) for c in table.columns],
                names=list(map(latex_escape, table.columns.names)),
            )
        else:
            table.columns = [latex_escape(c) for c in table.columns]
        lines.append(
            table.to_latex(
                escape=False,
                multicolumn=True,
                multicolumn_format="c",
                multirow=False,
                column_format="l" * table.index.nlevels + "r" * len(table.columns),
                caption=f"quantbench leaderboard (bold: {LEGEND[layout]})",
                label="tab:quantbench",
            ).rstrip()
        )
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def render_png(board: Leaderboard, path: Path) -> None:
    """Writes ``{stem}-bits.png``, ``{stem}-pareto.png`` (and ``{stem}-sharpness.png``) next to ``path``."""
    from bench import plots

    plots.write_plots(board, path.parent, path.stem)
    return None


@hookimpl
def register_reporters(register):
    register("md", render_md, aliases=("markdown",))
    register("csv", render_csv)
    register("json", render_json)
    register("html", render_html)
    register("latex", render_latex, aliases=("tex",))
    register("png", render_png)
