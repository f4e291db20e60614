"""AWQ: the scale search against a brute-force reference, alpha = 0 is RTN, and lower error than RTN."""

import copy

import pytest
import torch
from bench.methods.awq import AWQ, AWQConfig, _row_output_error
from bench.methods.rtn import RTN
from tiny import OneLinear, padded_batches, tiny_bert
from torch import nn

from bench.api import MethodContext, QuantSpec
from bench.errors import BenchError
from bench.quant.layers import DEFAULT_KEEP_FP, QuantLinear
from bench.quant.smoothing import awq_scales
from bench.quant.uniform import fake_quantize


def _inputs(seed: int, n: int = 512) -> torch.Tensor:
    """Inputs with a few input channels of large magnitude (the salient channels AWQ protects)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    x[:, 5] *= 20.0
    x[:, 33] *= 8.0
    x[:, 50] *= 4.0
    return x


def _linear() -> OneLinear:
    torch.manual_seed(0)
    return OneLinear(nn.Linear(64, 48))


def _context(batches, keep_fp=DEFAULT_KEEP_FP) -> MethodContext:
    return MethodContext(task=None, tokenizer=None, seed=0, keep_fp=keep_fp, calibration=lambda n: batches)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _brute_force_alpha(w, b, x, spec, grid):
    """The paper's search written out: for each alpha, quantize W * s with RTN and measure the output error."""
    mean = x.abs().mean(0)
    reference = x @ w.T + b
    errors = []
    for i in range(grid):
        s = mean.pow(i / grid).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quantize(w * s, spec.w_bits, granularity=spec.granularity, group_size=spec.group_size)
        errors.append(((x / s) @ wq.T + b - reference).pow(2).mean().item())
    best = min(range(grid), key=errors.__getitem__)
    return best / grid, errors


