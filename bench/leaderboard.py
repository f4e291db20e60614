"""Results -> one leaderboard, computed once and shown in two layouts: long (``Leaderboard.long``: a row per
method x bit-width (WxAy), a column per task score, difference and measure; the table a person reads, 120
columns) and wide (``Leaderboard.table``: a row per method, columns per bit-width x task and measure).

How a task's score reads comes from what its metric's plugin registered (``register(name, fn,
higher_is_better=..., percent=...)``): fractions registered as percent are shown x100 (GLUE's convention) and
averaged together, and each column's best cell is the highest or the lowest by the metric's direction. The
reference and baseline rows are found by the role their method class declared (recorded in each row). Several
seeds are shown as mean ± std. Reporter plugins (``bench.reporters`` and outside ones) turn the ``Leaderboard``
into files; the table itself is built once, here.
"""

from __future__ import annotations

import os
import re
import sys
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from bench import provenance
from bench.api import FLOAT_BITS
from bench.errors import BenchError, unknown
from bench.results import ResultStore, latest_run_dir

AVERAGE = "avg"
SIZE, LATENCY, SPEEDUP, SHARPNESS = "size MB", "p50 ms", "speedup", "sharpness"
# a latency timed while other processes kept more than this many cores busy is marked: not a speed figure
CONTENDED_CORES, CONTENDED_MARK = 0.5, "†"
COMPRESSION = "compression"  # FP32 bytes / stored bytes of the same model
METHOD_TIME = "method s"  # seconds inside Method.quantize (bench.metrics.cost), apart from eval/sharpness/latency
DELTA = "Δ"  # "Δfp32" / "Δrtn": a cell's score minus the reference's / the baseline's, same task and seed
DECODE = "decode ms"  # decoders: one generated token on a 128-token KV cache (p50); p50 ms is then the prefill
TIMED = (LATENCY, DECODE, METHOD_TIME)  # the measures in seconds, which other processes on the machine inflate
# kernel labels of bench.quant.kernels that are no low-bit kernel: float layers only, or fake-quant on float matmuls
REAL_KERNELS_EXCLUDE = ("fp32", "simulated")
# columns where a smaller number is better (besides task scores whose metric is registered lower-is-better)
LOWER_IS_BETTER = (SIZE, LATENCY, DECODE, SHARPNESS, METHOD_TIME)
# what a cell measured besides its scores: the long layout shows their means (the spread of a size or a timing
# over seeds says little), and folds compression into size and speedup into latency
MEASURES = (SHARPNESS, SIZE, COMPRESSION, LATENCY, DECODE, SPEEDUP, METHOD_TIME)
FOLDED = {COMPRESSION: SIZE, SPEEDUP: LATENCY}  # long layout: column -> the column its figure is shown in
COSTS = (SIZE, LATENCY, DECODE, METHOD_TIME)  # the long layout's columns of what a cell costs, beside its scores
LAYOUTS = ("long", "wide")


@dataclass(frozen=True)
class Scoring:
    """How a task's primary score reads in the table: what its metric's plugin registered."""

    higher_is_better: bool = True
    percent: bool = False  # a fraction shown x100; percent scores that are higher-is-better are averaged together
    registered: bool = True  # False: no installed plugin registers the metric (shown as stored, higher taken as better)

    @property
    def scale(self) -> int:
        return 100 if self.percent else 1

    @property
    def averaged(self) -> bool:
        return self.percent and self.higher_is_better


def scoring(rows: list[dict], metrics=None) -> dict[str, Scoring]:
    """Per task of ``rows``: the direction and scale its primary metric was registered with (``metrics``: a metric
    registry; default: the installed plugins')."""
    if metrics is None:
        from bench import plugins

        metrics = plugins.default().metrics
    out: dict[str, Scoring] = {}
    for row in rows:
        metric = row.get("primary_metric")
        if row["task"] in out:
            continue
        if metric in metrics:
            meta = metrics.entry(metric).meta
            out[row["task"]] = Scoring(bool(meta.get("higher_is_better", True)), bool(meta.get("percent", False)))
        else:
            out[row["task"]] = Scoring(registered=False)
    return out


