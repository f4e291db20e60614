"""GPTQ: the blocked algorithm against a plain column-by-column reference, against RTN, and end to end."""

import pytest
import torch
from bench.methods._gptq_solver import (
    HessianAccumulator,
    SharedHessians,
    gptq_layer,
    gptq_quantize,
    inverse_hessian_cholesky,
)
from bench.methods.gptq import GPTQ, GPTQConfig
from tiny import tiny_bert
from torch import nn

from bench.api import MethodContext, QuantSpec
from bench.quant.calibration import linear_layers, stream_inputs
from bench.quant.layers import DEFAULT_KEEP_FP, QuantLinear, WeightQuantizer, quantize_model
from bench.quant.uniform import group_view, quantize_int

SPECS = {
    "per-channel": QuantSpec(4, granularity="per-channel"),
    "per-group": QuantSpec(4, granularity="per-group", group_size=16),
    "per-tensor": QuantSpec(4, granularity="per-tensor"),
}


def _correlated_inputs(tokens=512, features=64, seed=0):
    """X = Z @ A with a mixing A: strongly correlated features, where GPTQ's error feedback pays off."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, features, generator=g)
    a = torch.eye(features) + 0.5 * torch.randn(features, features, generator=g)
    scales = torch.logspace(0, 1, features)[torch.randperm(features, generator=g)]  # uneven diag(H): act-order
    return (z @ a) * scales


def _linear(out=32, features=64, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(features, out)


def _hessian(x):
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(100):  # fed in batches, as stream_inputs does
        acc.add(chunk)
    return acc.hessian


def _quantlinear(spec, features=64, seed=1):
    return QuantLinear(_linear(features=features, seed=seed), WeightQuantizer(spec))


def _rtn(w, spec):
    q = WeightQuantizer(spec)
    return q(w).detach()


def _output_error(x, w, wq):
    return (x @ w.T - x @ wq.T).pow(2).sum().item()


def _run_gptq(spec, x, *, act_order=False, block_size=128, features=64):
    layer = _quantlinear(spec, features=features)
    w = layer.weight.detach().clone()
    gptq_layer(layer, _hessian(x), block_size=block_size, act_order=act_order)
    return layer, w


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("granularity", ["per-channel", "per-group"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, granularity, act_order):
    spec = QuantSpec(bits, granularity=granularity, group_size=16)
    x = _correlated_inputs()
    layer, w = _run_gptq(spec, x, act_order=act_order)
    gptq_err = _output_error(x, w, layer.weight.detach())
    rtn_err = _output_error(x, w, _rtn(w, spec))
    assert gptq_err < 0.8 * rtn_err, (gptq_err, rtn_err)


@pytest.mark.parametrize("granularity", ["per-channel", "per-group", "per-tensor"])
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_equals_rtn(granularity, act_order):
    """H proportional to I decouples the columns: no error is pushed anywhere, so GPTQ must be RTN exactly."""
    spec = SPECS[granularity]
    layer = _quantlinear(spec)
    w = layer.weight.detach().clone()
    gptq_layer(layer, 3.0 * torch.eye(64), block_size=16, act_order=act_order)
    assert torch.equal(layer.weight.detach(), _rtn(w, spec))


@pytest.mark.parametrize("granularity", ["per-channel", "per-group", "per-tensor"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_result_lies_on_frozen_grid(granularity, symmetric, act_order):
    spec = QuantSpec(3, granularity=granularity, group_size=16, symmetric=symmetric)
    layer, _ = _run_gptq(spec, _correlated_inputs(), act_order=act_order, block_size=32)
    wq = layer.weight.detach()
    assert layer.weight_quantizer.frozen
    assert torch.equal(layer.weight_quantizer(wq), wq)
    assert torch.equal(layer.quantized_weight(), wq)
    qp = layer.weight_quantizer.qparams(wq)
    codes = quantize_int(group_view(wq, granularity, 16), qp)
    assert codes.min() >= qp.qmin and codes.max() <= qp.qmax


def _reference_gptq(w, h, spec, damp=0.01, act_order=False, dynamic=False):
    """The unoptimized GPTQ: one column at a time, update every remaining column at once, no blocks. ``dynamic``:
    each group's grid from its columns as they are when the loop reaches the group (the reference code's)."""
    w = w.clone().float()
    quantizer = WeightQuantizer(spec)
    qp = quantizer.qparams(w)
    scale = _entrywise(qp.scale, w, spec)
    zero = _entrywise(qp.zero_point, w, spec)
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.shape[1])
    w, scale, zero, h = w[:, perm], scale[:, perm], zero[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True).float()
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if dynamic and i % spec.group_size == 0:
            group = quantizer.qparams(w[:, i : i + spec.group_size])
            scale[:, i : i + spec.group_size] = group.scale.reshape(-1, 1)
            zero[:, i : i + spec.group_size] = group.zero_point.reshape(-1, 1)
        codes = torch.clamp(torch.round(w[:, i] / scale[:, i]) + zero[:, i], qp.qmin, qp.qmax)
        q[:, i] = (codes - zero[:, i]) * scale[:, i]
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i:] -= torch.outer(err, hinv[i, i:])
    return q[:, torch.argsort(perm)]


def _entrywise(per_row, w, spec):
    """Scale/zero per (out, in) entry, by reading back which group each column falls into."""
    if spec.granularity == "per-tensor":
        return per_row.reshape(1, 1).expand_as(w).clone()
    if spec.granularity == "per-channel":
        return per_row.reshape(-1, 1).expand_as(w).clone()
    groups = -(-w.shape[1] // spec.group_size)
    index = torch.arange(w.shape[1]) // spec.group_size
    return per_row.reshape(w.shape[0], groups)[:, index]


@pytest.mark.parametrize("granularity", ["per-channel", "per-group", "per-tensor"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("features", [64, 72])  # 72: a ragged last group of 8 (group 16) and a ragged block
def test_blocked_matches_plain_reference(granularity, act_order, features):
    spec = QuantSpec(3, granularity=granularity, group_size=16)
    x = _correlated_inputs(features=features)
    x[:, 5] = 0  # a dead input
    h = _hessian(x)
    w = _linear(features=features).weight.detach()
    qp = WeightQuantizer(spec).qparams(w)
    ours, grid = gptq_quantize(w, h, qp, granularity, 16, block_size=16, act_order=act_order)
    ref = _reference_gptq(w, h, spec, act_order=act_order)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert torch.all(ours[:, 5] == 0)
    assert grid is qp  # static: the grid it was given


@pytest.mark.parametrize("block_size", [16, 24, 128])  # 24: groups that start mid-block and run past its end
@pytest.mark.parametrize("features", [64, 72])
def test_dynamic_groups_match_plain_reference(block_size, features):
    """Each group gridded on its error-updated columns, as the unblocked loop has them, whatever the blocks."""
    spec = QuantSpec(3, granularity="per-group", group_size=16)
    x = _correlated_inputs(features=features)
    h = _hessian(x)
    w = _linear(features=features).weight.detach()
    quantizer = WeightQuantizer(spec)
    ours, grid = gptq_quantize(
        w, h, quantizer.qparams(w), "per-group", 16, block_size=block_size, regroup=quantizer.qparams
    )
    ref = _reference_gptq(w, h, spec, dynamic=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    static, _ = gptq_quantize(w, h, quantizer.qparams(w), "per-group", 16, block_size=block_size)
    assert not torch.allclose(ours, static, atol=1e-3)  # the grids moved: a test that static groups would fail
    codes = quantize_int(group_view(ours, "per-group", 16), grid)  # the returned grid is the one it lies on
    torch.testing.assert_close(codes.float() * grid.scale, group_view(ours, "per-group", 16), rtol=0, atol=1e-5)


def test_act_order_needs_static_groups():
    with pytest.raises(ValueError, match="static_groups=False"):
        GPTQConfig(act_order=True, static_groups=False)
    layer = _quantlinear(SPECS["per-group"])
    with pytest.raises(ValueError, match="static groups"):
        gptq_layer(layer, torch.eye(64), act_order=True, static_groups=False)


@pytest.mark.parametrize("act_order", [False, True])
def test_ragged_group(act_order):
    """576 columns with group 128 (as SmolLM2's hidden size): a last group of 64 with its own grid."""
    spec = QuantSpec(4, granularity="per-group", group_size=128)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 576, generator=g) @ (torch.eye(576) + 0.1 * torch.randn(576, 576, generator=g))
    layer, w = _run_gptq(spec, x, act_order=act_order, features=576)
    wq = layer.weight.detach()
    assert layer.weight_quantizer.scale.shape == (32 * 5, 1)
    assert torch.equal(layer.weight_quantizer(wq), wq)
    assert _output_error(x, w, wq) < _output_error(x, w, _rtn(w, spec))
    ragged = wq[:, 512:]
    qp = layer.weight_quantizer.qparams(wq)
    step = qp.scale.reshape(32, 5)[:, 4:]
    codes = ragged / step
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)


