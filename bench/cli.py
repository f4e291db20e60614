"""``bench``: run a quantization grid, list plugins, publish the leaderboard.

Every user error (unknown name, bad bit-width, bad run dir) ends as one line on stderr and exit
code 2 -- never a traceback. ``-v`` shows the log (``-vv`` debug, with tracebacks of failed cells).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import logging
import os
import sys
import textwrap
import tokenize

from bench import __version__, logs
from bench.errors import BenchError, unknown

log = logging.getLogger("bench")

BITS_CHOICES = range(2, 9)
FLOAT_ACTIVATIONS = ("32", "float", "none")  # --act-bits values that keep activations in float
# `bench run` options that reach bench.runner.run unchanged, under their own name
SAME_NAME = (
    "model",
    "out",
    "name",
    "granularity",
    "group_size",
    "limit",
    "data_dir",
    "force",
    "retry_failed",
    "skip_damaged",
    "rho",
    "hessian",
    "device",
    "executor",
    "jobs",
    "ray_address",
    "ray_cpus_per_cell",
)


# --------------------------------------------------------------------------- value parsing


def comma_list(raw: str, option: str) -> list[str]:
    """Split 'a,b' into items, rejecting empty items and duplicates with the exact bad value named."""
    items = [part.strip() for part in raw.split(",")]
    if any(not item for item in items):
        raise BenchError(f"{option} {raw!r}: empty item in the comma list")
    seen = set()
    for item in items:
        if item.lower() in seen:
            raise BenchError(f"{option} {raw!r}: '{item}' is listed twice")
        seen.add(item.lower())
    return items


def int_list(raw: str, option: str, choices=None, extra: tuple[str, ...] = ()) -> list[int]:
    out = []
    for item in comma_list(raw, option):
        valid = f"; choose from {min(choices)}..{max(choices)}" + "".join(f" or {e}" for e in extra) if choices else ""
        try:
            value = int(item)
        except ValueError:
            raise BenchError(f"{option}: '{item}' is not an integer{valid}") from None
        if choices is not None and value not in choices:
            raise BenchError(f"{option}: {value} is out of range{valid}")
        out.append(value)
    return out


def parse_settings(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``--set rtn.clip=mse`` -> {"rtn": {"clip": "mse"}}."""
    settings: dict[str, dict[str, str]] = {}
    for pair in pairs or []:
        target, eq, value = pair.partition("=")
        scope, dot, name = target.partition(".")
        if not eq or not dot or not scope or not name:
            raise BenchError(f"--set {pair!r}: expected SCOPE.FIELD=VALUE (scope: a method, a task, or task)")
        settings.setdefault(scope.lower(), {})[name] = value
    return settings


# --------------------------------------------------------------------------- commands


def cmd_run(args) -> int:
    from bench.runner import RUN_FORMATS, run

    if args.act_bits is None:
        act_bits = "auto"
    elif args.act_bits.strip().lower() in FLOAT_ACTIVATIONS:
        act_bits = None
    else:
        (act_bits, *more) = int_list(args.act_bits, "--act-bits", BITS_CHOICES, extra=FLOAT_ACTIVATIONS)
        if more:
            raise BenchError("--act-bits takes one value (run the grid once per activation bit-width)")
    result = run(
        methods=comma_list(args.methods, "--methods") if args.methods else None,
        bits=int_list(args.bits, "--bits", BITS_CHOICES),
        tasks=comma_list(args.tasks, "--tasks") if args.tasks else None,
        seeds=int_list(args.seeds, "--seeds"),
        act_bits=act_bits,
        settings=parse_settings(args.set),
        sweeps=args.sweep,
        symmetric=not args.asymmetric,
        narrow=args.narrow_grid,
        embeddings=args.quantize_embeddings,
        reference=not args.no_reference,
        baseline=not args.no_baseline,
        latency=not args.no_latency,
        sharpness=not args.no_sharpness,
        **{option: getattr(args, option) for option in SAME_NAME},
        echo=lambda line: print(line, file=sys.stderr),
    )
    print((result.out / "leaderboard.md").read_text())
    counts = result.counts
    print(
        f"cells: {counts['planned']} planned, {counts['skipped']} skipped (done), {counts['ok']} ok, "
        f"{counts['failed']} failed; leaderboard in {result.out}/leaderboard.{{{','.join(RUN_FORMATS)}}}",
        file=sys.stderr,
    )
    return 1 if counts["failed"] else 0