@dataclass
class Leaderboard:
    table: pd.DataFrame  # display strings of the wide layout: index (method, data), columns (bits, task)
    means: pd.DataFrame  # the numbers behind ``table``
    stds: pd.DataFrame
    counts: pd.DataFrame  # seeds per cell
    rows: list[dict]  # the ok result rows used
    failed: list[dict]
    notes: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    run_dirs: list[str] = field(default_factory=list)
    scoring: dict[str, Scoring] = field(default_factory=dict)  # per task: direction and scale of its score
    roles: dict[tuple[str, str], str] = field(default_factory=dict)  # (method, data) -> "reference" / "baseline"
    kernels: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (method, data, bits) -> latency kernel
    # (method, data, bits, column) of the time measures (latency, method time) taken, on some seed, while other
    # processes kept cores busy
    contended: set[tuple[str, str, str, str]] = field(default_factory=set)
    # the layout text reporters (md, html, latex) render: "long" or "wide"; None: each format's own default
    # (md: long, the table a person reads in a terminal; html, latex: wide)
    layout: str | None = None

    def is_reference(self, index: tuple[str, str]) -> bool:
        """Whether the table row ``(method, data)`` is the reference (FP32): not a contender for "best"."""
        return self.roles.get(tuple(index)) == "reference"

    def write(
        self, fmt: str = "md", path: str | os.PathLike | None = None, *, plugins=None, layout: str | None = None
    ) -> tuple[Path, str | None]:
        """Render this table with the reporter plugin of ``fmt`` (md, csv, json, html, latex, png, or one an outside
        plugin adds) to ``path`` (default: ``leaderboard.FORMAT`` in the first run dir); returns the path and the
        text the reporter returned (None for binary formats). ``layout``: "long" or "wide" for the text tables
        (md, html, latex); default: ``self.layout``, else the format's own."""
        from bench import plugins as plugin_mod

        if layout is not None:
            return replace(self, layout=check_layout(layout)).write(fmt, path, plugins=plugins)
        reporters = (plugins or plugin_mod.default()).reporters
        render = reporters.get(fmt)
        name = reporters.entry(fmt).name
        if path is None:
            if not self.run_dirs:
                raise BenchError(f"a leaderboard of no run dir needs a path to write {name} to")
            path = Path(self.run_dirs[0]) / f"leaderboard.{name}"
        path = Path(path)
        return path, render(self, path)

    def flat_columns(self) -> list[str]:
        return [f"{bits} {column}" for bits, column in self.table.columns]

    def lower_is_better(self, column: str) -> bool:
        """Direction of a column: scores of a lower-is-better metric (and their differences), size, latency,
        sharpness and method time are better when smaller."""
        if column in LOWER_IS_BETTER:
            return True
        task = column.split(f" {DELTA}")[0] if f" {DELTA}" in column else column
        if column.startswith(DELTA):  # one task: the difference columns belong to the only task
            task = next(iter(self.scoring), "")
        return task in self.scoring and not self.scoring[task].higher_is_better

    @property
    def most_seeds(self) -> int:
        return int(self.counts.max().max()) if self.counts.size else 1

    def text(self, index: tuple[str, str], bits: str, column: str, *, layout: str = "wide") -> str:
        """The display text of one cell: ``mean ± std`` over seeds, ``(n=k)`` when it has fewer seeds than the
        table, the kernel after a latency, ``–`` for a latency that ran simulated, ``xN`` for ratios.

        ``layout="long"`` (the table a person reads, 120 columns): only task scores show ``± std`` and ``(n=k)``;
        differences and measures show their mean; size carries its compression and latency its speedup; the
        kernel is named in the cell only where cells of one grid ran different kernels (else in ``view``'s notes).
        """
        key = (bits, column)
        if key not in self.means.columns:
            return ""
        kernel = self.kernels.get((*index, bits))
        if column in (LATENCY, DECODE) and kernel == "simulated":
            return "–"  # fake-quant on float matmuls: FP32 arithmetic, not the method's; no figure
        mean, std, n = self.means.at[index, key], self.stds.at[index, key], self.counts.at[index, key]
        if pd.isna(mean):
            return ""
        if column in (SPEEDUP, COMPRESSION):
            return f"x{mean:.2f}"
        long = layout == "long"
        spread = not long or is_score(column)
        digits = 4 if column == SHARPNESS else 1 if column == METHOD_TIME else 2  # loss increases are small
        sign = "+" if DELTA in column else ""
        text = f"{mean:{sign}.{digits}f}"
        if spread and n >= 2 and not pd.isna(std):
            text += f" ± {std:.{digits}f}"
        if column == LATENCY and not long:
            text += f" ({kernel or '?'})"
        elif spread and self.most_seeds > 1 and n < self.most_seeds:
            text += f" (n={int(n)})"  # fewer seeds than the rest of the table (a failed or missing cell)
        if long and column == LATENCY and len(self.grid_kernels().get(bits, ())) > 1:
            text += f" {kernel or '?'}"
        if (*index, bits, column) in self.contended:
            text += CONTENDED_MARK
        folded = [c for c, into in FOLDED.items() if into == column] if long else []
        return " ".join([text, *filter(None, (self.text(index, bits, c) for c in folded))])

    def grid_kernels(self) -> dict[str, list[str]]:
        """Per grid (bits), the kernels its timed cells ran, simulated ones aside."""
        out: dict[str, set] = {}
        for (*_, bits), kernel in self.kernels.items():
            if kernel != "simulated":
                out.setdefault(bits, set()).add(kernel)
        return {bits: sorted(kernels) for bits, kernels in out.items()}

    def long(self, frame: pd.DataFrame | None = None) -> pd.DataFrame:
        """The long layout: one row per (method, data, bits) cell, one column per score, difference and measure.

        Rows run grid by grid (FP32 first, then the widest grid), the reference and the baseline first in each.
        ``frame``: one of ``means``, ``stds``, ``counts`` to read its numbers in this layout (every column of
        the wide table, compression and speedup included); default: the display strings, where compression is
        shown with the size and speedup with the latency (``text(..., layout="long")``).
        """
        if self.means.empty:
            return pd.DataFrame()
        grids = list(dict.fromkeys(bits for bits, _ in self.means.columns))
        index = [
            (*i, bits)
            for bits in grids
            for i in self.means.index
            if self.counts.xs(bits, axis=1, level="bits").loc[[i]].fillna(0).to_numpy().any()
        ]
        names = sorted({c for _, c in self.means.columns}, key=lambda c: (_column_order(c), c))
        multi = pd.MultiIndex.from_tuples(index, names=["method", "data", "bits"])
        if frame is not None:
            return frame.stack("bits", future_stack=True).reindex(index=multi, columns=names)
        names = [c for c in names if c not in FOLDED]
        return pd.DataFrame(
            [[self.text(i[:2], i[2], c, layout="long") for c in names] for i in index], index=multi, columns=names
        )

    def view(self, layout: str = "long") -> View:
        """The display strings in ``layout`` ("long" or "wide"), the cells a text reporter marks best, and what
        the layout needs said in the notes.

        Wide: every column's best cell (``best``). Long: per grid, the best task scores only (a difference ranks
        as its score does; the smallest size or time is mostly the plainest method's).
        """
        check_layout(layout)
        if layout == "wide":
            best = [(index, column) for column, index in self.best().items()]
            return View(self.table, best, [self.is_reference(i) for i in self.table.index])
        table = self.long()
        best = [((*index, bits), column) for (bits, column), index in self.best().items() if is_score(column)]
        present = {column for _, column in self.means.columns}
        means = [c for c in MEASURES if c in present and c not in FOLDED]
        shown = [f"{DELTA} = the mean of the per-seed differences"] if any(DELTA in c for c in present) else []
        if means:  # compression comes with a size, speedup with a latency
            shown.append(f"{', '.join(means)} = means over seeds")
        folded = "".join(f"; {into} xN = {column}" for column, into in FOLDED.items() if column in present)
        notes = [f"long table: {'; '.join(shown)} (std: --layout wide, csv, json){folded}"] if shown else []
        kernels = {bits: ks[0] for bits, ks in self.grid_kernels().items() if len(ks) == 1}
        if kernels and LATENCY in present:
            grids = sorted(kernels, key=_bits_order)
            notes.append(f"{LATENCY} kernel: " + ", ".join(f"{bits} {kernels[bits]}" for bits in grids))
        return View(table, best, [self.is_reference(i[:2]) for i in table.index], notes)

    def best(self) -> dict[tuple[str, str], tuple[str, str]]:
        """Per (bits, column), the index (method, data) of the best non-FP32 row: the one every reporter marks.

        Decided here once so md, html and latex always mark the same cell. The reference is not a contender; a
        column with fewer than two contenders marks nothing (a lone value is not "best").
        Ties go to the first row in table order.
        """
        best = {}
        for bits, column in self.means.columns:
            if bits == FLOAT_BITS:
                continue
            values = self.means[(bits, column)].dropna()
            values = values[[not self.is_reference(i) for i in values.index]]
            if len(values) >= 2:
                best[(bits, column)] = values.idxmin() if self.lower_is_better(column) else values.idxmax()
        return best


