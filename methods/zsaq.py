"""ZSAQ (Zhu et al. 2023, arXiv 2310.13315): zero-shot sharpness-aware QAT, a reimplementation.

No official code exists; every choice the paper leaves open is a setting of ``ZeroShotConfig``.

The minimax: a generator G (a pre-trained LM plus a trainable feature-adaptation module) synthesizes
inputs x; the teacher T is the full-precision model, the student S its quantized copy.
  max over G of D(T(x), S(x))   -- stochastic gradient ascent (SGA) on the generator
  min over S of D(T(x), S(x))   -- SAM on the student: gradient at the ascent point, e = rho * g/||g||
D is the KL divergence of the output distributions (classification logits or next-token distributions:
the same code serves encoders and decoders). No task data is touched: ``data_used = "none"``.

How x is made (our choice, documented): noise z = seeded random token ids (for a masked-LM generator
``mask_ratio`` of them masked) goes through G; its output distribution over its vocabulary at every
position, mapped onto the student's vocabulary (identity when both share it, else each generator token's
first student sub-token), is a soft token whose embedding is p @ E (E each model's own input embedding
table). The adaptation module, a Linear from G's last hidden state to the student's embedding width
initialized at zero, adds a learned correction, so training starts from the LM's own distributions.
The first and last positions are the student's [CLS]/[SEP] (or BOS) embeddings, as real inputs have.

The student's SAM step (``bench.training.sam_step``, the one SQuAT uses) moves the quantized weights: at
the ascent point the forward reads Q(w) + e with the grid frozen, the point the leaderboard's sharpness
column measures; the gradient taken there updates the latent w through the STE. The paper does not say
which weights SAM perturbs; ``perturb=latent`` moves the float w instead, so the forward reads Q(w + e): on
MiniLM W4 at rho 0.05 that is mostly re-quantization noise (|Q(w+e) - Q(w)| 14-17 rho, cosine < 0.1 to e:
the per-channel min-max grid follows w + e and shifts whole rows).

``methods/gan_zeroshot.py`` (``gan``) is this loop with a plain AdamW student step instead of SAM.
Ablations: ``train_generator=false`` (frozen generator, no SGA), ``student_optimizer=adamw`` (no SAM),
``inputs=random`` (QAT-Rand: uniform random tokens, no generator).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from bench import hookimpl, models
from bench.api import Method, MethodContext, QuantSpec, check_range
from bench.quant import QuantEmbedding, WeightQuantizer, freeze, quantize_model
from bench.quant.lsq import LSQQuantizer
from bench.training import distill_loss, frozen, gradient_step, sam_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZeroShotConfig:
    """Defaults are a 2-core CPU budget (about 2 minutes a cell on MiniLM); ``preset=paper`` scales up."""

    generator: str = "bert-tiny"  # model name: alias, hub id (paper: facebook/opt-350m) or local directory
    inputs: Literal["generator", "random"] = "generator"  # random = QAT-Rand baseline (no generator)
    train_generator: bool = True  # false = frozen-generator ablation (no SGA)
    student_optimizer: Literal["sam", "adamw"] = "sam"
    rho: float = 0.05  # SAM radius (paper default)
    # SAM moves the quantized weights, Q(w) + e (grid frozen), or the latent float ones, Q(w + e): as SQuAT's
    perturb: Literal["quantized", "latent"] = "quantized"
    steps: int = 60  # student updates
    batch_size: int = 16
    seq_len: int = 32  # tokens per synthetic input, [CLS]/[SEP] included
    lr: float = 2e-5  # student (AdamW, also SAM's base optimizer); 1e-4 drifted MiniLM W4A8 from 77% to 52%
    generator_lr: float = 1e-4  # generator + adaptation module (Adam, ascent)
    generator_steps: int = 1  # generator ascent steps per round
    student_steps: int = 1  # student steps per round (GAN-style methods often use several)
    discrepancy: Literal["kl", "mse"] = "kl"
    temperature: float = 1.0  # of the generator's token distribution and of the KL
    mask_ratio: float = 0.5  # masked-LM generators: share of noise positions given as [MASK]
    sampling: Literal["gumbel", "soft"] = "gumbel"  # hard straight-through token samples, or soft averages
    # Generator objective D + diversity * H(batch-mean teacher prediction): without it the ascent collapses
    # onto inputs of one class (seen here: the student then learns a constant answer). Standard practice in
    # data-free distillation (DAFL's information-entropy term); 0 = the paper's bare objective.
    diversity: float = 1.0
    # student grid: min-max that follows w (the student starts as RTN), or LSQ's learned step (its init
    # 2*mean|w|/sqrt(Qp) started MiniLM W2A8 below RTN here, and 60 steps did not recover it)
    weight_quantizer: Literal["minmax", "lsq"] = "minmax"
    preset: Literal["cpu", "paper"] = "cpu"

    def __post_init__(self):
        check_range(self, 0, None, "rho", "steps", "lr", "generator_lr", "generator_steps", "diversity")
        check_range(self, 1, None, "batch_size", "student_steps")
        check_range(self, 3, None, "seq_len")  # [CLS] + at least one token + [SEP]
        check_range(self, 0, 1, "mask_ratio")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r}: must be positive")


# Paper scale for users with a GPU: OPT-350m (the paper's best generator). The paper does not state the
# step count, batch or length; these are standard BERT QAT budgets, labeled as our choice.
PAPER_PRESET = {"generator": "facebook/opt-350m", "steps": 3000, "batch_size": 32, "seq_len": 128}


def resolve_preset(config: ZeroShotConfig) -> ZeroShotConfig:
    """``preset=paper`` replaces the settings still at their CPU defaults; explicit ``--set`` values win."""
    if config.preset == "cpu":
        return config
    defaults = type(config)()
    return dataclasses.replace(
        config, **{k: v for k, v in PAPER_PRESET.items() if getattr(config, k) == getattr(defaults, k)}
    )


# --------------------------------------------------------------------------- the generator


class Generator(nn.Module):
    """A pre-trained LM whose per-position output distributions become the student's soft input tokens."""

    def __init__(self, lm: nn.Module, tokenizer, student_tokenizer, embed_dim: int, mask_ratio: float = 0.5):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.mask_ratio = mask_ratio
        self.masked = not getattr(lm.config, "is_decoder", False) and "MaskedLM" in type(lm).__name__
        vocab = lm.get_output_embeddings().weight.shape[0]
        self.register_buffer("token_map", vocab_map(tokenizer, student_tokenizer, vocab), persistent=False)
        self.register_buffer("banned", _special_ids_mask(tokenizer, vocab), persistent=False)
        self.student_vocab = len(student_tokenizer)
        self.adapter = nn.Linear(lm.config.hidden_size, embed_dim)
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)

    def noise(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        allowed = (~self.banned).nonzero().squeeze(1)
        ids = allowed[torch.randint(len(allowed), (batch, length), generator=generator)]
        if self.masked and self.tokenizer.mask_token_id is not None:
            masked = torch.rand(batch, length, generator=generator) < self.mask_ratio
            ids = torch.where(masked, torch.full_like(ids, self.tokenizer.mask_token_id), ids)
        return ids

    def forward(
        self, noise: torch.Tensor, temperature: float, rng: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(tokens over the student's vocabulary (B, L, V_s), embedding correction (B, L, d), hard token ids);
        under ``torch.no_grad`` a Gumbel sample skips the distribution (None) and gives its ids alone.

        With ``rng`` the tokens are Gumbel-softmax samples, one-hot in the forward pass with the soft
        sample's gradient (straight-through): real token sequences, still differentiable; their student ids
        come third (None when the vocabularies differ), so embedding them is a lookup (``soft_embeddings``).
        Without it, the soft distributions themselves (their embedding average blurs towards a mean token).
        """
        out = self.lm(input_ids=noise, output_hidden_states=True)
        logits = out.logits.float().masked_fill(self.banned, float("-inf"))
        if rng is not None:
            uniform = torch.rand(logits.shape, generator=rng).clamp(1e-10, 1.0).to(logits.device)
            logits = logits - torch.log(-torch.log(uniform))
        if rng is not None and self.token_map is None and not torch.is_grad_enabled():
            # no gradient wanted: the hard sample is all there is (argmax of softmax(l / T) = argmax of l)
            return None, self.adapter(out.hidden_states[-1]), logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        ids = None
        if rng is not None:
            ids = probs.argmax(-1)
            hard = nn.functional.one_hot(ids, probs.shape[-1]).to(probs.dtype)
            probs = hard - probs.detach() + probs
        if self.token_map is not None:  # different vocabularies: move each token's mass to its student token
            keep = self.token_map >= 0
            mapped = probs.new_zeros(*probs.shape[:-1], self.student_vocab)
            probs = mapped.index_add(-1, self.token_map[keep], probs[..., keep])
            ids = None  # a generator token without a student token maps to no row: keep the dense product
        return probs, self.adapter(out.hidden_states[-1]), ids


def vocab_map(tokenizer, student_tokenizer, vocab: int) -> torch.Tensor | None:
    """None when generator and student share a vocabulary; else generator id -> student id (-1: none).

    Each generator token is decoded to text and re-tokenized by the student; its first sub-token takes
    the probability mass (a differentiable, many-to-one bridge between vocabularies).
    """
    if tokenizer.get_vocab() == student_tokenizer.get_vocab():
        return None
    texts = tokenizer.batch_decode([[i] for i in range(vocab)])
    encoded = student_tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[0] if ids else -1 for ids in encoded])


def _special_ids_mask(tokenizer, vocab: int) -> torch.Tensor:
    banned = torch.zeros(vocab, dtype=torch.bool)
    special = [i for i in tokenizer.all_special_ids if i is not None and i < vocab]
    banned[special] = True
    banned[len(tokenizer) :] = True  # padding rows of the output layer are no tokens
    return banned


def load_generator(name: str, student_tokenizer, embed_dim: int, mask_ratio: float = 0.5) -> Generator:
    """The generator LM by model name (hub id online, shipped twin offline), masked or causal."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    resolved = models.resolve(name)
    config = resolved.from_pretrained(AutoConfig)
    masked = any("MaskedLM" in arch for arch in (getattr(config, "architectures", None) or []))
    lm = resolved.from_pretrained(AutoModelForMaskedLM if masked else AutoModelForCausalLM)
    tokenizer = resolved.from_pretrained(AutoTokenizer)
    log.info("zero-shot generator: %s (%s, %s LM)", resolved.name, resolved.source, "masked" if masked else "causal")
    return Generator(lm.float(), tokenizer, student_tokenizer, embed_dim, mask_ratio)


# --------------------------------------------------------------------------- feeding teacher and student


class _StraightThroughLookup(torch.autograd.Function):
    """``probs @ table`` for straight-through one-hot ``probs`` whose hot entries are ``ids``: the forward is the
    lookup ``table[ids]`` (the same value: each row of probs is one-hot in the forward pass), the backward the
    dense product's gradients. Skips a (B*L x V) @ (V x d) product per model and batch (V = 30,522 for BERT:
    most of a zero-shot step's arithmetic), and every forward without gradients is a plain lookup."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table, ids)
        return table[ids]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        table, ids = ctx.saved_tensors
        grad_probs = grad @ table.t() if ctx.needs_input_grad[0] else None  # d(probs @ table)/d probs
        grad_table = None
        if ctx.needs_input_grad[1]:  # one_hot(ids)^T @ grad: each token's row gets its positions' gradients
            grad_table = torch.zeros_like(table).index_add_(0, ids.flatten(), grad.flatten(0, -2).to(table.dtype))
        return grad_probs, grad_table, None


def soft_embeddings(
    model: nn.Module, probs: torch.Tensor, correction: torch.Tensor, ends: tuple, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """``model``'s input embeddings of soft tokens: probs @ E + correction, between hard [CLS]/[SEP] ends.

    ``ids``: the hot index of each row when ``probs`` is (straight-through) one-hot; the product is then a
    lookup with the product's gradient (``_StraightThroughLookup``), equal up to float rounding; with ``probs``
    None (no gradient wanted) a plain lookup."""
    emb = model.get_input_embeddings()
    table = emb.quantized_weight() if isinstance(emb, QuantEmbedding) else emb.weight
    if ids is None:
        x = probs @ table
    else:
        x = table[ids] if probs is None else _StraightThroughLookup.apply(probs, table, ids)
    x = x + correction
    first, last = ends
    parts = [x]
    if first is not None:
        parts.insert(0, emb(torch.full((x.shape[0], 1), first, device=x.device)))
    if last is not None:
        parts.append(emb(torch.full((x.shape[0], 1), last, device=x.device)))
    return torch.cat(parts, dim=1)


def _logits(model: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return model(inputs_embeds=embeds, attention_mask=mask).logits.float()


def _ends(tokenizer) -> tuple[int | None, int | None]:
    """The ids real inputs start and end with: [CLS]/[SEP] for BERT, BOS (no end) for decoders."""
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id
    return first, last


# --------------------------------------------------------------------------- the method


class ZSAQ(Method):
    description = (
        "ZSAQ (reimplementation): zero-shot QAT, SAM-SGA minimax with a pre-trained LM generator; no task data"
    )
    data_used = "none"
    Config = ZeroShotConfig
    default_act_bits = 8  # the paper's WxA8 setting

    def quantize(self, model: nn.Module, spec: QuantSpec, context: MethodContext) -> nn.Module:
        cfg = resolve_preset(self.config)
        device = next(model.parameters()).device
        teacher = model.eval().requires_grad_(False)
        quantizer = LSQQuantizer if cfg.weight_quantizer == "lsq" else WeightQuantizer
        student = quantize_model(copy.deepcopy(model), spec, keep_fp=context.keep_fp, weight_quantizer=quantizer)
        student.eval()  # dropout off: the discrepancy is a deterministic function of x
        layers, trainable = _student_parameters(student)
        weights = [m.weight for m in layers]
        rng = torch.Generator().manual_seed(context.seed)
        make_inputs, gen_opt = self._input_maker(cfg, student, teacher, context, device, rng)
        student_opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
        bar = tqdm(range(cfg.steps), desc=f"{self.name} W{spec.w_bits}", leave=False, dynamic_ncols=True)
        history = []
        for step in bar:
            if gen_opt is not None and step % cfg.student_steps == 0:
                with frozen(trainable):  # the student is fixed while the generator ascends
                    for _ in range(cfg.generator_steps):
                        gen_opt.zero_grad(set_to_none=True)
                        t_in, s_in = make_inputs(grad=True)
                        (-generator_objective(teacher, student, t_in, s_in, cfg)).backward()
                        gen_opt.step()
            with torch.no_grad():
                t_in, s_in = make_inputs(grad=False)
                target = _logits(teacher, t_in)

            def closure(s_in=s_in, target=target):
                return distill_loss(_logits(student, s_in), target, kind=cfg.discrepancy, temperature=cfg.temperature)

            if cfg.student_optimizer == "sam":
                quantized = layers if cfg.perturb == "quantized" else ()
                loss, _ = sam_step(weights, closure, student_opt, rho=cfg.rho, quantized=quantized)
            else:
                loss = gradient_step(closure(), trainable, student_opt, max_norm=None)
            history.append(loss)
            bar.set_postfix(D=f"{loss:.4f}")
        if history:
            log.info(
                "%s: %d student steps, discrepancy %.4f -> %.4f",
                type(self).__name__,
                len(history),
                history[0],
                history[-1],
            )
        student.requires_grad_(False)
        return freeze(student.eval())

    def _input_maker(self, cfg, student, teacher, context, device, rng):
        """``(make, optimizer)``: ``make(grad)`` returns (teacher inputs_embeds, student inputs_embeds) for one
        batch; ``optimizer`` ascends the generator (None when nothing is trained: frozen or random inputs)."""
        ends = _ends(context.tokenizer)
        inner = cfg.seq_len - sum(e is not None for e in ends)
        if inner < 1:
            raise ValueError(f"seq_len {cfg.seq_len} leaves no room between the [CLS]/[SEP] tokens")
        if cfg.inputs == "random":
            vocab = student.get_input_embeddings().num_embeddings
            banned = _special_ids_mask(context.tokenizer, vocab)
            allowed = (~banned).nonzero().squeeze(1)

            def random_tokens(grad: bool):
                ids = allowed[torch.randint(len(allowed), (cfg.batch_size, inner), generator=rng)].to(device)
                probs = nn.functional.one_hot(ids, vocab).float()
                zero = probs.new_zeros(1)
                return (
                    soft_embeddings(teacher, probs, zero, ends, ids),
                    soft_embeddings(student, probs, zero, ends, ids),
                )

            return random_tokens, None
        embed_dim = student.get_input_embeddings().embedding_dim
        generator = load_generator(cfg.generator, context.tokenizer, embed_dim, cfg.mask_ratio).to(device)
        generator.train(False).requires_grad_(cfg.train_generator)

        def generated(grad: bool):
            noise = generator.noise(cfg.batch_size, inner, rng).to(device)
            with torch.set_grad_enabled(grad):
                probs, correction, ids = generator(noise, cfg.temperature, rng if cfg.sampling == "gumbel" else None)
            return (
                soft_embeddings(teacher, probs, correction, ends, ids),
                soft_embeddings(student, probs, correction, ends, ids),
            )

        # Adam on the negated discrepancy = stochastic gradient ascent on the generator and its adapter
        ascent = torch.optim.Adam(generator.parameters(), lr=cfg.generator_lr) if cfg.train_generator else None
        return generated, ascent


def _student_parameters(student: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """(quantized layers, whose weights SAM perturbs; everything the student optimizer updates): the
    quantized layers' weights, biases and learned steps; float parts (embeddings unless quantized,
    LayerNorms, the kept-FP head) stay."""
    from bench.quant import QUANT_LAYERS

    student.requires_grad_(False)
    layers = [m for m in student.modules() if isinstance(m, QUANT_LAYERS)]
    trainable = [p for m in layers for p in m.parameters()]
    trainable = list({id(p): p for p in trainable}.values())  # tied tables appear once
    for p in trainable:
        p.requires_grad_(True)
    return layers, trainable


def discrepancy(teacher: nn.Module, student: nn.Module, t_in, s_in, cfg: ZeroShotConfig) -> torch.Tensor:
    """D(T(x), S(x)): what the generator ascends and the student descends."""
    return generator_objective(teacher, student, t_in, s_in, dataclasses.replace(cfg, diversity=0.0))


def generator_objective(teacher: nn.Module, student: nn.Module, t_in, s_in, cfg: ZeroShotConfig) -> torch.Tensor:
    """What the generator ascends: D(T(x), S(x)) + diversity * entropy of the teacher's batch-mean output."""
    target = _logits(teacher, t_in)
    gap = distill_loss(
        _logits(student, s_in),
        target,
        kind=cfg.discrepancy,
        temperature=cfg.temperature,
        detach_teacher=False,  # the generator's gradient flows through the teacher's input too
    )
    if not cfg.diversity or target.shape[-1] == 1:
        return gap
    mean = torch.softmax(target.flatten(0, -2), dim=-1).mean(0)
    return gap + cfg.diversity * -(mean * mean.clamp_min(1e-12).log()).sum()


@hookimpl
def register_methods(register):
    register("zsaq", ZSAQ)
