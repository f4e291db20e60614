"""ZSAQ and GAN-only zero-shot QAT: the generator ascends, the student descends, no task data is touched."""

import copy
import json

import pytest
import torch
from bench.methods.gan_zeroshot import GanZeroShot
from bench.methods.zsaq import (
    ZSAQ,
    ZeroShotConfig,
    discrepancy,
    load_generator,
    resolve_preset,
    soft_embeddings,
    vocab_map,
)
from transformers import AutoTokenizer

from bench import hub
from bench.api import MethodContext, QuantSpec
from bench.cli import main
from bench.quant import DEFAULT_KEEP_FP, QuantLinear, quantize_model
from bench.quant.lsq import LSQQuantizer
from tests.tiny import tiny_bert, tiny_llama

SPEC = QuantSpec(2, 8)
FAST = dict(steps=3, batch_size=4, seq_len=10, lr=1e-3)  # a large lr: 3 steps must move the student


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(hub.package_dir("cognition") / "model")


def _teacher():
    return tiny_bert(vocab_size=30522, max_position_embeddings=64)


class Trap:
    """Stands in for the task: any use of it (data loading, batches, labels) fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a zero-shot method touched the task: .{name}")


def _context(tokenizer, seed=0):
    return MethodContext(task=Trap(), tokenizer=tokenizer, seed=seed, keep_fp=DEFAULT_KEEP_FP, task_data=Trap())


def test_generator_step_increases_the_discrepancy_on_a_fixed_student(tokenizer):
    teacher = _teacher().requires_grad_(False)
    student = quantize_model(copy.deepcopy(teacher), SPEC, weight_quantizer=LSQQuantizer).requires_grad_(False)
    generator = load_generator("bert-tiny", tokenizer, teacher.config.hidden_size)
    cfg = ZeroShotConfig(**FAST)
    noise = generator.noise(8, 12, torch.Generator().manual_seed(0))
    ends = (tokenizer.cls_token_id, tokenizer.sep_token_id)

    def gap():
        probs, correction, _ = generator(noise, cfg.temperature)
        return discrepancy(
            teacher,
            student,
            soft_embeddings(teacher, probs, correction, ends),
            soft_embeddings(student, probs, correction, ends),
            cfg,
        )

    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
    before = gap()
    (-before).backward()
    optimizer.step()
    with torch.no_grad():
        after = gap()
    assert after.item() > before.item()
    assert all(not p.requires_grad for p in student.parameters())  # the student stayed fixed


def test_zsaq_trains_the_student_without_task_data_and_returns_a_frozen_quantized_model(tokenizer):
    teacher = _teacher()
    student = ZSAQ(ZeroShotConfig(**FAST)).quantize(copy.deepcopy(teacher), SPEC, _context(tokenizer))
    layers = [m for m in student.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.weight_quantizer.frozen for m in layers)  # a fixed grid to evaluate and export
    assert all(m.act_quantizer.bits == 8 for m in layers)
    original = dict(teacher.named_modules())
    moved = [not torch.equal(m.weight, original[n].weight) for n, m in student.named_modules() if m in layers]
    assert len(moved) == len(layers) and any(moved)  # the student was trained
    assert all(not p.requires_grad for p in student.parameters())
    # float parts stay the teacher's: embeddings, LayerNorm, the kept-FP classifier
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)


def test_same_seed_same_student_and_ablations_run(tokenizer):
    def run(method, **settings):
        cfg = method.Config(**{**FAST, **settings})
        model = method(cfg).quantize(_teacher(), SPEC, _context(tokenizer))
        return torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, QuantLinear)])

    assert torch.equal(run(ZSAQ), run(ZSAQ))
    assert not torch.equal(run(ZSAQ), run(GanZeroShot))  # SAM vs AdamW differ
    for ablation in ({"train_generator": False}, {"inputs": "random"}, {"weight_quantizer": "lsq"}):
        assert torch.isfinite(run(ZSAQ, **ablation)).all()


def test_gan_is_zsaq_with_an_adamw_student():
    zsaq, gan = ZSAQ.Config(), GanZeroShot.Config()
    assert gan.student_optimizer == "adamw" and zsaq.student_optimizer == "sam"
    assert {k: v for k, v in vars(gan).items() if k != "student_optimizer"} == {
        k: v for k, v in vars(zsaq).items() if k != "student_optimizer"
    }
    assert ZSAQ.data_used == GanZeroShot.data_used == "none"


def test_paper_preset_fills_defaults_but_keeps_explicit_settings():
    paper = resolve_preset(ZeroShotConfig(preset="paper", steps=7))
    assert paper.generator == "facebook/opt-350m" and paper.seq_len == 128 and paper.steps == 7


def test_decoder_student_next_token_kl_with_a_vocabulary_bridge(tokenizer):
    """A decoder student (tiny Llama) distilled on next-token distributions; the generator's vocabulary
    is bridged to a student vocabulary that differs from it (here: the same tokens, shuffled)."""
    model, llama_tok = tiny_llama()
    cfg = ZeroShotConfig(**FAST)
    out = ZSAQ(cfg).quantize(model, QuantSpec(4, 8, "per-group", 16), _context(llama_tok))
    assert sum(isinstance(m, QuantLinear) for m in out.modules()) == 14  # lm_head kept float

    class Shuffled:
        def __init__(self, inner):
            self.inner, self.vocab = inner, {t: (i + 1) % len(inner) for t, i in inner.get_vocab().items()}

        def get_vocab(self):
            return self.vocab

        def __call__(self, texts, add_special_tokens=False):
            ids = self.inner(texts, add_special_tokens=add_special_tokens)["input_ids"]
            return {"input_ids": [[(i + 1) % len(self.inner) for i in row] for row in ids]}

    mapping = vocab_map(tokenizer, Shuffled(tokenizer), 30522)
    the = tokenizer.convert_tokens_to_ids("the")
    assert mapping is not None and mapping[the].item() == the + 1
    assert vocab_map(tokenizer, tokenizer, 30522) is None


def test_bench_run_zsaq_and_gan_rows_are_zero_shot_w2a8(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--methods", "rtn,gan,zsaq", "--bits", "2", "--model", "bert-tiny", "--limit", "32"]
    args += ["--set", "sst2.max_train_examples=64", "--no-latency", "--no-sharpness", "--out", str(out)]
    for method in ("zsaq", "gan"):
        args += ["--set", f"{method}.steps=2", "--set", f"{method}.batch_size=4", "--set", f"{method}.seq_len=8"]
    args += ["--set", "zsaq.train_generator=false"]  # an ablation shows up as a named variant
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"fp32", "rtn", "gan", "zsaq"}
    for name in ("rtn", "gan", "zsaq"):
        row = by_method[name]
        assert row["status"] == "ok", row["error"]
        assert row["bits"] == "W2A8" and row["a_bits"] == 8  # the QAT papers' A8, shared by rtn
    assert by_method["zsaq"]["data_used"] == by_method["gan"]["data_used"] == "none"
    assert "train_generator=False" in by_method["zsaq"]["variant"].split(",")
    board = (out / "leaderboard.md").read_text()
    assert "W2A8" in board and "zsaq" in board and "gan" in board


def test_generator_objective_adds_the_entropy_of_the_teachers_batch_mean_prediction(tokenizer):
    from bench.methods.zsaq import generator_objective

    teacher = _teacher().requires_grad_(False)
    student = quantize_model(copy.deepcopy(teacher), SPEC).requires_grad_(False)
    x = torch.randn(6, 9, teacher.config.hidden_size, generator=torch.Generator().manual_seed(1))
    cfg = ZeroShotConfig(diversity=0.5)
    with torch.no_grad():
        mean = torch.softmax(teacher(inputs_embeds=x).logits, -1).mean(0)
        entropy = -(mean * mean.log()).sum()
        got = generator_objective(teacher, student, x, x, cfg) - discrepancy(teacher, student, x, x, cfg)
    assert torch.allclose(got, 0.5 * entropy, atol=1e-5)


def _watch_sam(monkeypatch) -> list[tuple[list, list, list]]:
    """Spy on zsaq's SAM step. At each of its loss evaluations and once after it, record per QuantLinear of
    the student: what its forward reads (``quantized_weight()``), its latent weight w, and Q(w) by its own
    quantizer (what a forward that re-rounds would read)."""
    import bench.methods.zsaq as zsaq

    students, records = [], []
    real_quantize_model, real_sam_step = zsaq.quantize_model, zsaq.sam_step

    def quantize_model(*args, **kwargs):
        students.append(real_quantize_model(*args, **kwargs))
        return students[-1]

    def record():
        layers = [m for m in students[-1].modules() if isinstance(m, QuantLinear)]
        with torch.no_grad():
            seen = [m.quantized_weight().clone() for m in layers]
            latent = [m.weight.clone() for m in layers]
            requantized = [m.weight_quantizer(m.weight).clone() for m in layers]
        records.append((seen, latent, requantized))

    def sam_step(params, closure, optimizer, **kwargs):
        out = real_sam_step(params, lambda: record() or closure(), optimizer, **kwargs)
        record()
        return out

    monkeypatch.setattr(zsaq, "quantize_model", quantize_model)
    monkeypatch.setattr(zsaq, "sam_step", sam_step)
    return records


def _norm(tensors) -> float:
    return torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])).item()


# lr 0: AdamW (no weight decay) leaves the weights where SAM's restore put them
ONE_SAM_STEP = {**FAST, "steps": 1, "lr": 0.0}


@pytest.mark.parametrize("weight_quantizer", ["minmax", "lsq"])
def test_zsaq_sam_ascent_reads_the_quantized_weights_plus_e_with_norm_rho_then_restores(
    tokenizer, monkeypatch, weight_quantizer
):
    records = _watch_sam(monkeypatch)
    cfg = ZeroShotConfig(**ONE_SAM_STEP, weight_quantizer=weight_quantizer)
    assert cfg.perturb == "quantized"  # the default, as SQuAT's
    ZSAQ(cfg).quantize(_teacher(), SPEC, _context(tokenizer))
    (seen0, w0, _), (seen1, w1, _), (seen2, w2, _) = records
    e = [b - a for a, b in zip(w0, w1, strict=True)]  # SAM's e, on the latent weights
    assert _norm(e) == pytest.approx(cfg.rho, rel=1e-5)
    for a, b, d in zip(seen0, seen1, e, strict=True):
        torch.testing.assert_close(b - a, d)  # the forward read Q(w) + e: the whole e, grid frozen
    assert all(torch.equal(a, b) for a, b in zip(w0, w2, strict=True))  # restored bit for bit
    assert all(torch.equal(a, b) for a, b in zip(seen0, seen2, strict=True))  # and read as before


def test_zsaq_latent_perturbation_reads_the_requantized_moved_weights(tokenizer, monkeypatch):
    records = _watch_sam(monkeypatch)
    cfg = ZeroShotConfig(**ONE_SAM_STEP, perturb="latent")
    ZSAQ(cfg).quantize(_teacher(), SPEC, _context(tokenizer))
    (seen0, w0, _), (seen1, w1, requantized1), (_, w2, _) = records
    e = [b - a for a, b in zip(w0, w1, strict=True)]
    assert _norm(e) == pytest.approx(cfg.rho, rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(seen1, requantized1, strict=True))  # Q(w + e)
    moved = [b - a for a, b in zip(seen0, seen1, strict=True)]
    assert not all(torch.allclose(m, d) for m, d in zip(moved, e, strict=True))  # not Q(w) + e
    assert all(torch.equal(a, b) for a, b in zip(w0, w2, strict=True))


@pytest.mark.parametrize("embeddings", [False, True])
def test_hard_token_lookup_equals_the_dense_product_and_its_gradients(tokenizer, embeddings):
    """Gumbel tokens embed by lookup: the same embeddings, generator and table gradients as probs @ E."""
    teacher = _teacher().requires_grad_(False)
    spec = QuantSpec(4, 8, embeddings=embeddings)
    student = quantize_model(copy.deepcopy(teacher), spec).requires_grad_(True)
    generator = load_generator("bert-tiny", tokenizer, teacher.config.hidden_size)
    torch.nn.init.normal_(generator.adapter.weight, std=0.01)  # a live correction path too
    noise = generator.noise(4, 9, torch.Generator().manual_seed(0))
    ends = (tokenizer.cls_token_id, tokenizer.sep_token_id)
    results = []
    for use_ids in (False, True):
        generator.zero_grad(set_to_none=True)
        student.zero_grad(set_to_none=True)
        probs, correction, ids = generator(noise, 1.0, torch.Generator().manual_seed(1))
        assert ids is not None and torch.equal(probs.argmax(-1), ids)
        t_in = soft_embeddings(teacher, probs, correction, ends, ids if use_ids else None)
        s_in = soft_embeddings(student, probs, correction, ends, ids if use_ids else None)
        discrepancy(teacher, student, t_in, s_in, ZeroShotConfig()).backward()
        table = student.get_input_embeddings().weight
        lm_grad = torch.cat([p.grad.flatten() for p in generator.lm.parameters() if p.grad is not None])
        results.append((t_in.detach(), s_in.detach(), lm_grad, table.grad.clone()))
    dense, lookup = results
    for a, b in zip(dense, lookup, strict=True):  # relative to the whole vector: the gradients are tiny numbers
        assert (b - a).norm() <= 1e-4 * a.norm(), ((b - a).norm(), a.norm())
    assert lookup[2].abs().sum() > 0 and lookup[3].abs().sum() > 0  # gradients reached the generator LM and table


def test_a_sample_without_gradients_is_its_ids_alone(tokenizer):
    teacher = _teacher().requires_grad_(False)
    generator = load_generator("bert-tiny", tokenizer, teacher.config.hidden_size)
    noise = generator.noise(4, 9, torch.Generator().manual_seed(0))
    probs, correction, ids = generator(noise, 0.7, torch.Generator().manual_seed(5))
    with torch.no_grad():
        none, same_correction, same_ids = generator(noise, 0.7, torch.Generator().manual_seed(5))
    assert none is None and torch.equal(same_ids, ids) and torch.allclose(same_correction, correction)
    ends = (tokenizer.cls_token_id, tokenizer.sep_token_id)
    with torch.no_grad():
        torch.testing.assert_close(
            soft_embeddings(teacher, None, correction, ends, ids), soft_embeddings(teacher, probs, correction, ends)
        )