def is_score(column: str) -> bool:
    """A task's score or the average of several (not a difference to the reference/baseline, not a measure)."""
    return column not in MEASURES and DELTA not in column


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise unknown("layout", layout, LAYOUTS)
    return layout


@dataclass
class View:
    """One layout of a leaderboard's display strings, for the reporters that print a table."""

    table: pd.DataFrame  # index: (method, data) [+ bits in the long layout]; columns: (bits, column) or column
    best: list[tuple[tuple, object]]  # (row index, column) of each cell marked best
    reference: list[bool]  # per row: the reference (FP32), not a contender
    notes: list[str] = field(default_factory=list)  # what this layout shows differently, labels it cut

    @property
    def long(self) -> bool:
        return "bits" in (self.table.index.names or [])

    def flat(self, table: pd.DataFrame | None = None) -> pd.DataFrame:
        """``table`` (default: this view's; or a marked copy of it) with its row labels as the first columns and one
        header per column ("W4A8 sst2" when wide)."""
        table = (self.table if table is None else table).copy()
        if isinstance(table.columns, pd.MultiIndex):
            table.columns = [f"{bits} {column}" for bits, column in table.columns]
        return table.reset_index()

    def abbreviated(self, width: int) -> View:
        """Method labels (method[variant] @model) longer than ``width`` made to fit, the notes giving each whole:
        first their setting names cut to the shortest prefix no other name in the table shares (``squat[ep…=3]``:
        the values, what a reader compares, stay whole); where that is not enough, the label itself cut to ``width``
        with a ``#k`` marker."""
        labels = list(dict.fromkeys(i[0] for i in self.table.index))
        prefixes = _setting_prefixes(labels)
        short, notes, cut = {}, [], 0
        for label in labels:
            if len(label) > width:
                shorter = _SETTING_NAME.sub(lambda m: prefixes[m.group(1)] + "=", label)
                if len(shorter) > width:
                    cut += 1
                    marker = f"…#{cut}"
                    shorter = label[: max(width - len(marker), 1)] + marker
                short[label] = shorter
                notes.append(f"{shorter} = {label}")
        if not short:
            return self

        def rename(i):
            return (short.get(i[0], i[0]), *i[1:])

        table = self.table.copy()
        table.index = pd.MultiIndex.from_tuples([rename(i) for i in table.index], names=table.index.names)
        best = [(rename(i), c) for i, c in self.best]
        return View(table, best, self.reference, [*self.notes, *notes])