LIST_WIDTH = 120  # `bench list` and `bench describe` lines fit a terminal this wide
LIST_HEADERS = {
    "methods": ["name", "data", "description", "plugin"],
    "tasks": ["name", "kind", "description", "plugin"],
    "metrics": ["name", "description", "plugin"],
    "reporters": ["name", "description", "plugin"],
}


def cmd_list(args) -> int:
    from bench import plugins as plugin_mod

    if args.kind not in plugin_mod.KINDS:
        raise unknown("kind", args.kind, plugin_mod.KINDS)
    registry = plugin_mod.default().registry(args.kind)
    if args.name:
        print(_details(args.kind, registry.entry(args.name)))
        return 0
    print(_columns([_summary(args.kind, entry) for entry in registry.entries()], LIST_HEADERS[args.kind]))
    return 0


def cmd_describe(args) -> int:
    from bench import plugins as plugin_mod
    from bench.errors import UnknownNameError, did_you_mean

    loaded = plugin_mod.default()
    found = [(kind, loaded.registry(kind)) for kind in plugin_mod.KINDS if args.name in loaded.registry(kind)]
    if not found:
        names = [n for kind in plugin_mod.KINDS for e in loaded.registry(kind).entries() for n in (e.name, *e.aliases)]
        close = did_you_mean(args.name, names)
        raise UnknownNameError(f"unknown name '{args.name}'{close}; see `bench list methods|tasks|metrics|reporters`")
    print("\n\n".join(_details(kind, registry.entry(args.name)) for kind, registry in found))
    return 0


