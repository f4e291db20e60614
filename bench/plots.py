"""Leaderboard plots (PNG): score vs bit-width, score vs latency/size with the Pareto front, sharpness vs score.

Drawn from ``Leaderboard.means`` (the numbers behind the table) so the plots and the table never disagree.
matplotlib's object API on an Agg canvas, never pyplot: no global backend switch, no figure left open in a
long process, and it works on a machine with no display.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.leaderboard import AVERAGE, LATENCY, SHARPNESS, SIZE, Leaderboard

PANEL = (4.6, 3.4)  # inches per panel
DPI = 110


def write_plots(board: Leaderboard, directory: Path, stem: str = "leaderboard") -> list[Path]:
    """Write ``{stem}-bits.png``, ``{stem}-pareto.png`` and (with a sharpness column) ``{stem}-sharpness.png``.

    Returns the files written, in that order: the HTML page embeds exactly these. A plot with nothing to
    draw (no quantized cells, no latency or size, no sharpness) is skipped rather than drawn empty.
    """
    if board.means.empty:
        return []
    points = _points(board)
    written = []
    for suffix, draw in (("bits", draw_bits), ("pareto", draw_pareto), (SHARPNESS, draw_sharpness)):
        figure = draw(board, points)
        if figure is None:
            continue
        path = Path(directory) / f"{stem}-{suffix}.png"
        FigureCanvasAgg(figure)
        figure.savefig(path, dpi=DPI, bbox_inches="tight")
        written.append(path)
    return written


def _points(board: Leaderboard) -> pd.DataFrame:
    """One row per (method, data, bits): the long table's numbers (tasks, avg, size, latency, ...) + series."""
    wide = board.long(board.means).reset_index()
    several_data = wide.groupby("method").data.nunique()
    wide["series"] = [
        _plain(m if several_data[m] == 1 else f"{m} ({d})") for m, d in zip(wide.method, wide.data, strict=True)
    ]
    parsed = [_parse_bits(b) for b in wide.bits]
    wide["w"] = [p[0] for p in parsed]
    wide["variant"] = [p[1] for p in parsed]
    return wide


def _plain(label: str) -> str:
    """A label matplotlib shows as typed: a pair of '$' in a method variant would otherwise start math mode."""
    return label.replace("$", r"\$")


def _parse_bits(label: str) -> tuple[float | None, str]:
    """'W4A8 g128' -> (4, 'A8 g128'); activations left in float (A32) are not named. FP32 -> (None, '')."""
    m = re.match(r"W(\d+)A(\d+)\s*(.*)", label)
    if not m:
        return None, ""
    w, a, rest = m.groups()
    return float(w), " ".join(part for part in (f"A{a}" if a != "32" else "", rest) if part)


def _score_columns(board: Leaderboard) -> list[str]:
    """Every task column, plus the average when there is one."""
    tasks = {r["task"] for r in board.rows}
    present = list(dict.fromkeys(column for _, column in board.means.columns))
    return [c for c in present if c in tasks] + ([AVERAGE] if AVERAGE in present else [])


def _headline_columns(board: Leaderboard) -> list[str]:
    """The scores a trade-off plot shows: the average stands in for the tasks it averages (perplexities stay)."""
    columns = _score_columns(board)
    if AVERAGE not in columns:
        return columns
    averaged = {task for task, s in board.scoring.items() if s.averaged}
    return [AVERAGE] + [c for c in columns if c != AVERAGE and c not in averaged]


def _score_label(board: Leaderboard, column: str) -> str:
    direction = "lower" if board.lower_is_better(column) else "higher"
    if column == AVERAGE:
        return f"average score x100 ({direction} is better)"
    row = next(r for r in board.rows if r["task"] == column)
    scale = " x100" if column in board.scoring and board.scoring[column].percent else ""
    return f"{column} {row.get('primary_metric', 'score')}{scale} ({direction} is better)"


def _colors(points: pd.DataFrame) -> dict[str, str]:
    """One color per method series, the same in every figure."""
    return {series: f"C{i % 10}" for i, series in enumerate(dict.fromkeys(points.series))}


