"""Perplexity: windows, the metric against a plain reference loop, offline text, decoder end to end."""

import gc
import json
import math
import types

import pytest
import torch
from bench.tasks import lm as lm_module
from bench.tasks.lm import LMRecipe, WikiText2, perplexity, sliding_windows
from tiny import tiny_llama

from bench.api import TaskData
from bench.cli import main


@pytest.mark.parametrize("n,seq_len,stride", [(100, 16, 16), (100, 16, 5), (17, 16, 16), (16, 16, 8), (2, 16, 16)])
def test_every_token_scored_at_most_once(n, seq_len, stride):
    scored = []
    for begin, end, count in sliding_windows(n, seq_len, stride):
        assert end - begin <= seq_len and count <= end - begin - 1
        scored.extend(range(end - count, end))
    if stride < seq_len:  # overlapping windows: every token after the first is scored, with context
        assert scored == list(range(1, n))
    else:  # GPTQ protocol: a window's first token has no context in it and is not scored
        assert scored == [t for t in range(n) if t % stride]


@pytest.fixture(scope="module")
def tiny_decoder():
    return tiny_llama()


def _reference_perplexity(model, ids, max_len, stride):
    """The Hugging Face documentation's sliding-window loop, with labels masked to -100."""
    nll_sum, n_pred, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_len, len(ids))
        trg_len = end - prev_end
        x = ids[begin:end].unsqueeze(0)
        target = x.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(x, labels=target).loss
        count = int((target[:, 1:] != -100).sum())
        nll_sum += loss.item() * count
        n_pred += count
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_pred)


@pytest.mark.parametrize("chunk", [256, 5])  # 5: chunk edges inside the scored span, a ragged last chunk
@pytest.mark.parametrize("seq_len,stride", [(32, 32), (32, 8)])
def test_perplexity_equals_reference_loop(tiny_decoder, seq_len, stride, chunk, monkeypatch):
    monkeypatch.setattr(lm_module, "NLL_CHUNK", chunk)
    model, tokenizer = tiny_decoder
    data = TaskData(
        {"test": {"text": ["the cat sat on the mat.", "a quick brown fox jumps over the lazy dog " * 6]}},
        "test",
        eval_split="test",
    )
    task = WikiText2()
    nlls, counts = task.predict(model, tokenizer, data, recipe=LMRecipe(seq_len=seq_len, stride=stride))
    ids = task.token_ids(tokenizer, data, "test")
    assert sum(counts) == len(ids) - 1 - (len(ids) - 1) // seq_len * (stride == seq_len)
    assert perplexity(nlls, counts) == pytest.approx(_reference_perplexity(model, ids, seq_len, stride), rel=1e-4)


def test_offline_wiki_split_is_by_document():
    data = WikiText2().load()
    assert data.source.startswith("offline:wiki (exllamav3==1.6.5")
    train, test = data.splits["train"]["text"], data.splits["test"]["text"]
    assert len(train) > 10 and len(test) > 10 and not set(train) & set(test)
    assert not any("<doc" in t for t in test[:50])


