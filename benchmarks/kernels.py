"""FP32 vs int8 vs int4 latency on real CPU kernels, and the packed size, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/kernels.py [--threads 2] [--skip-minilm] [--skip-smollm]

Quantizes with bench.quant.layers.quantize_model + freeze (RTN, symmetric), builds the latency model
(bench.quant.kernels.build_latency_model) and times it with bench.metrics.latency (warm-up, p50/p90).
Each line names the kernel that ran; "simulated" means no real kernel (no speedup to expect).

torchao's configs run beside ours as peers (rows "torchao ...", ``pip install -e '.[peers]'``): each is
``torchao.quantization.quantize_`` on a deep copy of the FP32 model, timed the same way (eager, no
torch.compile); a config that does not run on this CPU gets one line saying why. The SmolLM2 table adds, per
variant, the decode byte-ratio limit: the FP32 model's Linear weight bytes (lm_head included) over the
variant's, the speedup a memory-bound 1-token forward can at most reach. Figures on
a shared machine are noisy: compare p50s, and rerun before trusting a difference under ~20%. When other
processes keep the cores busy, 2 threads can stall at every parallel region (p50s near 48 ms per call
were seen): ``--threads 1`` then gives steadier figures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import gc
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from bench.api import QuantSpec
from bench.metrics.latency import latency_of_model, measure, token_inputs
from bench.metrics.size import fp32_size_bytes, size_bytes
from bench.quant.kernels import _KernelLinear, build_latency_model, kernel_label
from bench.quant.layers import freeze, quantize_model

VARIANTS = {
    "W8 per-channel": QuantSpec(8, granularity="per-channel"),
    "W4 g128": QuantSpec(4, granularity="per-group", group_size=128),
    "W3 g128": QuantSpec(3, granularity="per-group", group_size=128),
    "W8A8 per-channel": QuantSpec(8, a_bits=8),  # per-token A8: int8-gemm, activation codes split in two
    "W4A8 per-channel": QuantSpec(4, a_bits=8),  # int8-gemm, one GEMM
}


TORCHAO_MISSING = "torchao not installed: pip install -e '.[peers]' to time its configs beside ours"
TORCHAO_NOTE = (
    "torchao rows: quantize_(deepcopy(FP32 model), config), timed eagerly like ours (no torch.compile). Eagerly on"
    " CPU, torchao {version}'s W8A8 multiplies int32 matrices (torch.matmul), its int8 weight-only casts the int8"
    " weight to float each call, its intx layouts dequantize each call (W4A8: activations quant-dequantized), so"
    " expect no speedup. stored = bytes its tensors hold (intx keeps one int4 code per int8 byte)."
)


@dataclass(frozen=True)
class Peer:
    """A torchao config timed beside ours: ``make(group_size)`` builds it; ``weight_only``: no activation quant."""

    name: str  # "{g}" is replaced by the group size used on the model
    make: Callable[[int], object]
    weight_only: bool


@contextlib.contextmanager
def _quiet(*loggers):
    """Silence import-time warnings of ``loggers`` (torchao's CUDA-only extensions that cannot load on CPU)."""
    saved = [(log, log.level) for log in map(logging.getLogger, loggers)]
    for log, _ in saved:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"


def _kept(name: str, keep_fp) -> bool:
    """``name`` stays FP32: it or its last part matches a ``keep_fp`` pattern (as ``quantize_model`` reads them)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.split(".")[-1], p) for p in keep_fp)


def _torchao_quantized(model: nn.Module, config, keep_fp=()) -> nn.Module:
    """``torchao.quantization.quantize_`` on a deep copy of ``model``: every ``nn.Linear`` but ``keep_fp``'s."""
    from torchao.quantization import quantize_

    q = copy.deepcopy(model)
    quantize_(q, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and not _kept(fqn, keep_fp))
    return q.eval()


def _torchao_layers(model: nn.Module) -> Counter:
    """Linear layers by the tensor type holding their weight ("float": left unquantized)."""
    return Counter(
        type(m.weight).__name__ if is_traceable_wrapper_subclass(m.weight) else "float"
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )


def _probe(config) -> str | None:
    """None if ``config`` quantizes and runs a small Linear on this CPU, else why not."""
    probe = nn.Sequential(nn.Linear(256, 256)).eval()
    try:
        q = _torchao_quantized(probe, config)
        with torch.inference_mode():
            q(torch.randn(2, 256))
    except Exception as exc:  # any failure means "does not run here": report it, go on
        return _why(exc)
    if not is_traceable_wrapper_subclass(q[0].weight):
        return "left the weight in float (nothing quantized)"
    return None


def torchao_peers() -> list[Peer]:
    """torchao's configs that run on this CPU, after one line for each that does not; [] without torchao."""
    # torchao registers enums as pytree constants at import, also lazily (transformers imports its prototypes):
    # torch warns that this is deprecated each time, for the whole run; nothing a benchmark user can act on
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        with _quiet("torchao"):
            import torchao
            from torchao.quantization import (
                Int4WeightOnlyConfig,
                Int8DynamicActivationInt8WeightConfig,
                Int8DynamicActivationIntxWeightConfig,
                Int8WeightOnlyConfig,
                IntxWeightOnlyConfig,
                PerAxis,
                PerGroup,
            )
            from torchao.quantization.quantize_.workflows import Int4PackingFormat
    except Exception as exc:  # not installed, or built for another torch / missing a dependency: run ours
        if isinstance(exc, ModuleNotFoundError) and exc.name == "torchao":
            print(TORCHAO_MISSING)
        else:
            print(f"torchao does not import ({_why(exc)}): skipping its configs")
        return []
    print(f"torchao {torchao.__version__} (peers)")
    candidates = [
        Peer("torchao W8A8 dyn per-row", lambda g: Int8DynamicActivationInt8WeightConfig(), False),
        Peer("torchao W8 weight-only", lambda g: Int8WeightOnlyConfig(), True),
    ]
    # int4 weight-only: the first packing format that runs here (each is tied to a device / kernel library)
    failed = []
    for fmt in Int4PackingFormat:
        make = lambda g, fmt=fmt: Int4WeightOnlyConfig(group_size=g, int4_packing_format=fmt)  # noqa: E731
        why = _probe(make(128))
        if why is None:
            candidates.append(Peer(f"torchao W4 g{{g}} wo {fmt.value}", make, True))
            break
        failed.append(f"{fmt.value}: {why}")
    else:
        print(f"torchao Int4WeightOnlyConfig: no int4_packing_format runs on this CPU ({'; '.join(failed)})")
    candidates += [
        Peer(
            "torchao intx W4 g{g} wo",
            lambda g: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g)),
            True,
        ),
        Peer(
            "torchao W4A8 dyn per-row",
            lambda g: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerAxis(0)),
            False,
        ),
    ]
    peers = []
    for peer in candidates:
        why = _probe(peer.make(128))
        if why:
            print(f"{peer.name.format(g=128)}: does not run on this CPU ({why}), skipped")
        else:
            peers.append(peer)
    print(TORCHAO_NOTE.format(version=torchao.__version__))
    return peers


