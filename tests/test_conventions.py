"""Conventions users expect of a Python tool: ``python -m bench`` is ``bench``, and the dependency list is what
the code imports (nothing missing, nothing declared for no reason).

Every third-party module imported anywhere in bench/, methods/ or tasks/ (lazy imports inside functions too)
must come from a declared dependency or extra; every declared core dependency must be imported, or be listed
below with the reason a library needs it on our behalf.
"""

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("bench", "methods", "tasks")
# declared but not imported by our code: who uses them for us
USED_INDIRECTLY = {
    "tabulate": "pandas.DataFrame.to_markdown renders the md leaderboard with it",
    "jinja2": "pandas Styler renders the HTML leaderboard with it",
    "safetensors": "transformers' save_pretrained/from_pretrained of the fine-tune cache",
    "accelerate": "transformers needs it to load GGUF checkpoints (extra 'gguf')",
    "gguf": "transformers reads SmolLM2's GGUF file with it (extra 'gguf')",
    "markdown-it-py": "benchmarks/study.py renders results/published/index.html with it (make leaderboard)",
}
OWN = {"bench", "methods", "tasks"}


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(d) for d in project["dependencies"]}
    extras = {_requirement_name(d) for deps in project["optional-dependencies"].values() for d in deps}
    return core, extras


def _imported_modules() -> set[str]:
    found = set()
    for source in SOURCES:
        for path in (ROOT / source).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - OWN - {"__future__"}


def _distributions(modules: set[str]) -> dict[str, str]:
    mapping = md.packages_distributions()
    return {m: mapping[m][0].lower().replace("_", "-") for m in modules if m in mapping}


def test_every_imported_package_is_declared():
    core, extras = _declared()
    dists = _distributions(_imported_modules())
    missing = {m: d for m, d in dists.items() if d not in core | extras}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_core_dependency_is_used():
    core, _ = _declared()
    used = set(_distributions(_imported_modules()).values())
    unused = core - used - set(USED_INDIRECTLY)
    assert not unused, f"declared but never imported (remove, or say in USED_INDIRECTLY who needs it): {unused}"


def test_python_dash_m_bench_is_the_bench_command():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "bench", "list", "reporters"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "md" in out.stdout and "html" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "bench", "list", "metrix"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "did you mean 'metrics'" in bad.stderr


def test_a_users_own_tasks_py_and_methods_py_do_not_shadow_the_built_ins(tmp_path):
    """Built-ins install as bench.methods / bench.tasks: a user's tasks.py (invoke, Celery, notebooks) or
    methods.py in the working directory, first on sys.path, must not hide them."""
    (tmp_path / "tasks.py").write_text("raise RuntimeError('the user tasks.py was imported')\n")
    (tmp_path / "methods.py").write_text("raise RuntimeError('the user methods.py was imported')\n")
    code = (
        "import warnings; warnings.simplefilter('error');"
        "from bench import plugins; p = plugins.default();"
        "print(' '.join(p.methods.names())); print(' '.join(p.tasks.names()))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENCH_STRICT": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    methods, tasks = (set(line.split()) for line in out.stdout.splitlines())
    assert {"fp32", "rtn", "gptq", "awq", "smoothquant", "zsaq", "gan", "lsq", "squat", "prequant"} <= methods
    assert {"sst2", "cola", "glue", "wikitext2", "c4", "sst2-zs", "hellaswag"} <= tasks


def test_loading_the_plugins_leaves_transformers_scipy_and_sklearn_to_the_work_that_needs_them():
    # `bench list` loads every plugin: these three once added about 5 s to each command on 2 cores. transformers'
    # logging is quieted all the same, through the environment it reads on import
    code = (
        "import logging, sys; from bench import logs, plugins; plugins.default(); logs.setup(logging.WARNING); "
        "print(sorted(m for m in ('transformers', 'scipy', 'sklearn') if m in sys.modules)); "
        "import transformers; print(transformers.logging.get_verbosity() == logging.ERROR)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.split() == ["[]", "True"], proc.stderr