def test_decoder_end_to_end(tiny_decoder, tmp_path):
    model, tokenizer = tiny_decoder
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    argv = [
        "run",
        "--model",
        str(tmp_path / "model"),
        "--tasks",
        "wikitext2",
        "--bits",
        "4",
        "--limit",
        "3",
        "--set",
        "task.seq_len=64",
        "--set",
        "task.stride=64",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    rows = {r["bits"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    # a decoder given by its directory gets the decoder's default grid (groups of 128), as an alias does
    rows["W4A32"] = rows.pop("W4A32 g128")
    assert rows["FP32"]["status"] == "ok" and rows["W4A32"]["status"] == "ok"
    assert rows["FP32"]["task_kind"] == "language-modeling" and rows["FP32"]["eval_examples"] == 3
    assert 1 < rows["FP32"]["score"] < 1e6 and rows["FP32"]["finetune"] is None
    assert rows["W4A32"]["quantized"]["kept_fp"] == ["lm_head"]
    assert rows["W4A32"]["latency"]["phase"] == "prefill" and rows["W4A32"]["latency"]["decode"]["p50"] > 0
    assert "wikitext2" in (out / "leaderboard.md").read_text()


def test_sharpness_batches_are_one_window_each_with_the_same_mean_loss(tiny_decoder):
    """One window a batch keeps one small graph alive in the gradient metrics; the loss they probe is unchanged."""
    from bench.metrics.sharpness import mean_loss

    model, tokenizer = tiny_decoder
    text = " ".join(f"word{i % 37} and more text {i}" for i in range(400))
    data = TaskData({"test": {"text": [text]}}, "test", eval_split="test")
    task, recipe = WikiText2(), LMRecipe(calib_seq_len=16, calib_batch_size=4, loss_windows=6)
    batches = task.loss_batches(tokenizer, data, 100, seed=3, recipe=recipe)
    assert [b["input_ids"].shape for b in batches] == [torch.Size([1, 16])] * 6
    together = {"input_ids": torch.cat([b["input_ids"] for b in batches])}
    with torch.no_grad():
        lazy = sum(mean_loss(batches, loss=task.loss, lazy=True)(model)).item()
        assert lazy == pytest.approx(task.loss(model, together).item(), rel=1e-5)


class _CharTokenizer:
    """One id per character, shifted by ``shift``: two of them tokenize one text differently."""

    def __init__(self, shift: int):
        self.shift = shift

    def __call__(self, text, return_tensors):
        return types.SimpleNamespace(input_ids=torch.tensor([[ord(c) + self.shift for c in text]]))


def test_token_ids_are_cached_per_tokenizer_while_it_lives():
    task, data = WikiText2(), TaskData({"train": {"text": ["ab", "cd"]}}, "offline:x")
    first, second = _CharTokenizer(0), _CharTokenizer(1)
    ids = task.token_ids(first, data, "train")
    assert task.token_ids(first, data, "train") is ids  # tokenized once
    assert torch.equal(task.token_ids(second, data, "train"), ids + 1)  # never another tokenizer's cached ids
    del second
    gc.collect()
    assert len(task._ids) == 1  # a freed tokenizer's text is freed with it


def _loss_and_grads(loss_fn, model, ids):
    model.zero_grad()
    loss = loss_fn(model, ids)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_lm_loss_equals_the_models_own_loss_and_gradients(monkeypatch, tied):
    """The chunked, checkpointed head (several chunks, a ragged last one) gives Hugging Face's labels= loss and the
    same gradients, a tied head's included."""
    from tiny import llama_config
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(lm_module, "NLL_CHUNK", 5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tie_word_embeddings=tied)).eval()
    ids = torch.randint(0, 30522, (2, 23))
    own, own_grads = _loss_and_grads(lambda m, x: m(input_ids=x, labels=x).loss, model, ids)
    mine, my_grads = _loss_and_grads(lm_module.chunked_lm_loss, model, ids)
    assert mine == pytest.approx(own, rel=1e-5)
    assert len(my_grads) == len(own_grads)
    for a, b in zip(my_grads, own_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_task_loss_chunks_where_it_agrees_and_keeps_a_soft_capped_models_own(monkeypatch):
    """Gemma 2 soft-caps its logits after the output layer: chunking that layer alone would score other logits,
    so its own loss is kept; a Llama's is chunked (the chunked function runs)."""
    from tiny import DECODER_FIELDS, llama_config
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

    monkeypatch.setattr(lm_module, "CHUNKED_LOSS_ABOVE", 0)
    calls = []
    chunked = lm_module.chunked_lm_loss
    monkeypatch.setattr(lm_module, "chunked_lm_loss", lambda m, x: calls.append(type(m).__name__) or chunked(m, x))
    torch.manual_seed(0)
    fields = {**DECODER_FIELDS, "vocab_size": 1000, "head_dim": 8, "final_logit_softcapping": 0.5}
    gemma = Gemma2ForCausalLM(Gemma2Config(**fields)).eval()
    with torch.no_grad():
        gemma.lm_head.weight.mul_(50)  # logits far beyond the cap (a random model's are near 0)
    llama = LlamaForCausalLM(llama_config()).eval()
    ids = torch.randint(0, 1000, (1, 12))
    task = WikiText2()
    for model in (gemma, llama):
        with torch.no_grad():
            assert task.loss(model, {"input_ids": ids}).item() == pytest.approx(
                model(input_ids=ids, labels=ids).loss.item(), rel=1e-5
            )
    assert calls.count("Gemma2ForCausalLM") == 1  # the check only: then its own loss
    assert calls.count("LlamaForCausalLM") == 2  # the check, then the loss