_SETTING_NAME = re.compile(r"(?<=[\[,])(\w+)=")  # a setting's name in a method label's [variant]


def _setting_prefixes(labels: list[str]) -> dict[str, str]:
    """Each setting name in ``labels`` -> its shortest prefix of 2+ characters that no other name there starts
    with, marked cut (``epochs`` -> ``ep…``); a name no prefix shortens stays whole."""
    names = {m.group(1) for label in labels for m in _SETTING_NAME.finditer(label)}
    prefixes = {}
    for name in names:
        others = names - {name}
        n = next((n for n in range(2, len(name)) if not any(o.startswith(name[:n]) for o in others)), len(name))
        prefixes[name] = name[:n] + "…" if n < len(name) - 1 else name
    return prefixes


def _bits_order(label: str) -> tuple:
    if label == FLOAT_BITS:
        return (0, 0, 0)
    m = re.match(r"W(\d+)A(\d+)", label)
    return (1, -int(m.group(1)), -int(m.group(2))) if m else (2, 0, 0)


def _column_order(column: str) -> float:
    if DELTA in column:
        return 0.5  # right after the scores they compare
    return {AVERAGE: 1, SHARPNESS: 2, SIZE: 3, COMPRESSION: 4, LATENCY: 5, DECODE: 6, SPEEDUP: 7, METHOD_TIME: 8}.get(
        column, 0
    )


def _speedup(latency: dict) -> float | None:
    """The row's FP32 p50 over its own p50, where a real low-bit kernel ran and the row holds its paired FP32
    figure (``latency["reference"]``: the cell's FP model timed in the same process just before its method).
    Against an FP32 row timed in another run none is given: on a shared VM the same kernel and shapes have
    measured 3-5x apart on different days, more than most speedups."""
    reference = (latency.get("reference") or {}).get("p50")
    if not reference or not latency.get("p50") or latency.get("kernel") in REAL_KERNELS_EXCLUDE:
        return None
    return reference / latency["p50"]


def method_label(row: dict) -> str:
    return row["method"] + (f"[{row['variant']}]" if row.get("variant") else "")


def collect(run_dirs: list[str], *, skip_damaged: bool = False) -> tuple[list[dict], list[dict]]:
    """Newest row per cell key over all run dirs; returns (ok rows, failed rows)."""
    latest: dict[str, dict] = {}
    for run_dir in run_dirs:
        latest.update(ResultStore.open_existing(run_dir, skip_damaged=skip_damaged).latest())
    ok = [r for r in latest.values() if r.get("status") == "ok"]
    failed = [r for r in latest.values() if r.get("status") != "ok"]
    return ok, failed


def load(run_dirs: list[str | os.PathLike] | None = None, *, skip_damaged: bool = False, plugins=None) -> Leaderboard:
    """The leaderboard of one or more run dirs (default: the newest under results/), newest row per cell; scores
    read by the metrics ``plugins`` registered (default: the installed plugins)."""
    run_dirs = [str(d) for d in run_dirs] if run_dirs else [str(latest_run_dir())]
    ok, failed = collect(run_dirs, skip_damaged=skip_damaged)
    return build(ok, failed, run_dirs, metrics=plugins.metrics if plugins else None)


def build(
    rows: list[dict], failed: list[dict] | None = None, run_dirs: list[str] | None = None, *, metrics=None
) -> Leaderboard:
    """The table of ``rows`` (ok result rows); ``metrics``: the metric registry whose ``higher_is_better`` and
    ``percent`` decide each task's direction and scale (default: the installed plugins')."""
    failed = failed or []
    if not rows:
        empty = pd.DataFrame()
        board = Leaderboard(empty, empty, empty, empty, [], failed, run_dirs=list(run_dirs or []))
        board.notes.append("no finished cells yet")
        board.provenance = _provenance(rows, run_dirs)
        return board
    scored_as = scoring(rows, metrics)
    keys = ["method", "data", "bits", "task", "seed"]
    several_models = len({r["model"] for r in rows}) > 1  # merged run dirs of different models: never mix them
    frame = pd.DataFrame(
        {
            "method": method_label(r) + (f" @{r['model']}" if several_models else ""),
            "name": r["method"],
            # reference (FP32) and baseline (plain RTN at default settings) rows, by the role their class declared
            "role": _role(r),
            "data": r.get("data_used") or "-",
            "averaged": scored_as[r["task"]].averaged,
            "bits": r["bits"],
            "task": r["task"],
            "seed": r["seed"],
            "score": r["score"] * scored_as[r["task"]].scale,
            SIZE: r["size_bytes"] / 2**20 if r.get("size_bytes") else None,
            COMPRESSION: r["fp32_size_bytes"] / r["size_bytes"]
            if r.get("size_bytes") and r.get("fp32_size_bytes")
            else None,
            LATENCY: (r.get("latency") or {}).get("p50"),
            SPEEDUP: _speedup(r.get("latency") or {}),
            SHARPNESS: (r.get("sharpness") or {}).get("value"),
            DECODE: ((r.get("latency") or {}).get("decode") or {}).get("p50"),
            METHOD_TIME: (r.get("cost") or {}).get("method_s"),
            "kernel": (r.get("latency") or {}).get("kernel"),
            **_contended(r),
            "finished": r.get("finished") or "",
        }
        for r in rows
    )
    duplicated = frame.duplicated(keys, keep=False)
    frame = frame.sort_values("finished").drop_duplicates(keys, keep="last")
    # long form: one value per (method, data, bits, column, seed); columns are tasks, avg, size, latency
    parts = [frame[[*keys, "score"]].rename(columns={"task": "column", "score": "value"})]
    # per bit-width average over the percent (x100), higher-is-better tasks (GLUE-style), per seed, before
    # aggregating seeds; perplexities are never averaged with accuracies
    scored = frame[frame.averaged]
    if scored.task.nunique() > 1:
        # only rows that ran every such task get an average: a partial average would look comparable
        groups = scored.groupby(["method", "data", "bits", "seed"], as_index=False).score
        avg = groups.agg(value="mean", n="count")
        avg = avg[avg.n == scored.task.nunique()].drop(columns="n")
        parts.append(avg.assign(column=AVERAGE))
    parts.extend(_differences(frame))
    for measure in (SHARPNESS, SIZE, COMPRESSION, LATENCY, DECODE, SPEEDUP, METHOD_TIME):
        per_cell = frame.dropna(subset=[measure]).groupby(["method", "data", "bits", "seed"], as_index=False)[measure]
        parts.append(per_cell.mean().assign(column=measure).rename(columns={measure: "value"}))
    long = pd.concat(parts, ignore_index=True)
    grouped = long.groupby(["method", "data", "bits", "column"]).value
    stats = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n": grouped.count()})
    means, stds, counts = (stats[c].unstack(["bits", "column"]) for c in ("mean", "std", "n"))
    kernels = (
        frame.dropna(subset=["kernel"])
        .groupby(["method", "data", "bits"])
        .kernel.agg(lambda k: "/".join(sorted(set(k))))
    )
    roles = frame.drop_duplicates(["method", "data"]).set_index(["method", "data"]).role.to_dict()
    simulated = {i for i, kernel in kernels.items() if kernel == "simulated"}
    for bits, column in [c for c in means.columns if c[1] in (LATENCY, DECODE)]:
        # fake-quant on float matmuls times FP32 arithmetic, not the method: no figure, no plot point
        masked = [i for i in means.index if (*i, bits) in simulated]
        means.loc[masked, (bits, column)] = float("nan")
    columns = sorted(means.columns, key=lambda c: (_bits_order(c[0]), _column_order(c[1]), c[1]))
    index = sorted(means.index, key=lambda i: (roles.get(i) != "reference", roles.get(i) != "baseline", i))
    means, stds, counts = (t.reindex(index=index, columns=columns) for t in (means, stds, counts))
    board = Leaderboard(
        pd.DataFrame(),
        means,
        stds,
        counts,
        rows,
        failed,
        run_dirs=list(run_dirs or []),
        scoring=scored_as,
        roles={i: role for i, role in roles.items() if role},
        kernels=kernels.to_dict(),
        contended={
            (*i, column)
            for column in TIMED
            for i in frame[frame[f"contended {column}"]][["method", "data", "bits"]].itertuples(index=False)
        },
    )
    board.table = pd.DataFrame(
        [[board.text(i, bits, column) for bits, column in columns] for i in index],
        index=pd.MultiIndex.from_tuples(index, names=["method", "data"]),
        columns=pd.MultiIndex.from_tuples(columns, names=["bits", "column"]),
    )
    board.notes = _notes(rows, failed, scored_as)
    if duplicated.any():
        board.notes.append(
            "some cells have several rows (run with different eval limits, task recipes or a plugin's settings as an "
            "older version defined them); the newest row of each is shown"
        )
    board.provenance = _provenance(rows, run_dirs)
    return board


def _contended(row: dict) -> dict[str, bool]:
    """Per time measure of the table (``TIMED``): whether the row took it while other processes kept more than
    ``CONTENDED_CORES`` busy (``others_cores``, recorded by ``bench.metrics.memory.busy_elsewhere``)."""
    latency, timing = row.get("latency") or {}, row.get("timing") or {}
    method_s = timing.get("method_s") or 0.0  # a method of no seconds (rtn) has no time to inflate
    loads = {
        LATENCY: latency.get("others_cores"),
        DECODE: (latency.get("decode") or {}).get("others_cores"),
        METHOD_TIME: (timing.get("others_cores") or {}).get("method") if method_s >= 1 else None,
    }
    return {f"contended {column}": x is not None and x > CONTENDED_CORES for column, x in loads.items()}


def _cost_note(rows: list[dict]) -> str | None:
    """What each training method spent per cell (task-model passes, optimizer steps), and which are matched."""
    spent: dict[str, set] = {}
    for r in rows:
        cost = r.get("cost") or {}
        if cost.get("backward_passes"):
            spent.setdefault(method_label(r), set()).add(
                (cost["forward_passes"], cost["backward_passes"], cost.get("optimizer_steps", 0))
            )
    if not rows or not any(r.get("cost") for r in rows):
        return None
    text = (
        f"{METHOD_TIME} = seconds inside the method (calibration, training, quantization), apart from evaluation, "
        "sharpness and latency"
    )
    if not spent:
        return text
    per = {m: sorted(v)[0] if len(v) == 1 else None for m, v in sorted(spent.items())}
    text += "; forward/backward passes of the task model (student and teacher copies) and optimizer steps per cell: "
    text += ", ".join(f"{m} {p[0]}/{p[1]}, {p[2]} steps" if p else f"{m} varies" for m, p in per.items())
    by_passes: dict[tuple, list[str]] = {}
    for m, p in per.items():
        if p:
            by_passes.setdefault(p[:2], []).append(m)
    matched = [ms for ms in by_passes.values() if len(ms) > 1]
    if matched:
        text += "; compute-matched (equal passes): " + "; ".join(", ".join(ms) for ms in matched)
    if len(per) > 1 and len(matched) != 1 or (matched and len(matched[0]) < len(per)):
        text += "; the others are not compute-matched: compare their accuracy with their passes in view"
    return text