def _held_nbytes(t: torch.Tensor | None) -> int:
    """Bytes ``t`` holds; a tensor subclass (torchao's quantized weights): the bytes of its inner tensors."""
    if t is None:
        return 0
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_held_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def held_size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer as held (shared tensors once): torchao models' size."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = [*module.parameters(recurse=False)]
        tensors += [b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += _held_nbytes(t)
    return total


def matmul_bytes(model: nn.Module) -> int:
    """Bytes the Linear layers of the model that runs hold (weights, scales, biases; lm_head included): what a
    1-token forward reads. FP32's over a variant's is the byte-ratio limit of its decode speedup."""
    seen, total = set(), 0
    for module in model.modules():
        if not hasattr(module, "in_features"):  # nn.Linear, our kernel layers
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += _held_nbytes(t)
    return total


def peer_group(model: nn.Module, keep_fp=(), sizes=(128, 64, 32)) -> int:
    """The largest torchao group size dividing every quantized Linear's input (it has no ragged last group)."""
    ins = {m.in_features for name, m in model.named_modules() if isinstance(m, nn.Linear) and not _kept(name, keep_fp)}
    return next((g for g in sizes if all(k % g == 0 for k in ins)), sizes[-1])


def peer_rows(model, peers, times, fp32_bytes, base, *, keep_fp=(), output=None, weight_only=None, limit=None):
    """One row per torchao peer (``weight_only``: only those, False: only activation-quantized, None: all), then
    its layers' weight types, the relative error of ``output(net)`` vs the FP32 model's and, given the FP32
    model's ``matmul_bytes`` as ``limit``, the decode byte-ratio limit."""
    group = peer_group(model, keep_fp)
    ref = None
    if output is not None:
        with torch.inference_mode():
            ref = output(model)
    for peer in peers:
        if weight_only is not None and peer.weight_only != weight_only:
            continue
        name = peer.name.format(g=group)
        try:
            q = _torchao_quantized(model, peer.make(group), keep_fp)
            layers = _torchao_layers(q)
            stats = times(q)
        except Exception as exc:  # a peer failing on this model: say why, go on
            print(f"{name}: failed on this model ({_why(exc)}), skipped", flush=True)
            continue
        _row(name, "ao eager", held_size_bytes(q), fp32_bytes, stats, base)
        notes = ["Linear weights as " + ", ".join(f"{k}: {n}" for k, n in sorted(layers.items()))]
        if ref is not None:
            with torch.inference_mode():
                notes.append(f"rel. error vs FP32 {((output(q) - ref).norm() / ref.norm()).item():.1e}")
        if limit is not None:
            notes.append(_limit(limit, q))
        print(f"    {'; '.join(notes)}", flush=True)
        del q
        gc.collect()


def _limit(fp32_matmul: int, model: nn.Module, head: str = "FP32") -> str:
    nbytes = matmul_bytes(model)
    return (
        f"decode byte-ratio limit x{fp32_matmul / nbytes:4.2f}"
        f" ({fp32_matmul / 2**20:.0f} -> {nbytes / 2**20:.0f} MiB of Linear weights per token, lm_head {head})"
    )


def _row(name, kernel, nbytes, fp32_bytes, times, base):
    stored = [f"{nbytes / 2**20:8.1f} MiB", f"{fp32_bytes / nbytes:5.2f}x"] if nbytes else [f"{'-':>12}", f"{'-':>6}"]
    cells = [f"{name:<24}", f"{kernel:<12}", *stored]
    for key, stats in times.items():
        ratio = base[key]["p50"] / stats["p50"] if base else 1.0
        cells.append(f"{stats['p50']:9.2f} ms (p90 {stats['p90']:8.2f}) x{ratio:4.2f}")
    print(" | ".join(cells), flush=True)


def _header(title, shapes):
    print(f"\n{title}")
    cols = [f"{'variant':<24}", f"{'kernel':<12}", f"{'stored':>12}", f"{'ratio':>6}"]
    cols += [f"{s + ' p50 (p90) speedup':<38}" for s in shapes]
    print(" | ".join(cols))


def _quantized(model, spec, keep_fp=()):
    """A frozen RTN copy of ``model`` (``model`` is left as is)."""
    return freeze(quantize_model(copy.deepcopy(model), spec, keep_fp=keep_fp))


def _dynamic_int8(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def linear_stack(args, peers=()):
    torch.manual_seed(0)
    dim, depth = args.dim, args.depth
    model = nn.Sequential(*[nn.Linear(dim, dim) for _ in range(depth)]).eval()
    inputs = {f"{m} tok": torch.randn(m, dim) for m in (1, 128)}
    fp32_bytes = fp32_size_bytes(model)

    def times(net):
        out = {}
        for key, x in inputs.items():

            def run(net=net, x=x):
                with torch.inference_mode():
                    net(x)

            out[key] = measure(run, warmup=3, min_run_time=args.min_run_time, threads=args.threads)
        return out

    _header(f"Linear stack: {depth} x Linear({dim}, {dim}), {args.threads} threads", list(inputs))
    base = times(model)
    _row("FP32", "fp32", fp32_bytes, fp32_bytes, base, None)
    for name, spec in VARIANTS.items():
        q = _quantized(model, spec)
        nbytes = size_bytes(q)
        fast, kernels = build_latency_model(q, inplace=True)
        _row(name, kernel_label(kernels), nbytes, fp32_bytes, times(fast), base)
        groups = sorted({m.group for m in fast.modules() if hasattr(m, "group")})
        if groups:
            print(f"    int4 kernel group sizes {groups}")
        del q, fast
    dyn = _dynamic_int8(model)
    _row("dynamic int8 (ref)*", "dyn-int8", None, fp32_bytes, times(dyn), base)
    print(
        "* torch.ao quantize_dynamic, its own weight observer; also quantizes activations per tensor (a different"
        " model than W8A32 or our per-token A8): a reference point, not used for results."
    )
    del dyn
    peer_rows(model, peers, times, fp32_bytes, base, output=lambda net: net(inputs["128 tok"]))


def linear_seconds(model: nn.Module, batch: dict, args) -> float:
    """Seconds (p50 sums) of ``model``'s matmul layers (``nn.Linear``, the kernels' layers), each timed alone on
    the input it gets in the model's forward: their share of the whole forward, for an Amdahl ceiling."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | _KernelLinear)]
    seen: dict[nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.setdefault(m, a[0].detach().clone())) for m in layers]
    try:
        with torch.inference_mode():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    total = 0.0
    for layer, x in seen.items():

        def run(layer=layer, x=x):
            with torch.inference_mode():
                layer(x)

        total += measure(run, warmup=3, min_run_time=args.min_run_time / 4, threads=args.threads)["p50"] / 1e3
    return total


def amdahl_ceiling(model_s: float, fp32_linears_s: float, kernel_linears_s: float) -> tuple[float, float]:
    """(the whole model's speedup if only its Linears ran at the kernels' speed, the speedup if they cost
    nothing): everything else (attention, softmax, norms, embeddings) stays at its FP32 time in both."""
    rest = model_s - fp32_linears_s
    return model_s / (rest + kernel_linears_s), model_s / rest


def minilm(args, peers=()):
    """The default encoder, one 128-token sequence: FP32 beside the WxA8 rows (int8-gemm); weight-only in DESIGN.md."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, logging

    from bench.models import resolve

    logging.set_verbosity_error()  # the random head's "newly initialized" warning
    torch.manual_seed(0)
    model = resolve("minilm").from_pretrained(AutoModelForSequenceClassification, num_labels=2).eval()
    batch = token_inputs(128, model.config.vocab_size)
    fp32_bytes = fp32_size_bytes(model)

    def times(net):
        return {
            "1 x 128": latency_of_model(
                net, batch, warmup=3, min_run_time=args.model_min_run_time, threads=args.threads
            )
        }

    _header(f"MiniLM-L6 forward (classifier FP32), {args.threads} threads", ["1 x 128"])
    base = times(model)
    _row("FP32", "fp32", fp32_bytes, fp32_bytes, base, None)
    model_s, fp32_linears_s = base["1 x 128"]["p50"] / 1e3, linear_seconds(model, batch, args)
    print(f"    Linears timed alone: {fp32_linears_s * 1e3:.2f} ms, {fp32_linears_s / model_s:.0%} of the forward")
    for name, spec in VARIANTS.items():
        if not spec.a_bits:
            continue  # short to run: the weight-only kernels are on the Linear stack and SmolLM2
        q = _quantized(model, spec, keep_fp=("classifier",))
        nbytes = size_bytes(q)
        with torch.inference_mode():  # the encoder's output: the random head's logits are near 0
            ref = q.bert(**batch).last_hidden_state
        fast, kernels = build_latency_model(q, inplace=True)
        with torch.inference_mode():
            err = ((fast.bert(**batch).last_hidden_state - ref).norm() / ref.norm()).item()
        _row(name, kernel_label(kernels), nbytes, fp32_bytes, times(fast), base)
        print(f"    last hidden state rel. error vs fake-quant {err:.1e} (codes at a rounding boundary flip)")
        kernel_linears_s = linear_seconds(fast, batch, args)
        ceiling, free = amdahl_ceiling(model_s, fp32_linears_s, kernel_linears_s)
        print(
            f"    its Linears alone (activation quantization included): {kernel_linears_s * 1e3:.2f} ms"
            f" (x{fp32_linears_s / kernel_linears_s:.2f} of FP32's); with the rest at FP32 speed the model reaches"
            f" at most x{ceiling:.2f} (x{free:.2f} if the Linears cost nothing)"
        )
        del q, fast
    peer_rows(  # the activation-quantized peers, as ours above
        model,
        peers,
        times,
        fp32_bytes,
        base,
        keep_fp=("classifier",),
        output=lambda net: net.bert(**batch).last_hidden_state,
        weight_only=False,
    )


def smollm(args, peers=()):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from bench.models import resolve

    start = time.perf_counter()
    resolved = resolve("smollm2-135m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = resolved.from_pretrained(AutoModelForCausalLM).eval()
    print(f"\nloaded SmolLM2-135M from {resolved.source} in {time.perf_counter() - start:.0f} s")
    vocab = model.config.vocab_size
    inputs = {f"{n} tok": token_inputs(n, vocab) for n in (1, 128)}
    keep_fp = ("lm_head",)  # tied to the embedding; kept FP32 as in DEFAULT_KEEP_FP
    fp32_bytes = fp32_size_bytes(model)

    def times(net):
        out = {}
        for key, batch in inputs.items():
            out[key] = latency_of_model(
                net, batch, warmup=2, min_run_time=args.model_min_run_time, threads=args.threads
            )
        return out

    _header(
        f"SmolLM2-135M forward (embedded decoder, use_cache off, lm_head FP32 but '+ table'), {args.threads} threads",
        list(inputs),
    )
    model.config.use_cache = False
    base = times(model)
    _row("FP32", "fp32", fp32_bytes, fp32_bytes, base, None)
    fp32_matmul = matmul_bytes(model)
    print(f"    {fp32_matmul / 2**20:.0f} MiB of Linear weights (lm_head included) read per token")
    check = inputs["128 tok"]
    # W3: simulated (FP32 speed, see the Linear stack); WxA8: shown on MiniLM and the stack. "+ table": the
    # tied embedding table quantized too (--quantize-embeddings), so the LM head runs on its codes
    weight_only = {name: spec for name, spec in VARIANTS.items() if spec.w_bits != 3 and not spec.a_bits}
    weight_only |= {f"{name} + table": replace(spec, embeddings=True) for name, spec in weight_only.items()}
    for name, spec in weight_only.items():
        q = _quantized(model, spec, keep_fp)
        nbytes = size_bytes(q)
        with torch.inference_mode():
            ref = q(**check).logits
        fast, kernels = build_latency_model(q, inplace=True)
        with torch.inference_mode():
            err = ((fast(**check).logits - ref).norm() / ref.norm()).item()
        _row(name, kernel_label(kernels), nbytes, fp32_bytes, times(fast), base)
        detail = ", ".join(f"{k}: {n}" for k, n in sorted(kernels.items()))
        groups = sorted({m.group for m in fast.modules() if hasattr(m, "group")})
        extra = f"; int4 kernel group sizes {groups}" if groups else ""
        print(f"    layers per kernel: {detail}{extra}; logits rel. error vs fake-quant {err:.1e}")
        print(f"    {_limit(fp32_matmul, fast, 'on the table' if spec.embeddings else 'FP32')}")
        del q, fast
        gc.collect()
    peer_rows(  # the weight-only peers, as ours above
        model,
        peers,
        times,
        fp32_bytes,
        base,
        keep_fp=keep_fp,
        output=lambda net: net(**check).logits,
        weight_only=True,
        limit=fp32_matmul,
    )
    print("    (its FP32 weights are themselves dequantized Q4_1 GGUF values; the FP32 embedding dominates size)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=4, help="Linear layers in the stack")
    parser.add_argument(
        "--min-run-time", type=float, default=0.5, help="seconds of timed calls per Linear-stack figure (torch's Timer)"
    )
    parser.add_argument("--model-min-run-time", type=float, default=1.0, help="seconds of timed calls per model figure")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-smollm", action="store_true")
    parser.add_argument("--no-peers", action="store_true", help="skip torchao's configs (timed beside ours)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    peers = [] if args.no_peers else torchao_peers()
    linear_stack(args, peers)
    if not args.skip_minilm:
        minilm(args, peers)
    if not args.skip_smollm:
        smollm(args, peers)


if __name__ == "__main__":
    main()
