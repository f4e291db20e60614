"""The core's shape: no import circle among bench/'s modules (lazy imports inside functions included: a circle
hidden in a function is still one), so the path of a run reads downhill; and the core names no plugin."""

import ast
import re
from pathlib import Path

from bench import plugins

CORE = Path(__file__).resolve().parent.parent / "bench"


def _module(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in CORE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from bench import models` imports the module bench.models; `from bench import hookimpl` the package
                edges |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                }
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_in_bench():
    graph = _graph()
    assert "bench.runner" in graph["bench.cli"]  # a lazy import (inside cmd_run) is an edge too
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# strings of the core that equal a built-in plugin's name by coincidence, not to name the plugin
NOT_A_PLUGIN = {
    ("bench/quant/kernels.py", "fp32"): "the kernel label of float nn.Linear layers",
    ("bench/leaderboard.py", "fp32"): "the same kernel label (no low-bit kernel ran: no speedup)",
    ("bench/grid.py", "fp"): "the resume key's segment of a cell without a quantization spec",
    ("bench/quant/layers.py", "fp"): "'full precision' in a layer's repr",
}


def _strings(tree: ast.AST):
    """Every string constant of a module that is not a docstring (a bare string statement)."""
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_the_core_names_no_plugin():
    """No method or task name (nor alias) of the built-in plugins in bench/'s code: which method is the reference
    or the baseline, which task a model kind defaults to, how a score scales and ranks -- plugins declare it."""
    loaded = plugins.default()
    names = {
        name
        for registry in (loaded.methods, loaded.tasks)
        for entry in registry.entries()
        if entry.provider.dist == "quantbench"
        for name in (entry.name, *entry.aliases)
    }
    assert {"fp32", "rtn", "sst2", "wikitext2", "glue"} <= names
    found = []
    for path in sorted(CORE.rglob("*.py")):
        where = str(path.relative_to(CORE.parent))
        for node in _strings(ast.parse(path.read_text())):
            for name in names:
                if (where, name) not in NOT_A_PLUGIN and re.search(
                    rf"(?<![\w-]){re.escape(name)}(?![\w-])", node.value
                ):
                    found.append(f"{where}:{node.lineno} {name!r} in {node.value!r}")
    assert not found, "the core names plugins:\n" + "\n".join(found)
