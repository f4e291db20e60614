"""FP32 vs int8 vs int4 latency on real CPU kernels, and the packed size, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/kernels.py [--threads 2] [--skip-minilm] [--skip-smollm]

Quantizes with bench.quant.layers.quantize_model + freeze (RTN, symmetric), builds the latency model
(bench.quant.kernels.build_latency_model) and times it with bench.metrics.latency (warm-up, p50/p90).
Each line names the kernel that ran; "simulated" means no real kernel (no speedup to expect). Figures on
a shared machine are noisy: compare p50s, and rerun before trusting a difference under ~20%. When other
processes keep the cores busy, 2 threads can stall at every parallel region (p50s near 48 ms per call
were seen): ``--threads 1`` then gives steadier figures.
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
import warnings

import torch
from torch import nn

from bench.api import QuantSpec
from bench.metrics.latency import latency_of_model, measure, token_inputs
from bench.metrics.size import fp32_size_bytes, size_bytes
from bench.quant.kernels import build_latency_model, kernel_label
from bench.quant.layers import freeze, quantize_model

VARIANTS = {
    "W8 per-channel": QuantSpec(8, granularity="per-channel"),
    "W4 g128": QuantSpec(4, granularity="per-group", group_size=128),
    "W3 g128": QuantSpec(3, granularity="per-group", group_size=128),
    "W8A8 per-channel": QuantSpec(8, a_bits=8),  # per-token A8: int8-gemm, activation codes split in two
    "W4A8 per-channel": QuantSpec(4, a_bits=8),  # int8-gemm, one GEMM
}


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


def linear_stack(args):
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


def minilm(args):
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
        del q, fast


def smollm(args):
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
        f"SmolLM2-135M forward (embedded decoder, lm_head FP32, use_cache off), {args.threads} threads", list(inputs)
    )
    model.config.use_cache = False
    base = times(model)
    _row("FP32", "fp32", fp32_bytes, fp32_bytes, base, None)
    check = inputs["128 tok"]
    for name, spec in VARIANTS.items():
        if spec.w_bits == 3 or spec.a_bits:
            continue  # W3: simulated (FP32 speed, see the Linear stack); WxA8: shown on MiniLM and the stack
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
        del q, fast
        gc.collect()
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
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    linear_stack(args)
    if not args.skip_minilm:
        minilm(args)
    if not args.skip_smollm:
        smollm(args)


if __name__ == "__main__":
    main()