def _grid(count: int, columns: int) -> Figure:
    rows = -(-count // columns)
    figure = Figure(figsize=(PANEL[0] * min(count, columns), PANEL[1] * rows), layout="constrained")
    figure.subplots(rows, min(count, columns), squeeze=False)
    for ax in figure.axes[count:]:
        ax.set_visible(False)
    return figure


def draw_bits(board: Leaderboard, points: pd.DataFrame) -> Figure | None:
    """Score vs weight bits, one line per method (and activation bits / grouping), one panel per task.

    FP32 is a dashed horizontal reference: it has no bit-width to sit at.
    """
    columns = [c for c in _score_columns(board) if points.loc[points.w.notna(), c].notna().any()]
    if not columns:
        return None
    figure = _grid(len(columns), 3)
    colors = _colors(points)
    for ax, column in zip(figure.axes, columns, strict=False):
        for _, ref in points[points.w.isna() & points[column].notna()].iterrows():
            ax.axhline(ref[column], color=colors[ref.series], linestyle="--", linewidth=1, label=ref.series)
        quantized = points[points.w.notna() & points[column].notna()]
        for (series, variant), line in quantized.groupby(["series", "variant"], sort=False):
            line = line.sort_values("w")
            style = "-" if not variant else ":"
            label = f"{series} {variant}".strip()
            ax.plot(line.w, line[column], style, marker="o", color=colors[series], label=label)
        ax.set_xticks(sorted(quantized.w.unique()))
        ax.set_xlabel("weight bits")
        ax.set_ylabel(_score_label(board, column), fontsize=8)
        ax.set_title(column)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure


def pareto_front(costs: list[float], scores: list[float], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and score, sorted by cost.

    Why it is drawn: a method is worth its bits only if nothing is both cheaper and better.
    """
    sign = 1 if higher_is_better else -1
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -sign * scores[i]))
    front, best = [], None
    for i in order:
        if best is None or sign * scores[i] > best:
            front.append(i)
            best = sign * scores[i]
    return front


def draw_pareto(board: Leaderboard, points: pd.DataFrame) -> Figure | None:
    """Score vs latency p50 and score vs size, one row per headline score, Pareto front drawn."""
    costs = [c for c in (LATENCY, SIZE) if c in points.columns and points[c].notna().any()]
    scores = [c for c in _headline_columns(board) if c in points.columns]
    pairs = [(s, c) for s in scores for c in costs if (points[s].notna() & points[c].notna()).any()]
    if not pairs:
        return None
    figure = _grid(len(pairs), len(costs))
    colors = _colors(points)
    for ax, (score, cost) in zip(figure.axes, pairs, strict=False):
        _scatter_with_front(ax, points, cost, score, colors, board.lower_is_better(score))
        ax.set_xlabel("p50 latency (ms)" if cost == LATENCY else "model size (MB)")
        ax.set_ylabel(_score_label(board, score), fontsize=8)
        ax.set_title(f"{score} vs {'latency' if cost == LATENCY else 'size'}")
    return figure


def _scatter_with_front(ax, points: pd.DataFrame, x: str, y: str, colors: dict, lower_is_better: bool) -> None:
    cells = points[points[x].notna() & points[y].notna()].reset_index(drop=True)
    for series, group in cells.groupby("series", sort=False):
        ax.scatter(group[x], group[y], color=colors[series], label=series, zorder=3)
    for _, cell in cells.iterrows():
        ax.annotate(cell.bits, (cell[x], cell[y]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = cells.iloc[pareto_front(list(cells[x]), list(cells[y]), not lower_is_better)]
    if len(front) > 1:
        ax.step(front[x], front[y], where="post", color="0.4", linestyle="--", linewidth=1, label="Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def draw_sharpness(board: Leaderboard, points: pd.DataFrame) -> Figure | None:
    """Sharpness vs score, one panel per headline score: do flatter quantized models score better?"""
    if SHARPNESS not in points.columns or not points[SHARPNESS].notna().any():
        return None
    scores = [c for c in _headline_columns(board) if (points[c].notna() & points[SHARPNESS].notna()).any()]
    if not scores:
        return None
    figure = _grid(len(scores), 3)
    colors = _colors(points)
    for ax, score in zip(figure.axes, scores, strict=False):
        cells = points[points[SHARPNESS].notna() & points[score].notna()]
        for series, group in cells.groupby("series", sort=False):
            ax.scatter(group[SHARPNESS], group[score], color=colors[series], label=series, zorder=3)
        for _, cell in cells.iterrows():
            ax.annotate(
                cell.bits, (cell[SHARPNESS], cell[score]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xlabel("sharpness (lower = flatter)")
        ax.set_ylabel(_score_label(board, score), fontsize=8)
        ax.set_title(f"{score} vs sharpness")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure
