"""The leaderboard table from synthetic rows: layout, seeds, variants, grids, formats."""

import json

import pytest
from tiny import in_process_plugin, result_row

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
    # a cell with fewer seeds than the rest of the table says so
    assert board.table.loc[("rtn[clip=mse]", "none"), ("W4A32", "sst2")] == "86.00 (n=1)"
    assert board.table.loc[("rtn", "none"), ("W4A32 g128", "sst2")] == "85.00 (n=1)"
    assert board.table.loc[("rtn", "none"), ("W4A32", "wikitext2")] == "21.50 (n=1)"  # perplexity is not scaled
    first = board.table.columns[0]
    assert first[0] == "FP32"
    order = [c[0] for c in board.table.columns]
    assert order.index("W8A32") < order.index("W4A32") < order.index("W4A32 g128")


def test_reporters_render(board, tmp_path):
    reporters = plugins.load().reporters
    md = reporters.get("md")(board, tmp_path / "b.md")  # long: a row per method x grid
    row = next(line for line in md.splitlines() if line.startswith("| rtn[clip=mse] "))
    assert "| W4A32 " in row and "| **86.00 (n=1)** " in row and "offline:y" in md  # best of its grid
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

    from bench import plugins
    from bench.cli import main
    from bench.results import ResultStore

    rows = [
        _row("fp32", "FP32", "sst2", 0, 0.9, size=80, fp32_size=80),
        _row("rtn", "W4A32", "sst2", 0, 0.8, size=20, fp32_size=80),
    ]
    board = build(rows, [], [])
    assert board.table.loc[("rtn", "none"), ("W4A32", "compression")] == "x4.00"
    assert board.table.loc[("fp32", "none"), ("FP32", "compression")] == "x1.00"

    def register_reporters(register):  # what an outside package's module would hold
        register("tsv", lambda board, path: path.write_text(board.table.to_csv(sep="\t")) and "tsv written")

    loaded = in_process_plugin("tsvplugin", register_reporters=register_reporters)
    monkeypatch.setattr(plugins, "default", lambda: loaded)
    store = ResultStore(tmp_path / "run")
    for row in rows:
        store.append({**row, "key": row["method"]})
    assert main(["leaderboard", str(tmp_path / "run"), "--format", "tsv"]) == 0
    assert "tsv written" in capsys.readouterr().out
    assert "compression" in (tmp_path / "run" / "leaderboard.tsv").read_text()


def _fair_rows():
    """FP32, the baseline and a contender over two seeds; the contender's latency ran simulated at W2."""
    rows = []
    for seed, (fp, base, zs) in enumerate([(0.90, 0.80, 0.83), (0.92, 0.78, 0.83)]):
        rows += [
            {**_row("fp32", "FP32", "sst2", seed, fp, p50=20.0), "role": "reference"},
            {**_row("rtn", "W4A8", "sst2", seed, base, p50=12.0), "role": "baseline"},
            {**_row("rtn", "W4A8", "sst2", seed, 0.5, variant="clip=mse"), "role": "baseline"},
            {**_row("zsaq", "W4A8", "sst2", seed, zs, p50=30.0), "cost": _cost(180, 60, 120.0)},
            {**_row("gan", "W4A8", "sst2", seed, zs, p50=31.0), "cost": _cost(120, 60, 90.0)},
        ]
        for row in rows[-4:]:
            row["latency"] = {**(row["latency"] or {}), "kernel": "int8pack" if row["method"] == "rtn" else "simulated"}
    return rows


def _cost(passes, steps, seconds):
    return {"method_s": seconds, "forward_passes": passes, "backward_passes": passes, "optimizer_steps": steps}