def _columns(rows: list[list[str]], headers: list[str]) -> str:
    """Rows as aligned columns under a header and a rule, the description cut (…) so lines fit ``LIST_WIDTH``."""
    cut = headers.index("description")
    others = sum(max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers) if i != cut)
    room = max(LIST_WIDTH - others - 2 * (len(headers) - 1), 24)
    rows = [[_cut(cell, room) if i == cut else cell for i, cell in enumerate(row)] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _summary(kind: str, entry) -> list[str]:
    """One ``bench list`` row: name, what data it uses / its kind, one line about it, its plugin (aliases: in
    ``bench describe``)."""
    obj, name = entry.obj, entry.name
    if kind == "methods":
        return [name, obj.data_used, _first_line(obj.description or obj.__doc__), str(entry.provider)]
    if kind == "tasks" and entry.meta.get("members"):
        return [name, "group", "runs " + ", ".join(entry.meta["members"]), str(entry.provider)]
    if kind == "tasks":
        return [name, obj.kind, f"{obj.primary_metric}; data: {_sources(obj)}", str(entry.provider)]
    if kind == "metrics":
        return [name, _direction(entry), str(entry.provider)]
    return [name, _first_line(obj.__doc__), str(entry.provider)]


def _sources(task_cls) -> str:
    from bench import hub

    sources = task_cls().data_sources()
    return ", ".join(f"{src} [{'off' if hub.offline() else 'on'}]" if src == "hub" else src for src in sources)


def _direction(entry) -> str:
    direction = "higher is better" if entry.meta.get("higher_is_better", True) else "lower is better"
    return direction + ("; a fraction, shown x100" if entry.meta.get("percent") else "")


def _details(kind: str, entry) -> str:
    """``bench describe NAME``: what a registered name is, what it uses, who provides it, and each setting."""
    from bench import plugins as plugin_mod

    obj = entry.obj
    what = kind.rstrip("s")
    facts = {"plugin": str(entry.provider), "aliases": ", ".join(entry.aliases)}
    config, scope = None, entry.name
    if kind == "methods":
        about = obj.description or _first_line(obj.__doc__)
        facts |= {"data used": obj.data_used, "role": getattr(obj, "role", None) or ""}
        config = obj.Config
    elif kind == "tasks" and entry.meta.get("members"):
        about = "a group: runs " + ", ".join(entry.meta["members"])
    elif kind == "tasks":
        about = _first_line(obj.__doc__)
        metrics = plugin_mod.default().metrics
        others = [m for m in obj.metrics if m != obj.primary_metric]
        primary = obj.primary_metric
        if primary in metrics:
            primary += f" ({_direction(metrics.entry(primary))})"
        facts |= {
            "kind": obj.kind,
            "metrics": primary + (f"; also {', '.join(others)}" if others else ""),
            "data": _sources(obj),
            "default task of": ", ".join(f"{k} models" for k in obj.default_for_kinds),
        }
        config = obj.Recipe
    elif kind == "metrics":
        about = _first_line(getattr(obj, "__doc__", None))
        facts["direction"] = _direction(entry)
    else:
        about = _first_line(getattr(obj, "__doc__", None))
    lines = [_wrap(f"{what} {entry.name}: {about}" if about else f"{what} {entry.name}")]
    lines += [_wrap(f"{key}: {value}", "  ", "    ") for key, value in facts.items() if value]
    lines += _settings(config, scope, kind)
    return "\n".join(lines)


def _settings(config, scope: str, kind: str) -> list[str]:
    """Each field of a settings dataclass: ``name: type = default`` and its help (the field's comment)."""
    fields = dataclasses.fields(config) if config is not None and dataclasses.is_dataclass(config) else ()
    if not fields:
        return ["  settings: none"] if config is not None else []
    where = f"--set {scope}.FIELD=VALUE" + (" or task.FIELD=VALUE for every task" if kind == "tasks" else "")
    lines = [f"  settings ({where}):"]
    doc = config.__doc__ or ""
    if doc and not doc.startswith(f"{config.__name__}("):  # dataclasses write a signature where no docstring is
        lines.append(_wrap(_first_line(doc), "    ", "    "))
    helps = _field_help(config)
    for f in fields:
        lines.append(f"    {f.name}: {_type_name(f.type)} = {_default(f)}")
        if helps.get(f.name):
            lines.append(_wrap(helps[f.name], "        ", "        "))
    return lines


def _type_name(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def _field_help(config) -> dict[str, str]:
    """Per field of the dataclass ``config`` (and the dataclasses it extends): the comment at the end of its line,
    else the comment lines right above it. Empty where the source cannot be read (a class made at run time)."""
    helps: dict[str, str] = {}
    for cls in reversed(config.__mro__):
        try:
            source = textwrap.dedent(inspect.getsource(cls))
            lines = source.splitlines()
            comments = {
                token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT
            }
            body = ast.parse(source).body[0].body
        except (OSError, TypeError, SyntaxError, IndexError, AttributeError, tokenize.TokenError):
            continue
        for node in body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, line = [], node.lineno - 1
            while line in comments and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            text = comments.get(node.end_lineno) or " ".join(above)
            if text:
                helps[node.target.id] = text
    return helps


def _wrap(text: str, first: str = "", rest: str = "  ") -> str:
    return textwrap.fill(
        text, LIST_WIDTH, initial_indent=first, subsequent_indent=rest, break_long_words=False, break_on_hyphens=False
    )


def cmd_plugins(args) -> int:
    from bench import plugins as plugin_mod

    infos = plugin_mod.default().infos
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return 0
    from tabulate import tabulate

    rows = []
    for info in infos:
        what = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info.registered.items())
        rows.append([info.name, info.dist, info.version, f"ERROR {info.error}" if info.error else what])
    print(tabulate(rows, headers=["plugin", "package", "version", "registered"]))
    return 0


def cmd_leaderboard(args) -> int:
    from bench import leaderboard
    from bench import plugins as plugin_mod

    fmt = plugin_mod.default().reporters.entry(args.format).name  # an unknown format fails before anything is read
    layout = leaderboard.check_layout(args.layout) if args.layout else None
    board = leaderboard.load(args.run_dirs, skip_damaged=args.skip_damaged)
    path, text = board.write(fmt, args.output, layout=layout)
    if text is not None and fmt != "html":
        print(text)
    written = path.parent / f"{path.stem}-*.png" if fmt == "png" else path
    print(f"wrote {written}", file=sys.stderr)
    return 0


def cmd_show(args) -> int:
    from bench.results import ResultStore

    store = ResultStore.open_existing(args.run_dir, skip_damaged=args.skip_damaged)
    latest = store.latest()
    planned = store.meta().get("planned", [])
    ok = [k for k, r in latest.items() if r["status"] == "ok"]
    failed = [r for r in latest.values() if r["status"] != "ok"]
    pending = [k for k in planned if k not in latest]
    print(
        f"{args.run_dir}: {len(planned) or len(latest)} planned, {len(ok)} done, {len(failed)} failed, "
        f"{len(pending)} pending"
    )
    for row in failed:
        print(f"  failed  {row['key']}: {row.get('error')}")
    for key in pending:
        print(f"  pending {key}")
    if ok:
        from bench.metrics.memory import phase_table

        print("\nwhere the time and memory went (prepare: the group's data, model and fine-tune, shared by its cells)")
        print(phase_table([latest[k] for k in ok]))
    return 0


# --------------------------------------------------------------------------- parser


SKIP_DAMAGED_HELP = (
    "skip damaged lines of results.jsonl (not JSON or not a result row, with rows after them) with a warning "
    "instead of stopping; a torn last line is always skipped"
)


def _command(sub, func, name: str, *, help: str, description: str, skip_damaged: bool = False):
    """A subcommand ``name`` that runs ``func(args)``; ``skip_damaged``: it reads run dirs (``--skip-damaged``)."""
    command = sub.add_parser(name, help=help, description=description)
    command.set_defaults(func=func)
    if skip_damaged:
        command.add_argument("--skip-damaged", action="store_true", help=SKIP_DAMAGED_HELP)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench",
        description="quantbench: compare quantization methods for pre-trained language models on the same "
        "model, tasks, bit-widths and metrics.",
    )
    parser.add_argument("--version", action="version", version=f"quantbench {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(
        sub,
        cmd_run,
        "run",
        help="run every method x bit-width x task x seed cell (resumes a run dir)",
        description="Run the grid methods x bits x tasks x seeds on one model. Each cell appends a row to "
        "RUN_DIR/results.jsonl; cells already done are skipped, so re-running resumes. An FP32 reference cell "
        "is added per task and seed. Prints the leaderboard at the end.",
        skip_damaged=True,
    )
    run.add_argument(
        "--methods",
        default=None,
        help="comma list of methods (see `bench list methods`); default: the baseline method (plain rounding)",
    )
    run.add_argument("--bits", default="4,8", help="comma list of weight bit-widths, integers 2..8; default 4,8")
    run.add_argument(
        "--act-bits",
        default=None,
        help="activation bits: 2..8, or 32 (float, weights-only quantization, shown as A32); default: the "
        "methods' paper setting (8 when a WxA8 QAT method is in the grid, for every "
        "method of the grid), else 32",
    )
    run.add_argument(
        "--tasks",
        default=None,
        help="comma list of tasks (see `bench list tasks`); default: the task that is the default of the model's kind "
        "(encoder or decoder)",
    )
    run.add_argument("--seeds", default="0", help="comma list of seeds; default 0")
    run.add_argument(
        "--model",
        default="minilm",
        help="minilm (default, embedded MiniLM-L6 encoder), bert-tiny, smollm2-135m, a hub id or a local dir",
    )
    run.add_argument(
        "--granularity",
        default=None,
        help="weight scale granularity: per-tensor, per-channel or per-group; default per-channel for encoders, "
        "per-group (--group-size 128) for decoders",
    )
    run.add_argument("--group-size", type=int, default=128, help="group size for per-group; default 128")
    run.add_argument("--asymmetric", action="store_true", help="asymmetric weight grid (default symmetric)")
    run.add_argument(
        "--narrow-grid",
        action="store_true",
        help="symmetric grid of 2^b - 1 levels (ternary at 2 bits), as some BERT papers define b-bit; default: "
        "every method's grid has all 2^b levels",
    )
    run.add_argument(
        "--quantize-embeddings",
        action="store_true",
        help="also quantize embedding tables (default: embeddings, norms, biases and the task/LM head stay float)",
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="SCOPE.FIELD=VALUE",
        help="override a method setting (METHOD.FIELD=VALUE), one task's recipe (TASK.FIELD=VALUE) or every task's "
        "(task.FIELD=VALUE); see `bench list methods|tasks`; repeatable",
    )
    run.add_argument(
        "--sweep",
        action="append",
        metavar="METHOD.FIELD=V1,V2,...",
        help="make a method setting an axis of the grid: each value is its own cell (a --set for that cell, checked "
        "the same way) and its own leaderboard row, e.g. --sweep METHOD.steps=60,240,960 for a method with a steps "
        "setting (see `bench describe METHOD`); the method must be in --methods; two sweeps of one method run their "
        "product; the baseline and FP32 cells are not multiplied; a rerun with more values runs only the new cells; "
        "repeatable",
    )
    run.add_argument(
        "--data-dir",
        default=None,
        help="local copy of the task data (GLUE: DIR/<TASK>/{train,dev}.tsv or parquet), instead of hub/offline twin",
    )
    run.add_argument("--limit", type=int, default=None, help="cap evaluation examples (quick runs)")
    out = run.add_mutually_exclusive_group()
    out.add_argument("--out", default=None, help="run dir; default results/<--name or timestamp>")
    out.add_argument("--name", default=None, help="run name: results/NAME")
    run.add_argument("--force", action="store_true", help="re-run cells that already have an ok row")
    run.add_argument("--retry-failed", action="store_true", help="only re-run cells whose last row failed")
    run.add_argument("--no-reference", action="store_true", help="do not add the FP32 reference cells")
    run.add_argument(
        "--no-baseline",
        action="store_true",
        help="do not add the baseline cells (the baseline method with default settings at every grid of the run, so "
        "that each quantized cell shows its difference to plain rounding)",
    )
    run.add_argument(
        "--no-sharpness", action="store_true", help="skip the per-cell sharpness (loss increase in a rho-ball)"
    )
    run.add_argument("--rho", type=float, default=0.05, help="radius of the sharpness ball (L2, weights); default 0.05")
    run.add_argument(
        "--hessian",
        action="store_true",
        help="also measure the top Hessian eigenvalue and the Hessian trace (slow: minutes a cell on CPU)",
    )
    run.add_argument(
        "--no-latency", action="store_true", help="skip the per-cell latency measurement (1 x 128 tokens, CPU kernels)"
    )
    run.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    run.add_argument(
        "--executor",
        default="local",
        help="where cells run: local (this machine; default) or ray (one Ray task per cell; needs quantbench[ray])",
    )
    run.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="cells run in parallel: local: N worker processes (default 1, in-process); ray: a local Ray "
        "instance of N x --ray-cpus-per-cell CPUs (default: all CPUs)",
    )
    run.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="connect to the Ray cluster at ADDR (e.g. ray://head:10001 or auto) instead of starting a local one",
    )
    run.add_argument(
        "--ray-cpus-per-cell", type=float, default=1, help="CPUs Ray reserves for each cell's task; default 1"
    )

    lst = _command(
        sub,
        cmd_list,
        "list",
        help="list registered methods, tasks, metrics or reporters (one line each; with NAME: its details)",
        description="List what the installed plugins registered, one line each, and which plugin provided each; "
        "`bench list KIND NAME` (or `bench describe NAME`) shows one in full, with its settings.",
    )
    lst.add_argument("kind", help="methods, tasks, metrics or reporters")
    lst.add_argument("name", nargs="?", default=None, help="one of them: its description, plugin and every setting")

    desc = _command(
        sub,
        cmd_describe,
        "describe",
        help="describe a method, task, metric or reporter: what it does, its data, plugin and settings",
        description="What a registered name is: its description, the data it uses, the plugin that provides it, "
        "and each setting (--set NAME.FIELD=VALUE) with its type, default and help.",
    )
    desc.add_argument("name", help="a method, task, metric or reporter name (see `bench list`)")

    plg = _command(
        sub,
        cmd_plugins,
        "plugins",
        help="list plugins, their versions and what they registered",
        description="Every plugin found in the 'bench' entry-point group, built-in or outside.",
    )
    plg.add_argument("--json", action="store_true", help="machine-readable output")

    lb = _command(
        sub,
        cmd_leaderboard,
        "leaderboard",
        help="render the leaderboard of one or more run dirs",
        description="Merge the results of RUN_DIRs (default: the newest under results/) into one "
        "table: a row per method x bit-width (--layout long, md's default) or a row per method, columns per "
        "bit-width x task (--layout wide).",
        skip_damaged=True,
    )
    lb.add_argument(
        "run_dirs",
        nargs="*",
        metavar="RUN_DIR",
        help="directories written by `bench run`; rows of the same cell: the newest wins",
    )
    lb.add_argument(
        "--format", default="md", help="md, csv, json, html, latex, png (plots), or a format an installed plugin adds"
    )
    lb.add_argument("--output", default=None, help="file to write; default RUN_DIR/leaderboard.FORMAT")
    lb.add_argument(
        "--layout",
        default=None,
        help="long (a row per method x bit-width, fits 120 columns; md's default) or wide (a row per method, columns "
        "per bit-width x task; the default of html and latex); csv, json and png have one layout",
    )

    show = _command(
        sub,
        cmd_show,
        "show",
        help="cells done / failed / pending of a run dir",
        description="Status of a run: which cells are done, failed or still pending.",
        skip_damaged=True,
    )
    show.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `bench run` (results/NAME)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(logs.level_of(args.verbose))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; finished cells are saved, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
