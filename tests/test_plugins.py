"""Plugin loading through real entry points, clashes, broken plugins, provenance."""

import pytest
from tiny import installed_plugin, plugin_module

from bench import plugins
from bench.api import Method
from bench.errors import DuplicateNameError, PluginError, UnknownNameError
from bench.registry import Provider, Registry


class Dummy(Method):
    pass


def test_builtins_arrive_through_entry_points():
    loaded = plugins.load()
    assert {"fp32", "rtn"} <= set(loaded.methods.names())
    assert "sst2" in loaded.tasks.names()
    assert {"md", "csv", "json", "html"} <= set(loaded.reporters.names())
    entry = loaded.methods.entry("rtn")
    assert entry.provider.plugin == "rtn" and entry.provider.dist == "quantbench"


def test_duplicate_name_names_both_plugins():
    def reg_a(register):
        register("rtn", Dummy)

    with pytest.raises(DuplicateNameError, match=r"rtn.*rtn \(quantbench.*clashing"):
        plugins.load(extra=[("clashing", plugin_module("clashing", register_methods=reg_a))])


def test_alias_clash_is_a_duplicate_too():
    registry = Registry("methods")
    registry.add("a", Dummy, Provider("p1", "d1", "1"), aliases=("x",))
    with pytest.raises(DuplicateNameError, match="p1.*p2"):
        registry.add("x", Dummy, Provider("p2", "d2", "2"))


def test_unknown_name_did_you_mean():
    registry = Registry("methods")
    registry.add("gptq", Dummy, Provider("p", "d", "1"))
    with pytest.raises(UnknownNameError, match=r"unknown method 'gtpq' \(did you mean 'gptq'\?\); choose from: gptq"):
        registry.get("gtpq")
    assert registry.get("GPTQ") is Dummy


def _fake_dist(tmp_path, monkeypatch, module_source: str):
    """A real installed distribution (dist-info + entry point) whose module is ``module_source``."""
    installed_plugin(tmp_path, monkeypatch, "brokenplug", module_source, version="0.3")


def test_plugin_failing_to_import_is_named_and_skipped(tmp_path, monkeypatch):
    _fake_dist(tmp_path, monkeypatch, "raise ImportError('needs libfoo')\n")
    monkeypatch.delenv("BENCH_STRICT", raising=False)
    with pytest.warns(UserWarning, match=r"plugin 'brokenplug' \(brokenplug 0.3\) failed to import.*libfoo"):
        loaded = plugins.load()
    assert "rtn" in loaded.methods  # the others still load
    info = next(i for i in loaded.infos if i.name == "brokenplug")
    assert "libfoo" in info.error


def test_strict_mode_makes_a_broken_plugin_fatal(tmp_path, monkeypatch):
    _fake_dist(tmp_path, monkeypatch, "raise ImportError('needs libfoo')\n")
    monkeypatch.setenv("BENCH_STRICT", "1")
    with pytest.raises(PluginError, match="brokenplug.*libfoo.*BENCH_STRICT"):
        plugins.load()


def test_plugin_raising_during_registration_is_named(tmp_path, monkeypatch):
    _fake_dist(
        tmp_path,
        monkeypatch,
        """
        from bench import hookimpl

        @hookimpl
        def register_methods(register):
            raise RuntimeError("boom in registration")
    """,
    )
    monkeypatch.delenv("BENCH_STRICT", raising=False)
    with pytest.warns(UserWarning, match="brokenplug.*register methods.*boom"):
        plugins.load()


MALFORMED = """
    from bench import hookimpl
    from bench.api import Method

    class NotAMethod:  # no bench.api.Method base: no data_used, no Config
        pass

    class Good(Method):
        description = "fine"

    @hookimpl
    def register_methods(register):
        register("broken", NotAMethod)
        register("goodone", Good)

    @hookimpl
    def register_metrics(register):
        register("nodirection", lambda p, r: 0.0)
"""


