"""Built-in leaderboard formats (md, csv, json, html), registered as an ordinary reporter plugin.

A reporter is ``render(board, path) -> str | None``: it writes ``path`` and returns text to print.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from bench import hookimpl
from bench.leaderboard import Leaderboard


def _flat(board: Leaderboard):
    table = board.table.copy()
    table.columns = board.flat_columns()
    return table.reset_index()


def render_md(board: Leaderboard, path: Path) -> str:
    lines = ["# quantbench leaderboard", ""]
    lines.append(
        _flat(board).to_markdown(index=False, disable_numparse=True) if not board.table.empty else "_no finished cells_"
    )
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
    text = json.dumps({"leaderboard": entries, "notes": board.notes, "provenance": board.provenance}, indent=2)
    path.write_text(text + "\n")
    return text


def render_html(board: Leaderboard, path: Path) -> str:
    table = (
        board.table.to_html(classes="leaderboard", border=0) if not board.table.empty else "<p>no finished cells</p>"
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in board.notes)
    footer = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in board.provenance.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>quantbench leaderboard</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table.leaderboard {{ border-collapse: collapse; }}
table.leaderboard th, table.leaderboard td {{ padding: .3rem .7rem; border-bottom: 1px solid #ddd; text-align: right; }}
footer {{ margin-top: 2rem; font-size: .8rem; color: #666; }}
dt {{ font-weight: bold; }} dd {{ margin: 0 0 .3rem 1rem; }}
</style></head><body>
<h1>quantbench leaderboard</h1>
{table}
<ul class="notes">{notes}</ul>
<footer><dl>{footer}</dl></footer>
</body></html>
"""
    path.write_text(page)
    return page


@hookimpl
def register_reporters(register):
    register("md", render_md, aliases=("markdown",))
    register("csv", render_csv)
    register("json", render_json)
    register("html", render_html)
