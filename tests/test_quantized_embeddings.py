"""``--quantize-embeddings`` on a decoder with a tied LM head: one quantized table, used by the input lookup and
the head alike, stored once in packed form, and timed on a real kernel."""

import pytest
import torch
from tiny import llama_config
from torch import nn
from transformers import LlamaForCausalLM

from bench.api import QuantSpec
from bench.metrics.size import fp32_size_bytes, size_breakdown, size_bytes
from bench.quant import QuantEmbedding, fake_quantize, freeze, quantize_model, summarize
from bench.quant.export import packed_nbytes
from bench.quant.kernels import KERNEL_RTOL, build_latency_model
from bench.quant.layers import DEFAULT_KEEP_FP, QuantLinear, QuantTiedHead

SPEC = dict(granularity="per-group", group_size=32)


def tied_llama(seed: int = 0, *, tie: bool = True) -> LlamaForCausalLM:
    """A random 2-layer Llama small enough for the int kernels' shape rules (vocab 128, hidden 64)."""
    torch.manual_seed(seed)
    config = llama_config(vocab_size=128, hidden_size=64, intermediate_size=128, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    return model


def _ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def _quantized(spec: QuantSpec, seed: int = 0) -> LlamaForCausalLM:
    return freeze(quantize_model(tied_llama(seed), spec, keep_fp=DEFAULT_KEEP_FP))


def test_tied_head_reads_the_quantized_table_and_logits_follow():
    model = _quantized(QuantSpec(4, embeddings=True, **SPEC))
    table, head = model.model.embed_tokens, model.lm_head
    assert isinstance(table, QuantEmbedding) and isinstance(head, QuantTiedHead)
    assert summarize(model)["tied_heads"] == ["lm_head"] and "lm_head" not in summarize(model)["kept_fp"]
    expected_table = fake_quantize(table.weight.detach(), 4, granularity="per-group", group_size=32)
    assert torch.equal(head.quantized_weight(), expected_table)
    ids = _ids()
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, hidden @ expected_table.T)  # the head computes with Q(E), not E
    assert "table" not in dict(head.named_children())  # held once, by the embedding:
    assert not [k for k in model.state_dict() if k.startswith("lm_head.")]


def test_untied_or_unquantized_heads_stay_float():
    plain = _quantized(QuantSpec(4, **SPEC))  # embeddings off: the tied head stays the float nn.Linear
    assert type(plain.lm_head) is nn.Linear and type(plain.model.embed_tokens) is nn.Embedding
    untied = tied_llama(tie=False)
    quantize_model(untied, QuantSpec(4, embeddings=True, **SPEC), keep_fp=DEFAULT_KEEP_FP)
    assert type(untied.lm_head) is nn.Linear and isinstance(untied.model.embed_tokens, QuantEmbedding)


def test_head_activations_follow_the_cell():
    model = _quantized(QuantSpec(4, a_bits=8, embeddings=True, granularity="per-channel"))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    expected = fake_quantize(x, 8, symmetric=False, granularity="per-channel") @ model.lm_head.quantized_weight().T
    torch.testing.assert_close(model.lm_head(x), expected)


def test_table_is_stored_packed_once():
    spec = QuantSpec(4, embeddings=True, **SPEC)
    with_table, without = _quantized(spec), _quantized(QuantSpec(4, **SPEC))
    table = with_table.model.embed_tokens
    packed = sum(packed_nbytes(table).values())
    assert packed_nbytes(table)["codes"] == 128 * 64 * 4 // 8
    float_table = 128 * 64 * 4
    assert size_bytes(with_table) == size_bytes(without) - float_table + packed
    assert size_breakdown(with_table)["other"] == size_breakdown(without)["other"] - float_table
    assert fp32_size_bytes(with_table) == fp32_size_bytes(without) == fp32_size_bytes(tied_llama())


@pytest.mark.parametrize(
    "spec,kernel",
    [
        (QuantSpec(4, embeddings=True, **SPEC), "int4pack"),
        (QuantSpec(8, embeddings=True, granularity="per-channel"), "int8pack"),
        (QuantSpec(4, a_bits=8, embeddings=True, granularity="per-channel"), "int8-gemm"),
    ],
)
def test_latency_model_runs_the_tied_head_on_a_real_kernel(spec, kernel):
    model = _quantized(spec)
    fast, kernels = build_latency_model(model)
    assert fast.lm_head.kernel == kernel and "fp32" not in kernels
    assert kernels[kernel] == 2 * 7 + 1  # 7 Linears per Llama block, and the head
    assert isinstance(fast.model.embed_tokens, QuantEmbedding)  # a lookup: no kernel, as scored
    ids = _ids()
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, fast(input_ids=ids).logits
    assert ((got - ref).norm() / ref.norm()).item() < KERNEL_RTOL


def test_calibration_methods_leave_the_shared_table_alone():
    """GPTQ edits Linear weights in place; the tied table is not one of them (it would change the input lookup)."""
    from bench.api import MethodContext
    from methods.gptq import GPTQ, GPTQConfig

    model = tied_llama()
    before = model.model.embed_tokens.weight.detach().clone()
    batches = [{"input_ids": _ids(), "attention_mask": torch.ones(2, 12, dtype=torch.long)}]
    context = MethodContext(task=None, tokenizer=None, seed=0, keep_fp=DEFAULT_KEEP_FP, calibration=lambda n: batches)
    gptq = GPTQ(GPTQConfig(n_samples=2, block_size=16))
    quantized = gptq.quantize(model, QuantSpec(4, embeddings=True, **SPEC), context)
    assert torch.equal(quantized.model.embed_tokens.weight, before)
    assert isinstance(quantized.lm_head, QuantTiedHead)
    assert sum(isinstance(m, QuantLinear) for m in quantized.modules()) == 14
