"""The fine-tuned FP cache: trained once, reused, and never left half-written."""

from dataclasses import asdict

import pytest

from bench import hub, models
from tasks.glue import SST2, GlueRecipe


def test_killed_finetune_leaves_no_loadable_cache(monkeypatch):
    task, resolved = SST2(), models.resolve("bert-tiny")
    data = task.load()
    recipe = GlueRecipe(max_train_examples=32, batch_size=16, lr=3e-5)

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        models.load_finetuned(resolved, task, data, 0, recipe)
    key = models.finetune_key(resolved, task.name, data.fingerprint(), 0, asdict(recipe))
    leftovers = list((hub.cache_root() / "finetuned").glob(f"*{key}*"))
    assert leftovers == []  # neither a final entry nor the temp dir it was being written to
    monkeypatch.undo()
    _, _, info = models.load_finetuned(resolved, task, data, 0, recipe)
    assert info["cached"] is False
    _, _, again = models.load_finetuned(resolved, task, data, 0, recipe)
    assert again["cached"] is True and again["cache_dir"] == info["cache_dir"]


def test_key_changes_with_every_input():
    resolved = models.resolve("bert-tiny")
    base = models.finetune_key(resolved, "sst2", "abc", 0, {"lr": 1e-4})
    assert base != models.finetune_key(resolved, "sst2", "abd", 0, {"lr": 1e-4})
    assert base != models.finetune_key(resolved, "sst2", "abc", 1, {"lr": 1e-4})
    assert base != models.finetune_key(resolved, "sst2", "abc", 0, {"lr": 2e-4})
    assert base != models.finetune_key(models.resolve("minilm"), "sst2", "abc", 0, {"lr": 1e-4})
