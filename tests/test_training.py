"""bench.training's shared loop: a budget of zero steps is a valid setting, not a crash."""

import torch
from bench.methods.lsq_qat import LSQ
from tiny import OneLinear, tiny_bert

from bench.api import MethodContext, QuantSpec, TrainingData
from bench.training import train_loop


def test_train_loop_with_no_steps_returns_no_losses_and_leaves_the_model():
    model = OneLinear(torch.nn.Linear(4, 2))
    before = model.fc.weight.detach().clone()
    losses = train_loop(
        model, lambda epoch: [torch.ones(1, 4)], lambda m, x: m(x).sum(), epochs=0, steps_per_epoch=1, lr=0.1
    )
    assert losses == [] and torch.equal(model.fc.weight, before)


def test_lsq_with_zero_epochs_quantizes_without_training():
    """``--set lsq.epochs=0`` read the first loss of an empty loop (IndexError) before."""
    batch = {"input_ids": torch.randint(0, 100, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
    context = MethodContext(
        task=None,
        tokenizer=None,
        seed=0,
        keep_fp=("classifier",),
        training=TrainingData(batches=lambda epoch, **kw: [batch], steps=lambda **kw: 1),
    )
    method = LSQ(LSQ.Config(epochs=0, kd_weight=0.0))
    model = method.quantize(tiny_bert(), QuantSpec(4), context)
    assert context.report["train_steps"] == 0 and context.report["first_loss"] is None
    assert model(input_ids=batch["input_ids"]).logits.shape == (4, 2)
