"""Built-in leaderboard formats (md, csv, json, html, latex, png), registered as an ordinary reporter plugin.

A reporter is ``render(board, path) -> str | None``: it writes ``path`` and returns text to print (None for
png, which writes its figures next to ``path``). Every format marks the same best cells: ``Leaderboard.best``.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from bench import hookimpl
from bench.leaderboard import Leaderboard


def _marked(board: Leaderboard, table: pd.DataFrame, mark) -> pd.DataFrame:
    """``table`` (the display table, maybe escaped) with ``mark(text)`` applied to each column's best cell."""
    table = table.copy()
    for column, index in board.best().items():
        table.at[index, column] = mark(table.at[index, column])
    return table


def _flat(table: pd.DataFrame, board: Leaderboard) -> pd.DataFrame:
    table = table.copy()
    table.columns = board.flat_columns()
    return table.reset_index()


def render_md(board: Leaderboard, path: Path) -> str:
    """Markdown table, best non-FP32 value of each column in bold."""
    lines = ["# quantbench leaderboard", ""]
    if board.table.empty:
        lines.append("_no finished cells_")
    else:
        bold = _flat(_marked(board, board.table, lambda text: f"**{text}**"), board)
        lines.append(bold.to_markdown(index=False, disable_numparse=True))
    if board.best():
        lines += ["", "**bold** = best quantized value of the column"]
    lines += ["", *(f"- {note}" for note in board.notes), "", "<sub>"]
    lines.append(" · ".join(f"{k}: {v}" for k, v in board.provenance.items()))
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


def _html_table(board: Leaderboard) -> str:
    """The table with the best cell of each column in class ``best`` and the reference row in class ``reference``."""
    if board.table.empty:
        return "<p>no finished cells</p>"
    classes = pd.DataFrame("", index=board.table.index, columns=board.table.columns)
    for i, index in enumerate(board.table.index):
        if board.is_reference(index):
            classes.iloc[i, :] = "reference"
    for column, index in board.best().items():
        classes.at[index, column] = "best"
    styler = (
        board.table.style.set_uuid("leaderboard")
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
    """A self-contained page (table, notes, plots, provenance footer) for the run dir."""
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in board.notes)
    footer = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in board.provenance.items())
    legend = '<p class="legend"><span class="best">highlighted</span> = best quantized value of the column</p>'
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
<div class="scroll">{_html_table(board)}</div>
{legend if board.best() else ""}
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
    """A booktabs table for papers (needs ``\\usepackage{booktabs}``); best quantized value per column in bold.

    Every label and value is escaped here, then pandas is told not to escape again, so ``\\textbf`` survives.
    """
    lines = ["% quantbench leaderboard; needs \\usepackage{booktabs}"]
    lines += [f"% {note}" for note in board.notes]
    lines += [f"% {key}: {value}" for key, value in board.provenance.items()]
    if board.table.empty:
        lines.append("% no finished cells")
    else:
        table = _marked(board, board.table.map(latex_escape), lambda text: f"\\textbf{{{text}}}")
        table.index = pd.MultiIndex.from_tuples(
            [tuple(map(latex_escape, i)) for i in table.index], names=list(map(latex_escape, table.index.names))
        )
        table.columns = pd.MultiIndex.from_tuples(
            [tuple(map(latex_escape, c)) for c in table.columns], names=list(map(latex_escape, table.columns.names))
        )
        lines.append(
            table.to_latex(
                escape=False,
                multicolumn=True,
                multicolumn_format="c",
                multirow=False,
                column_format="ll" + "r" * len(table.columns),
                caption="quantbench leaderboard (bold: best quantized value of the column)",
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