def test_inverse_hessian_factor_is_upper_cholesky_of_inverse():
    h = _hessian(_correlated_inputs(features=16))
    u = inverse_hessian_cholesky(h, damp=0.0)
    assert torch.equal(u, u.triu())
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(h.double()), rtol=1e-6, atol=1e-8)


def test_hessian_sum_in_float32_equals_float64():
    x = _correlated_inputs(2000, 64) * 30.0  # large activations, many batches
    sums = {}
    for dtype in (torch.float32, torch.float64):
        acc = HessianAccumulator(64, dtype=dtype)
        for chunk in x.split(100):
            acc.add(chunk)
        sums[dtype] = acc.hessian
    exact = sums[torch.float64]
    torch.testing.assert_close(sums[torch.float32].double(), exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())


def test_layers_reading_one_tensor_share_one_hessian_summed_once():
    model = _tiny_bert()
    layers = {n: m for n, m in linear_layers(model).items() if n.startswith("bert.encoder.layer.0.")}
    hessians, added = SharedHessians(), []
    original = HessianAccumulator.add

    def counted(self, x, weights=None):
        added.append(self)
        original(self, x, weights)

    batches = _batches(16, seed=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HessianAccumulator, "add", counted)
        stream_inputs(model, batches, layers, hessians.add)
    by_layer = hessians.by_layer
    q, k, v = (f"bert.encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value"))
    assert by_layer[q] is by_layer[k] is by_layer[v]  # one accumulator for the three
    assert len({id(a) for a in by_layer.values()}) == len(layers) - 2 and len(added) == len(batches) * (len(layers) - 2)
    for name, layer in layers.items():  # each equals the layer's own Hessian
        own = HessianAccumulator(layer.in_features)
        stream_inputs(model, batches, {name: layer}, lambda _n, x, own=own: own.add(x))
        torch.testing.assert_close(hessians.hessian(name), own.hessian)