def test_malformed_registration_is_named_and_skipped_the_rest_listed(tmp_path, monkeypatch, capsys):
    _fake_dist(tmp_path, monkeypatch, MALFORMED)
    monkeypatch.delenv("BENCH_STRICT", raising=False)
    with pytest.warns(UserWarning) as caught:
        loaded = plugins.load()
    messages = " ".join(str(w.message) for w in caught)
    assert "brokenplug" in messages and "method 'broken'" in messages and "not a bench.api.Method subclass" in messages
    assert "metric 'nodirection'" in messages and "higher_is_better" in messages
    assert "broken" not in loaded.methods and "goodone" in loaded.methods and "rtn" in loaded.methods
    assert "nodirection" not in loaded.metrics

    from bench.cli import main

    monkeypatch.setattr(plugins, "default", lambda: loaded)
    assert main(["list", "methods"]) == 0  # the listing survives one bad plugin (was an AttributeError traceback)
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()[2:] if line.strip()]
    assert "goodone" in names and "zsaq" in names and "broken" not in names


def test_malformed_registration_is_fatal_in_strict_mode(tmp_path, monkeypatch):
    _fake_dist(tmp_path, monkeypatch, MALFORMED)
    monkeypatch.setenv("BENCH_STRICT", "1")
    with pytest.raises(PluginError, match=r"brokenplug.*method 'broken'.*BENCH_STRICT"):
        plugins.load()


@pytest.mark.parametrize(
    "kind,obj,meta,problem",
    [
        ("methods", Dummy(), {}, "not a bench.api.Method subclass"),
        ("methods", type("BadData", (Method,), {"data_used": "everything"}), {}, "data_used='everything'"),
        ("tasks", Dummy, {}, "not a bench.api.Task subclass"),
        ("reporters", "md", {}, "not callable"),
    ],
)
def test_registry_checks_each_kind(kind, obj, meta, problem):
    from bench.errors import MalformedPluginError
    from bench.registry import checks

    registry = Registry(kind, checks()[kind])
    with pytest.raises(MalformedPluginError, match=problem):
        registry.add("x", obj, Provider("p", "d", "1"), **meta)


def test_list_prints_one_short_line_per_plugin(capsys):
    from bench import __version__
    from bench.cli import main

    for kind in plugins.KINDS:
        assert main(["list", kind]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert max(map(len, lines)) <= 120, (kind, lines)
        assert [line.split()[0] for line in lines[2:]] == plugins.default().registry(kind).names()
    main(["list", "methods"])
    rtn = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("rtn "))
    assert rtn.split()[1] == "none" and "round-to-nearest" in rtn and rtn.endswith(f"rtn (quantbench {__version__})")
    assert "clip=" not in rtn  # settings: in `bench describe rtn`


def test_describe_shows_every_setting_with_its_type_default_and_help(capsys):
    import dataclasses

    from bench.cli import main

    assert main(["describe", "rtn"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("method rtn: round-to-nearest") and "data used: none" in out and "role: baseline" in out
    assert "plugin: rtn (quantbench" in out and "settings (--set rtn.FIELD=VALUE):" in out
    assert "    clip: Literal['minmax', 'percentile', 'mse'] = 'minmax'" in out
    assert main(["list", "methods", "zsaq"]) == 0  # the same details
    out = capsys.readouterr().out
    for field in dataclasses.fields(plugins.default().methods.get("zsaq").Config):
        assert f"    {field.name}: " in out, field.name
    assert "    rho: float = 0.05\n        SAM radius (paper default)\n" in out  # the field's comment is its help
    assert "Generator objective D + diversity" in out  # a comment above the field
    assert max(map(len, out.splitlines())) <= 120
    assert main(["describe", "sst-2"]) == 0  # an alias; a task's settings are its recipe
    out = capsys.readouterr().out
    assert out.startswith("task sst2:") and "aliases: sst-2" in out and "kind: classification" in out
    assert "metrics: accuracy (higher is better; a fraction, shown x100)" in out and "offline twin" in out
    assert "max_train_examples: int = 4000\n        0 = the whole training split" in out