def test_every_cell_shows_its_difference_to_the_reference_and_the_baseline():
    board = build(_fair_rows(), [], ["runs/a"])
    table = board.table
    assert list(table.index)[:2] == [("fp32", "none"), ("rtn", "none")]  # reference, then baseline
    # paired per seed: zsaq - fp32 = (0.83-0.90, 0.83-0.92) x100 = -7, -9; zsaq - rtn = +3, +5
    assert table.loc[("zsaq", "none"), ("W4A8", "Δfp32")] == "-8.00 ± 1.41"
    assert table.loc[("zsaq", "none"), ("W4A8", "Δrtn")] == "+4.00 ± 1.41"
    assert table.loc[("rtn", "none"), ("W4A8", "Δrtn")] == ""  # the baseline is not compared with itself
    assert table.loc[("rtn[clip=mse]", "none"), ("W4A8", "Δrtn")] == "-29.00 ± 1.41"  # a tuned RTN is a contender
    assert table.loc[("zsaq", "none"), ("W4A8", "method s")] == "120.0 ± 0.0"
    notes = " ".join(board.notes)
    assert "zsaq 180/180, 60 steps" in notes and "gan 120/120, 60 steps" in notes and "not compute-matched" in notes


def test_latency_only_where_a_real_kernel_ran():
    board = build(_fair_rows(), [], ["runs/a"])
    assert board.table.loc[("zsaq", "none"), ("W4A8", "p50 ms")] == "–"
    assert board.table.loc[("rtn", "none"), ("W4A8", "p50 ms")] == "12.00 ± 0.00 (int8pack)"
    latency = board.means[("W4A8", "p50 ms")]
    assert latency.dropna().index.tolist() == [("rtn", "none")]  # plots and 'best' read these numbers
    assert "show –" in " ".join(board.notes)


def test_speedup_divides_each_rows_own_fp32_reference_never_an_fp32_row_timed_in_another_run():
    rows = _card_rows()
    for row in rows:
        if row["method"] == "zsaq":
            del row["latency"]["reference"]  # a row from before the paired figure: the FP32 row is no stand-in
        if row["method"] == "rtn" and row["seed"] == 1:
            row["latency"]["reference"]["p50"] = 42.6  # this seed's FP model timed on a slower day
    board = build(rows, [], ["runs/a"])
    assert board.text(("zsaq", "none"), "W4A8", "p50 ms", layout="long") == "13.70"
    speedup = board.long(board.means).at[("rtn", "none", "W4A8"), "speedup"]
    assert speedup == pytest.approx((21.3 / 13.2 + 42.6 / 14.2) / 2)  # per seed, then the mean
    assert any("rows without that paired figure show none" in n for n in board.notes)


def test_a_latency_timed_beside_other_busy_processes_is_marked_in_both_layouts():
    rows = _card_rows()
    loaded = next(r for r in rows if r["method"] == "zsaq" and r["bits"] == "W4A8" and r["seed"] == 1)
    loaded["latency"]["others_cores"] = 1.4  # another process kept 1.4 cores busy while this seed was timed
    quiet = next(r for r in rows if r["method"] == "rtn" and r["bits"] == "W4A8" and r["seed"] == 1)
    quiet["latency"]["others_cores"] = 0.3  # background noise: not marked
    board = build(rows, [], ["runs/a"])
    assert board.text(("zsaq", "none"), "W4A8", "p50 ms", layout="long") == "13.70† x1.59"  # mean of 13.2, 14.2
    assert board.table.loc[("zsaq", "none"), ("W4A8", "p50 ms")].endswith("(int8-gemm)†")
    assert "†" not in board.text(("rtn", "none"), "W4A8", "p50 ms", layout="long")
    assert "†" not in board.text(("zsaq", "none"), "W2A8", "p50 ms", layout="long")
    assert any(n.startswith("† = measured") for n in board.notes)
    assert not any("†" in n for n in build(_card_rows(), [], ["runs/a"]).notes)  # rows without the field: no mark