@pytest.mark.parametrize("spec", [QuantSpec(3), QuantSpec(4, granularity="per-group", group_size=16)])
def test_scale_search_matches_brute_force(spec):
    fp, x = _linear(), _inputs(1)
    context = _context([{"x": x}], keep_fp=())
    model = AWQ(AWQConfig(clip_search=False)).quantize(copy.deepcopy(fp), spec, context)
    alpha, errors = _brute_force_alpha(fp.fc.weight.detach(), fp.fc.bias.detach(), x, spec, grid=20)
    assert context.report["alphas"] == {"fc": pytest.approx(alpha)}
    assert 0 < alpha < 1 and min(errors) < 0.8 * errors[0]  # the search matters here
    expected = awq_scales(x.abs().mean(0), alpha)
    torch.testing.assert_close(model.fc.input_scale, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("granularity", ["per-channel", "per-group"])
def test_layer_output_error_lower_than_rtn_with_large_input_channel(bits, granularity):
    fp = _linear()
    cal, test = _inputs(1), _inputs(2)
    spec = QuantSpec(bits, granularity=granularity, group_size=16)
    context = _context([{"x": cal}], keep_fp=())
    reference = fp(test).detach()
    rtn_err = _rel(RTN().quantize(copy.deepcopy(fp), spec, context)(test).detach(), reference)
    awq_err = _rel(AWQ().quantize(copy.deepcopy(fp), spec, context)(test).detach(), reference)
    assert awq_err < 0.8 * rtn_err, (awq_err, rtn_err)


def test_alpha_zero_reproduces_rtn_exactly():
    assert torch.equal(awq_scales(torch.rand(10) * 5, 0.0), torch.ones(10))
    fp = tiny_bert(outlier_scale=10.0)
    batches = padded_batches(2, seed=1)
    spec = QuantSpec(3, granularity="per-group", group_size=16)
    awq = AWQ(AWQConfig(grid=1, clip_search=False)).quantize(copy.deepcopy(fp), spec, _context(batches))
    rtn = RTN().quantize(copy.deepcopy(fp), spec, _context(batches))
    rtn_layers = {n: m for n, m in rtn.named_modules() if isinstance(m, QuantLinear)}
    for name, layer in awq.named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(layer.quantized_weight(), rtn_layers[name].quantized_weight()), name
    held_out = padded_batches(1, seed=2)
    torch.testing.assert_close(_logits(awq, held_out), _logits(rtn, held_out), rtol=0, atol=0)


def test_duo_scaling_formula_and_result():
    """AutoAWQ's duo scaling: s = mean|x|^a / (mean_rows(|W| / group max|W|)^(1-a) + 1e-4), normalized."""
    fp, cal, test = _linear(), _inputs(1), _inputs(2)
    spec = QuantSpec(3, granularity="per-group", group_size=16)
    w = fp.fc.weight.detach()
    groups = w.abs().reshape(48, 4, 16)
    w_mean = (groups / (groups.amax(-1, keepdim=True) + 1e-6)).reshape(48, 64).mean(0)
    mean = cal.abs().mean(0)
    context = _context([{"x": cal}], keep_fp=())
    model = AWQ(AWQConfig(duo_scaling=True, clip_search=False)).quantize(copy.deepcopy(fp), spec, context)
    alpha = context.report["alphas"]["fc"]
    s = (mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
    torch.testing.assert_close(model.fc.input_scale, s / (s.max() * s.min()).sqrt(), rtol=1e-5, atol=1e-6)
    rtn = RTN().quantize(copy.deepcopy(fp), spec, _context([], keep_fp=()))
    reference = fp(test).detach()
    assert _rel(model(test).detach(), reference) < _rel(rtn(test).detach(), reference)


def test_row_output_error_matches_direct_sum_per_group():
    """Each grouped-view row's share of the output error, ragged last group included (40 = 16 + 16 + 8)."""
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(30, 40, generator=g), torch.randn(6, 40, generator=g)
    ours = _row_output_error(x, delta, "per-group", 16)
    direct = torch.stack(
        [(x[:, s : s + 16] @ delta[o, s : s + 16]).pow(2).sum() for o in range(6) for s in range(0, 40, 16)]
    )
    torch.testing.assert_close(ours.flatten(), direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_row_output_error(x, delta, "per-channel", 16).flatten(), (x @ delta.T).pow(2).sum(0))
    torch.testing.assert_close(
        _row_output_error(x, delta, "per-tensor", 16).flatten(), (x @ delta.T).pow(2).sum()[None]
    )


def test_clip_search_does_not_increase_calibration_error_per_channel():
    """Per-channel, each row's error is that output's whole error, so the per-row search can only lower it."""
    fp, cal = _linear(), _inputs(1, n=256)
    spec, context = QuantSpec(3), _context([{"x": cal}], keep_fp=())
    reference = fp(cal).detach()
    no_clip = AWQ(AWQConfig(clip_search=False)).quantize(copy.deepcopy(fp), spec, context)
    clipped = AWQ(AWQConfig(clip_search=True)).quantize(copy.deepcopy(fp), spec, context)
    torch.testing.assert_close(clipped.fc.input_scale, no_clip.fc.input_scale)
    err_clip = (clipped(cal).detach() - reference).pow(2).sum(0)
    err_plain = (no_clip(cal).detach() - reference).pow(2).sum(0)
    assert bool((err_clip <= err_plain * (1 + 1e-5)).all())
    assert err_clip.sum() < 0.95 * err_plain.sum()  # and it does clip something at 3 bits


# --------------------------------------------------------------------------- tiny BERT end to end


@torch.no_grad()
def _logits(model, batches):
    return torch.cat([model(**b).logits for b in batches])


# On this toy the full 2^b-level grid makes RTN much better at 3 bits (AWQ/RTN error 0.91 there, 0.41 on the
# narrow grid); at 4 bits AWQ still halves RTN's error. Both grids are checked against the same margin.
@pytest.mark.parametrize("spec", [QuantSpec(4), QuantSpec(3, narrow=True)], ids=["W4", "W3-narrow"])
def test_method_end_to_end_on_tiny_bert_beats_rtn(spec):
    fp = tiny_bert(outlier_scale=10.0)
    cal, held_out = padded_batches(3, seed=1), padded_batches(2, seed=2)
    reference = _logits(fp, held_out)
    context = _context(cal)
    awq = AWQ().quantize(copy.deepcopy(fp), spec, context)
    rtn = RTN().quantize(copy.deepcopy(fp), spec, _context(cal))

    body = {n: m for n, m in awq.named_modules() if isinstance(m, QuantLinear)}
    assert "bert.pooler.dense" in body and type(awq.classifier) is nn.Linear  # outside the blocks, head kept
    assert set(context.report["alphas"]) == set(body)
    assert all(m.input_scale is not None and m.weight_quantizer.frozen for m in body.values())
    attn = awq.bert.encoder.layer[0].attention.self
    assert torch.equal(attn.query.input_scale, attn.key.input_scale)  # q/k/v read one tensor: one scale
    awq_err, rtn_err = _rel(_logits(awq, held_out), reference), _rel(_logits(rtn, held_out), reference)
    assert awq_err < 0.8 * rtn_err, (awq_err, rtn_err)


def test_blocks_are_calibrated_on_inputs_from_the_already_quantized_earlier_blocks(monkeypatch):
    import bench.methods.awq as awq_module

    recorded = {}
    original = awq_module.collect_inputs

    def spy(stream, batches, layers, max_tokens):
        stats, samples = original(stream, batches, layers, max_tokens)
        recorded.update(samples)
        return stats, samples

    monkeypatch.setattr(awq_module, "collect_inputs", spy)
    fp, cal = tiny_bert(outlier_scale=10.0), padded_batches(2, seed=1)
    quantized = AWQ(AWQConfig(max_tokens=10**6)).quantize(copy.deepcopy(fp), QuantSpec(3), _context(cal))

    def query_inputs(model):
        seen = []
        query = model.bert.encoder.layer[1].attention.self.query
        handle = query.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        _logits(model, cal)
        handle.remove()
        return torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, cal, strict=True)])

    name = "bert.encoder.layer.1.attention.self.query"
    torch.testing.assert_close(recorded[name], query_inputs(quantized))  # block 0 quantized as in the result
    assert not torch.allclose(recorded[name], query_inputs(fp), atol=1e-3)  # not the FP activations


def test_weight_and_activation_cell_runs():
    fp, cal = tiny_bert(outlier_scale=10.0), padded_batches(2, seed=1)
    model = AWQ().quantize(copy.deepcopy(fp), QuantSpec(4, a_bits=8), _context(cal))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(m.weight_quantizer.frozen and m.input_scale is not None for m in layers)
    assert _rel(_logits(model, cal), _logits(fp, cal)) < 0.1


def test_needs_calibration_data():
    with pytest.raises(BenchError, match="calibration"):
        AWQ().quantize(tiny_bert(outlier_scale=10.0), QuantSpec(4), MethodContext(task=None, tokenizer=None, seed=0))