def _role(row: dict) -> str | None:
    """The row's role ("reference" / "baseline" / None), as its method class declared it when the row was made.
    Rows written before roles were recorded: the one cell then run without a quantization spec (bits
    ``FLOAT_BITS``) was the reference, and there was no baseline yet."""
    if "role" in row:
        return row["role"]
    return "reference" if row.get("bits") == FLOAT_BITS else None


def _differences(frame: pd.DataFrame) -> list[pd.DataFrame]:
    """Per seed, each cell's score minus the reference's (same task) and the baseline's (same grid and task):
    paired differences, so seed-to-seed noise of the FP model cancels before mean ± std is taken.

    Columns are named after the method that holds the role (Δ + its name), prefixed with the task when the
    table has several. Only the baseline at its default settings is the baseline: a tuned RTN is a contender.
    """
    one_task = frame.task.nunique() == 1
    out = []
    baseline = (frame.role == "baseline") & ~frame.method.str.contains(r"\[", regex=True)
    for refs, on in ((frame[frame.role == "reference"], ["task", "seed"]), (frame[baseline], ["bits", "task", "seed"])):
        if refs.empty:
            continue
        name = refs.name.iloc[0]
        others = frame[~frame.index.isin(refs.index) & (frame.role != "reference")]
        paired = others.merge(refs[[*on, "score"]], on=on, suffixes=("", "_ref"))
        if paired.empty:
            continue
        column = f"{DELTA}{name}" if one_task else paired.task + f" {DELTA}{name}"
        paired = paired.assign(value=paired.score - paired.score_ref, column=column)
        out.append(paired[["method", "data", "bits", "column", "seed", "value"]])
    return out


def _notes(rows: list[dict], failed: list[dict], scored_as: dict[str, Scoring]) -> list[str]:
    notes = []
    for task in sorted({r["task"] for r in rows}):
        sources = sorted({r.get("data_source") or "?" for r in rows if r["task"] == task})
        metric = next(r["primary_metric"] for r in rows if r["task"] == task)
        scale = " x100" if scored_as[task].percent else ""
        unknown = "" if scored_as[task].registered else " (a metric no installed plugin registers: shown as stored)"
        notes.append(f"{task}: {metric}{scale}{unknown} on {', '.join(sources)}")
    for model in sorted({r["model"] for r in rows}):
        sources = sorted({r.get("model_source") or "?" for r in rows if r["model"] == model})
        notes.append(f"model {model}: {', '.join(sources)}")
    notes.append(
        "FP32 = the task-fine-tuned full-precision model every method starts from; "
        "WxAy = weight bits x activation bits (A32: activations left in float32)"
    )
    notes.append("data = what the method trained/calibrated on: none (data-free), calibration, labeled")
    grids = {r["bits"]: _grid_text(r["grid"]) for r in rows if r.get("grid")}
    if grids:
        notes.append("weight grids: " + "; ".join(f"{bits} {grids[bits]}" for bits in sorted(grids, key=_bits_order)))
    sharp = [r["sharpness"] for r in rows if r.get("sharpness")]
    if sharp:
        settings = sorted({f"rho {s['rho']}, {s['steps']} ascent steps" for s in sharp})
        notes.append(
            f"{SHARPNESS} = worst loss increase within an L2 ball around the (quantized) weights, "
            f"{'; '.join(settings)}, on seeded evaluation examples (lower = flatter)"
        )
    if any(r.get("size_bytes") for r in rows):
        notes.append(
            f"{SIZE} = the model as stored: packed low-bit weights + scales/zero points + float tensors; "
            f"{COMPRESSION} = its FP32 size / that"
        )
    timed = [r["latency"] for r in rows if r.get("latency")]
    if timed:
        shapes = sorted({f"{t.get('batch_size', '?')} x {t.get('seq_len', '?')} tokens" for t in timed})
        threads = sorted({str(t.get("threads")) for t in timed})
        notes.append(
            f"{LATENCY} = forward of {', '.join(shapes)}, {', '.join(threads)} thread(s), median of "
            f"{timed[0].get('n')} runs after {timed[0].get('warmup')} warm-up, with the kernel that ran"
            "; speedup = the cell's FP model timed the same way in the same process just before its method, over "
            "that, only where a real low-bit kernel ran (rows without that paired figure show none). Cells that ran "
            "simulated (fake-quant on float matmuls: FP32 arithmetic, not the method's) show – and are left out of "
            "the plots"
        )
        if any(t.get("decode") for t in timed):
            notes.append(f"decoders: {LATENCY} is the prefill; {DECODE} = one generated token on the prompt's KV cache")
    deltas = sorted({(_role(r), r["method"]) for r in rows if _role(r) in ("reference", "baseline")})
    if deltas:
        notes.append(
            ", ".join(f"{DELTA}{name}" for _, name in deltas)
            + " = the cell's score minus the "
            + " / ".join(
                f"{name} cell's ({'same task and seed' if role == 'reference' else 'same grid, task and seed'})"
                for role, name in deltas
            )
            + ", per seed, then mean ± std"
            + "".join(f" ({task}: lower is better, so negative is)" for task in _lower(scored_as))
        )
    cost_note = _cost_note(rows)
    if cost_note:
        notes.append(cost_note)
    if any(any(_contended(r).values()) for r in rows):
        notes.append(
            f"{CONTENDED_MARK} = measured (on some seed) while other processes kept more than {CONTENDED_CORES:g} CPU "
            "cores busy (`others_cores` in the row's latency and timing): not a speed figure"
        )
    seeds = sorted({r["seed"] for r in rows})
    notes.append(
        f"seeds: {', '.join(map(str, seeds))}"
        + (f" (mean ± std over n = {len(seeds)}; '(n=k)' marks a cell with fewer)" if len(seeds) > 1 else "")
        + ("" if len(seeds) > 2 else "; publish with --seeds 0,1,2 or more")
    )
    limits = sorted({r.get("limit") for r in rows if r.get("limit")})
    if limits:
        notes.append(f"evaluation capped at --limit {', '.join(map(str, limits))} examples: a quick run, not a result")
    if failed:
        notes.append(
            f"{len(failed)} cell(s) failed and are not shown: "
            + "; ".join(f"{r['method']} {r['bits']} {r['task']} ({r.get('error')})" for r in failed[:5])
        )
    return notes