def test_smoothed_layer_rejected():
    layer = _quantlinear(SPECS["per-channel"])
    layer.input_scale = torch.ones(64)
    with pytest.raises(ValueError, match="input_scale"):
        gptq_layer(layer, torch.eye(64))


# --------------------------------------------------------------------------- end to end


def _tiny_bert(seed=0):
    # many logits: a few random projections of the error would make the comparison noisy
    return tiny_bert(seed, max_position_embeddings=64, num_labels=16, initializer_range=0.1)


def _batches(n, seed, length=24, batch_size=8):
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        ids = torch.randint(1, 100, (rows, length), generator=g)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[: rows // 2, length - 6 :] = 0  # some padding: statistics must skip it
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _logit_error(model, reference, batches):
    with torch.no_grad():
        return sum((model(**b).logits - reference(**b).logits).pow(2).sum().item() for b in batches)


def test_end_to_end_bert_closer_to_fp_than_rtn():
    from bench.methods.rtn import RTN

    fp = _tiny_bert()
    spec = QuantSpec(3, granularity="per-channel")
    calls = []

    def calibration(n):
        calls.append(n)
        return _batches(n, seed=1)

    context = MethodContext(task=None, tokenizer=None, seed=0, keep_fp=DEFAULT_KEEP_FP, calibration=calibration)
    gptq = GPTQ(GPTQConfig(n_samples=128, block_size=16)).quantize(_tiny_bert(), spec, context)
    rtn = RTN().quantize(_tiny_bert(), spec, context)
    assert calls == [128]

    quantized = [m for m in gptq.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 6 + 1  # q, k, v, attn out, intermediate, output per block; the pooler
    assert type(gptq.classifier) is nn.Linear
    for layer in quantized:
        assert layer.weight_quantizer.frozen
        assert torch.equal(layer.quantized_weight(), layer.weight.detach())

    held_out = _batches(64, seed=2)
    gptq_err, rtn_err = _logit_error(gptq, fp, held_out), _logit_error(rtn, fp, held_out)
    assert gptq_err < 0.8 * rtn_err, (gptq_err, rtn_err)


def test_sequential_pass_uses_quantized_earlier_blocks():
    """Block 1's Hessians must come from block 0's quantized outputs: compare against a manual run."""
    spec = QuantSpec(3, granularity="per-channel")
    batches = _batches(16, seed=1)
    context = MethodContext(task=None, tokenizer=None, seed=0, keep_fp=DEFAULT_KEEP_FP, calibration=lambda n: batches)
    model = GPTQ(GPTQConfig(n_samples=16, block_size=16)).quantize(_tiny_bert(), spec, context)

    manual = quantize_model(_tiny_bert(), spec, keep_fp=DEFAULT_KEEP_FP)
    block0 = manual.bert.encoder.layer[0]
    for name, layer in model.bert.encoder.layer[0].named_modules():
        if isinstance(layer, QuantLinear):  # copy block 0's GPTQ result
            target = block0.get_submodule(name)
            target.weight.data = layer.weight.detach().clone()
            target.weight_quantizer.freeze(target.weight.data, layer.weight_quantizer.qparams(layer.weight))
    query = manual.bert.encoder.layer[1].attention.self.query
    query.weight_quantizer = nn.Identity()
    acc = HessianAccumulator(32)
    stream_inputs(manual, batches, {"q": query}, lambda _n, x: acc.add(x), stop_after=manual.bert.encoder.layer[1])
    w = _tiny_bert().bert.encoder.layer[1].attention.self.query.weight.detach()
    expected, _ = gptq_quantize(w, acc.hessian, WeightQuantizer(spec).qparams(w), "per-channel", 128, block_size=16)
    torch.testing.assert_close(model.bert.encoder.layer[1].attention.self.query.weight.detach(), expected)


class _Stack(nn.Module):
    """Linears before, inside and after the repeated blocks, like OPT's project_in / layers / project_out."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(8, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(2))
        self.proj_out = nn.Linear(16, 8)

    def forward(self, x):
        x = self.proj_in(x)
        for layer in self.layers:
            x = x + layer(x)
        return self.proj_out(x)


def test_layers_quantized_in_execution_order(monkeypatch):
    import bench.methods.gptq as plugin

    order = []
    real = plugin.gptq_layer

    def recording(layer, hessian, **kwargs):
        order.append(next(n for n, m in model.named_modules() if m is layer))
        return real(layer, hessian, **kwargs)

    monkeypatch.setattr(plugin, "gptq_layer", recording)
    torch.manual_seed(0)
    model = _Stack()
    batches = [{"x": torch.randn(4, 10, 8)} for _ in range(2)]
    context = MethodContext(task=None, tokenizer=None, seed=0, calibration=lambda n: batches)
    GPTQ().quantize(model, QuantSpec(4), context)
    blocks = [f"layers.{i}.{j}" for i in range(2) for j in (0, 2)]
    assert order == ["proj_in", *blocks, "proj_out"]
    assert all(m.weight_quantizer.frozen for m in model.modules() if isinstance(m, QuantLinear))


def test_weighted_hessian_equals_the_rows_repeated():
    x = _correlated_inputs(300, 16)
    weights = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(0))
    weighted = HessianAccumulator(16)
    for chunk, w in zip(x.split(100), weights.split(100), strict=True):
        weighted.add(chunk, w.float())
    repeated = _hessian(x.repeat_interleave(weights, dim=0))  # float32 sums in another order: 1e-5 apart
    torch.testing.assert_close(weighted.hessian, repeated, rtol=1e-5, atol=1e-5 * repeated.abs().max().item())


def test_first_token_weight_counts_each_sequences_first_real_token_that_many_times(monkeypatch):
    import bench.methods.gptq as plugin

    batches = _batches(16, seed=1)
    for batch in batches:  # left padding: the first real token is not at position 0
        batch["attention_mask"][0, :3] = 0
    used = {}
    monkeypatch.setattr(plugin, "gptq_layer", lambda layer, hessian, **_kwargs: used.__setitem__(layer, hessian))
    context = MethodContext(task=None, tokenizer=None, seed=0, keep_fp=DEFAULT_KEEP_FP, calibration=lambda n: batches)
    spec, hessians = QuantSpec(4, granularity="per-channel"), {}
    for weight in (1.0, 5.0):
        model = GPTQ(GPTQConfig(n_samples=16, first_token_weight=weight)).quantize(_tiny_bert(), spec, context)
        hessians[weight] = used[model.bert.encoder.layer[0].attention.self.query]

    fp, rows = _tiny_bert(), []
    first = fp.bert.encoder.layer[0].attention.self.query
    stream_inputs(fp, batches, {"q": first}, lambda _n, x: rows.append(x))
    starts = torch.cat([torch.nn.functional.pad(b["attention_mask"].cumsum(1), (1, 0))[:, :-1] for b in batches])
    first_rows = (starts[torch.cat([b["attention_mask"] for b in batches]).bool()] == 0).long()
    x = torch.cat(rows)
    assert first_rows.sum() == 16
    torch.testing.assert_close(hessians[1.0], _hessian(x))
    torch.testing.assert_close(hessians[5.0], _hessian(x.repeat_interleave(1 + 4 * first_rows, dim=0)))


def test_first_token_weight_must_not_be_negative():
    with pytest.raises(ValueError, match="first_token_weight=-1"):
        GPTQConfig(first_token_weight=-1)
