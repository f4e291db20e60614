"""The fine-tuned FP cache: trained once, reused, and never left half-written."""

from dataclasses import asdict

import pytest
from bench.tasks.glue import SST2, GlueRecipe

from bench import hub, models


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


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_cache_entry_is_detected_and_retrained_not_loaded(damage, caplog):
    from pathlib import Path

    import torch

    task, resolved = SST2(), models.resolve("bert-tiny")
    data = task.load()
    recipe = GlueRecipe(max_train_examples=32, batch_size=16, lr=3e-5, max_length=16 + (damage == "delete"))
    net, _, info = models.load_finetuned(resolved, task, data, 0, recipe)
    weights = next(Path(info["cache_dir"]).glob("*.safetensors"))
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
    again, _, info2 = models.load_finetuned(resolved, task, data, 0, recipe)
    assert info2["cached"] is False and "is damaged" in caplog.text and weights.name in caplog.text
    # a whole model was trained again (not the damaged one loaded), and its new entry loads next time
    assert net.state_dict().keys() == again.state_dict().keys()
    assert all(torch.isfinite(t).all() for t in again.state_dict().values() if t.is_floating_point())
    _, _, info3 = models.load_finetuned(resolved, task, data, 0, recipe)
    assert info3["cached"] is True