def _lower(scored_as: dict[str, Scoring]) -> list[str]:
    return sorted(task for task, s in scored_as.items() if not s.higher_is_better)


def _grid_text(grid: dict) -> str:
    """'symmetric, 16 levels, per-channel' from a row's ``grid`` record."""
    kind = "asymmetric" if not grid["symmetric"] else "symmetric narrow" if grid.get("narrow") else "symmetric"
    group = f" {grid['group_size']}" if grid.get("group_size") else ""
    return f"{kind}, {grid['levels']} levels, {grid['granularity']}{group}"


def _provenance(rows: list[dict], run_dirs: list[str] | None) -> dict:
    """Where the table's numbers came from. Versions are the ones that produced the rows (the installed ones only
    for an empty table), so a committed table re-renders the same anywhere; "rendered" is the one field of now."""
    commits = sorted({r.get("git_commit") or "?" for r in rows})
    installed = provenance.versions()

    def produced_by(package: str) -> str:
        return ", ".join(sorted({r["versions"][package] for r in rows if package in (r.get("versions") or {})}))

    return {
        **{package: produced_by(package) or installed[package] for package in ("quantbench", "torch", "transformers")},
        "model": "; ".join(sorted({f"{r['model']} ({r.get('model_source') or '?'})" for r in rows})) or "-",
        "data": "; ".join(sorted({f"{r['task']} ({r.get('data_source') or '?'})" for r in rows})) or "-",
        "git_commit (runs)": ", ".join(commits) or "-",
        "machine": ", ".join(
            sorted(
                {
                    f"{r['host']['node']} ({r['host']['processor']}, {r['host']['torch_threads']} threads)"
                    for r in rows
                    if r.get("host")
                }
            )
        )
        or "-",
        "run dirs": ", ".join(run_dirs or []) or "-",
        "commands": "; ".join(sorted({r.get("command") or "?" for r in rows})) or "-",
        "rendered": provenance.now(),
    }


class _CallableModule(types.ModuleType):
    """``bench.leaderboard(run_dirs)`` is ``load(run_dirs)``. Importing a submodule sets it as its package's
    attribute, so a function named ``bench.leaderboard`` would be replaced by this module on first import; the
    module itself is therefore the callable, and ``from bench.leaderboard import Leaderboard`` works as before."""

    def __call__(self, run_dirs: list[str | os.PathLike] | None = None, *, skip_damaged: bool = False) -> Leaderboard:
        return load(run_dirs, skip_damaged=skip_damaged)


sys.modules[__name__].__class__ = _CallableModule