def test_a_method_time_taken_beside_other_busy_processes_is_marked():
    rows = _card_rows()
    for r in rows:
        if r["method"] == "prequant" and r["bits"] == "W2A8":
            r["timing"] = {"method_s": 1050.8, "others_cores": {"method": 0.9, "eval": 0.0}}
    board = build(rows, [], ["runs/a"])
    assert board.text(("prequant", "labeled"), "W2A8", "method s", layout="long").endswith("†")
    assert "†" not in board.text(("prequant", "labeled"), "W4A8", "method s", layout="long")
    assert "†" not in board.text(("prequant", "labeled"), "W2A8", "p50 ms", layout="long")  # its latency was quiet
    for r in rows:
        if r["method"] == "rtn":
            r["timing"] = {"method_s": 0.004, "others_cores": {"method": 2.0}}  # a few ticks in 4 ms: no measure
    assert "†" not in build(rows, [], ["runs/a"]).text(("rtn", "none"), "W2A8", "method s", layout="long")


MB = 2**20


def _card_rows(**variants):
    """The design card's grid (`bench run --methods zsaq,prequant --bits 2,4`): fp32, rtn, zsaq, prequant x W4A8,
    W2A8 on sst2, seeds 0 and 1, every measure taken (sharpness, size, int8-gemm latency, method time).
    ``variants``: method -> a variant label for its rows."""
    rows = []
    for seed in (0, 1):
        fp = {"size": 86.7 * MB, "fp32_size": 86.7 * MB, "p50": 21.3 + seed, "kernel": "fp32", "sharp": 0.031}
        rows.append({**_row("fp32", "FP32", "sst2", seed, 0.91 - 0.01 * seed, **fp), "role": "reference"})
        for bits, drop, size in (("W4A8", 0.02, 50.8), ("W2A8", 0.38, 45.6)):
            for method, data, gain, seconds in (
                ("rtn", "none", 0.0, 0.2),
                ("zsaq", "none", 0.03, 145.6),
                ("prequant", "labeled", 0.05, 1050.8),
            ):
                cell = {"size": size * MB, "fp32_size": 86.7 * MB, "p50": 13.2 + seed, "kernel": "int8-gemm"}
                cell["reference_p50"] = 21.3 + seed  # its FP model, timed just before the method
                score = 0.91 - drop + gain + 0.013 * seed * (method != "rtn")
                row = _row(method, bits, "sst2", seed, score, data=data, sharp=0.04 + drop / 10, **cell)
                row["variant"] = variants.get(method, "")
                row["cost"] = _cost(0 if method == "rtn" else 120, 60, seconds + seed)
                rows.append({**row, "role": "baseline"} if method == "rtn" else row)
    return rows


def _md_table(md: str) -> list[list[str]]:
    """The cells of the md text's table, header first (the rule line left out)."""
    lines = [line for line in md.splitlines() if line.startswith("|") and not line.startswith("|:")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_the_design_card_reads_long_in_120_columns_with_the_wide_tables_differences(tmp_path):
    board = build(_card_rows(), [], [str(tmp_path)])
    _, md = board.write("md", tmp_path / "b.md")
    assert max(len(line) for line in md.splitlines()) <= 120, md
    header, *rows = _md_table(md)
    assert header == ["method", "data", "bits", "sst2", "Δfp32", "Δrtn", "sharpness", "size MB", "p50 ms", "method s"]
    assert [(r[0], r[2]) for r in rows] == [
        ("fp32", "FP32"),
        *[(m, bits) for bits in ("W4A8", "W2A8") for m in ("rtn", "prequant", "zsaq")],
    ]
    zsaq = dict(zip(header, rows[6], strict=True))  # zsaq W2A8
    assert zsaq["sst2"] == "56.65 ± 0.92" and zsaq["data"] == "none"  # x100, mean ± std over the two seeds
    assert zsaq["Δfp32"] == "-33.85" and zsaq["Δrtn"] == "+3.65"  # paired per seed, then the mean
    assert zsaq["size MB"] == "45.60 x1.90" and zsaq["p50 ms"] == "13.70 x1.59" and zsaq["method s"] == "146.1"
    assert dict(zip(header, rows[5], strict=True))["sst2"] == "**58.65 ± 0.92**"  # prequant: best of W2A8
    assert "- p50 ms kernel: FP32 fp32, W4A8 int8-gemm, W2A8 int8-gemm" in md
    # the same numbers as the wide table: one computation, two layouts
    long, numbers = board.long(), board.long(board.means)
    assert list(long.index.names) == ["method", "data", "bits"] and len(long) == 7
    for (method, data, bits), row in long.iterrows():
        for column in ("Δfp32", "Δrtn"):
            wide = board.table.at[(method, data), (bits, column)] if (bits, column) in board.table.columns else ""
            assert wide.split(" ± ")[0] == row[column], (method, bits, column)
            mean = board.means.at[(method, data), (bits, column)] if wide else float("nan")
            assert numbers.at[(method, data, bits), column] == pytest.approx(mean, nan_ok=True)
    assert numbers.at[("zsaq", "none", "W2A8"), "speedup"] == pytest.approx((21.3 / 13.2 + 22.3 / 14.2) / 2)


def test_long_method_labels_are_cut_to_fit_and_named_whole_in_the_notes(tmp_path):
    label = "zsaq[preset=paper,rho=0.1,steps=960]"
    board = build(_card_rows(zsaq="preset=paper,rho=0.1,steps=960"), [], [])
    _, md = board.write("md", tmp_path / "b.md")
    assert max(len(line) for line in md.splitlines()) <= 120, md
    short = next(r[0] for r in _md_table(md) if r[0].startswith("zsaq"))
    assert short.endswith("…#1") and label.startswith(short[: -len("…#1")])
    assert f"- {short} = {label}" in md


def _tables(md: str) -> list[list[list[str]]]:
    """The cells of each of the md text's tables."""
    return [_md_table(part) for part in md.split("\n\n") if part.startswith("| method ")]


def test_a_table_that_cut_labels_cannot_fit_splits_into_its_scores_and_its_costs_labels_whole(tmp_path):
    label = "zsaq[act_mode=static,layers=none,alpha=0.5]"
    rows = _card_rows(zsaq=label[5:-1])
    for row in rows:
        if row["method"] == "prequant":
            row["data_used"] = "calibration"  # 157 columns as one table; 126 with labels cut to 12
    _, md = build(rows, [], []).write("md", tmp_path / "b.md")
    assert max(len(line) for line in md.splitlines()) <= 120, md
    scores, costs = _tables(md)
    assert scores[0] == ["method", "data", "bits", "sst2", "Δfp32", "Δrtn", "sharpness"]
    assert costs[0] == ["method", "data", "bits", "size MB", "p50 ms", "method s"]
    assert [r[:3] for r in costs] == [r[:3] for r in scores] and scores[4][0] == label and "…#" not in md


def test_a_table_too_wide_even_split_wraps_each_part_repeating_the_labels(tmp_path):
    rows = _card_rows(zsaq="act_mode=static,layers=none,alpha=0.5")
    rows += [{**row, "task": "mrpc"} for row in rows]  # a second score column
    board = build(rows, [], [])
    _, md = board.write("md", tmp_path / "b.md")
    assert max(len(line) for line in md.splitlines()) <= 120, md
    tables = _tables(md)
    assert len(tables) == 3 and all(t[0][:3] == ["method", "data", "bits"] for t in tables)
    assert all([r[:3] for r in t] == [r[:3] for r in tables[0]] for t in tables)  # the same rows in each
    columns = [c for t in tables for c in t[0][3:]]
    assert sorted(columns) == sorted(board.long().columns.drop("speedup", errors="ignore"))  # each column once
    assert tables[-1][0][3:] == ["size MB", "p50 ms", "method s"]  # the costs apart
    short = next(r[0] for r in tables[0] if r[0].startswith("zsaq"))
    assert len(short) == 12 and f"- {short} = zsaq[act_mode=static,layers=none,alpha=0.5]" in md


def test_a_grid_whose_cells_ran_different_kernels_names_each_and_simulated_shows_a_dash(tmp_path):
    rows = _card_rows()
    for row in rows:
        if row["method"] == "zsaq" and row["bits"] == "W4A8":
            row["latency"] = {**row["latency"], "kernel": "int8pack"}
        if row["method"] == "prequant" and row["bits"] == "W2A8":
            row["latency"] = {**row["latency"], "kernel": "simulated"}
    long = build(rows, [], []).long()
    assert long.at[("zsaq", "none", "W4A8"), "p50 ms"] == "13.70 int8pack x1.59"
    assert long.at[("rtn", "none", "W4A8"), "p50 ms"] == "13.70 int8-gemm x1.59"
    assert long.at[("prequant", "labeled", "W2A8"), "p50 ms"] == "–"
    assert long.at[("rtn", "none", "W2A8"), "p50 ms"] == "13.70 x1.59"  # one kernel in the grid: named in the notes


def test_bench_leaderboard_prints_long_and_layout_wide_gives_the_pivot(tmp_path, capsys):
    import bench
    from bench.cli import main
    from bench.results import ResultStore

    store = ResultStore(tmp_path / "run")
    for i, row in enumerate(_card_rows()):
        store.append({**row, "key": f"cell{i}"})
    assert main(["leaderboard", str(tmp_path / "run")]) == 0
    header = _md_table(capsys.readouterr().out)[0]
    assert header[:4] == ["method", "data", "bits", "sst2"]
    assert main(["leaderboard", str(tmp_path / "run"), "--layout", "wide"]) == 0
    board = bench.leaderboard([tmp_path / "run"])
    header, *rows = _md_table(capsys.readouterr().out)
    assert header == ["method", "data", *board.flat_columns()] and "W2A8 Δrtn" in header
    assert [tuple(r[:2]) for r in rows] == list(board.table.index)
    assert rows[3][header.index("W2A8 Δrtn")] == board.table.at[("zsaq", "none"), ("W2A8", "Δrtn")] == "+3.65 ± 0.92"
    assert board.long().index.names == ["method", "data", "bits"]  # the Python API reads the long table too


def test_provenance_names_the_versions_that_produced_the_rows():
    """A committed table re-renders the same under another install: its versions are the rows', not the renderer's."""
    rows = [_row("fp32", "FP32", "sst2", 0, 0.9), _row("rtn", "W4A32", "sst2", 0, 0.8)]
    for row, torch_version in zip(rows, ["2.11.0+cpu", "2.12.0+cpu"], strict=True):
        row["versions"] = {"quantbench": "0.0.9", "torch": torch_version, "transformers": "4.50.0"}
    made = build(rows, [], ["runs/a"]).provenance
    assert made["quantbench"] == "0.0.9" and made["transformers"] == "4.50.0"
    assert made["torch"] == "2.11.0+cpu, 2.12.0+cpu"
    assert build([], [], ["runs/a"]).provenance["torch"]  # no rows: the installed versions


def test_a_label_over_the_width_by_a_little_cuts_its_setting_names_and_keeps_the_values(tmp_path):
    # the published squat-minilm table: 'squat[epochs=3]' two characters over, once cut to 'squat[epoc…#1'
    rows = _card_rows(zsaq="epochs=3,inputs=random")
    view = build(rows, [], []).view("long")
    label = "zsaq[epochs=3,inputs=random]"
    fitted = view.abbreviated(len(label) - 2)
    short = next(i[0] for i in fitted.table.index if i[0].startswith("zsaq"))
    assert short == "zsaq[ep…=3,in…=random]" and f"{short} = {label}" in fitted.notes
    # names cut only as far as keeps them apart: 'epochs' and 'epsilon' both start 'ep'
    epsilon = [{**r, "variant": "epsilon=0.1"} for r in _card_rows() if r["method"] == "zsaq"]
    rows = _card_rows(zsaq="epochs=3") + epsilon
    view = build(rows, [], []).view("long")
    labels = {width: {i[0] for i in view.abbreviated(width).table.index} for width in (13, 14)}
    assert "zsaq[epo…=3]" in labels[13] and {"zsaq[epochs=3]", "zsaq[eps…=0.1]"} <= labels[14]
