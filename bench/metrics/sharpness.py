"""Sharpness of the evaluation loss around a (quantized) model: SAM's worst case in a rho-ball, and the
Hessian's top eigenvalue and trace (PyHessian).

Flat minima are said to tolerate weight noise (and so quantization noise) better; these metrics let the
leaderboard check that claim per cell. All three look at the same point and the same weights:

- **Which weights.** The weight matrix of every ``nn.Linear`` (full-precision heads included) and every
  ``QuantLinear`` (for a smoothed one, the matrix it applies to its unscaled input: see below). Biases,
  norms and embedding tables are left out: they stay in float in every method compared here, and their
  scales differ wildly from the matrices'. A weight shared by several Linears is counted once; a Linear
  tied to an embedding table (an LM head) perturbs the table through the tie, but a head tied to a quantized
  table (``QuantTiedHead``, ``--quantize-embeddings``) reads the table's grid and is left out with it. Other
  projection types (GPT-2's ``Conv1D``) are not Linears and are not seen.
- **Which point.** For a ``QuantLinear`` the point is the quantized weight Q(w) with the quantizer held
  fixed: the forward uses Q(w) + e, never Q(w + e). Re-quantizing a perturbation smaller than half a grid
  step gives back Q(w), so the loss would be piecewise constant and every metric zero or undefined.
  ``perturbable_weights`` makes each ``QuantLinear`` read a float tensor (its Q(w), materialized once)
  for the duration of the measurement and restores the model exactly. Activation quantizers run as usual.
- **Which point, smoothed layers.** A ``QuantLinear`` with an ``input_scale`` s (SmoothQuant, AWQ)
  computes Q(x / s) @ Q(W s)^T, and Q(W s) is only one parametrization of that function: any s, with the
  stored weight rescaled by 1/s, gives the same function. A ball around Q(W s) is an ellipsoid, stretched
  by s per input column, in the weights the function applies to its input, so the values would follow s
  rather than the function (the toy MLP of tests/test_sharpness_reparam.py, one function: sharpness 0.075
  unsmoothed, 0.111 with power-of-two s; Hessian trace 2.5 vs 14.9). So the point is the unsmoothed
  W_eff = Q(W s) / s (per input column), and the forward reads Q(W s) + e * s on x / s, i.e. W_eff + e on
  x: every method is measured in the space of the weights its function is defined by. The activation
  quantizer still sees x / s, exactly as scored; only the weight slot changes.
- **Which loss.** ``loss_fn(model)`` returns the scalar evaluation loss on a fixed set of batches (the
  runner builds it; ``mean_loss`` is a ready one), or a lazy iterable of per-batch terms summing to it, so
  that only one batch's autograd graph is alive at a time (a tensor loss keeps all batches' graphs: on
  MiniLM, 8 x 32 x 64 tokens, ~3.7 GiB for the gradient and ~14 GiB for the Hessian's double backward).
  It must not disable autograd. The model is put in eval mode while measuring (dropout would make the
  loss random) and every module's mode is restored after.

Random vectors come from a CPU ``torch.Generator`` seeded with ``seed`` and are moved to each weight's
device, so a seed gives the same directions on CPU and GPU. Second derivatives need double backward,
which the fused attention kernels lack: the Hessian metrics run under the math SDPA kernel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.quant.layers import QuantLinear

# The evaluation loss of a model: a scalar tensor, or an iterable of scalar terms (one per batch) whose sum is
# the loss; a lazy iterable (a generator) lets the metrics hold one batch's graph at a time.
LossFn = Callable[[nn.Module], torch.Tensor | Iterable[torch.Tensor]]
Vectors = list[torch.Tensor]  # one tensor per weight slot: a point in the space of all measured weights


@dataclass
class WeightSlot:
    """One measured weight: ``tensor`` is the leaf the forward reads, ``base`` its value at e = 0.

    ``held`` is that value, or a function recomputing it: a quantized layer's Q(w) is redone from its float weight
    and grid whenever asked (exact, and cheap next to a forward) instead of being kept as one more weight-sized
    copy beside the leaf and its gradient: 0.4 GB less at the phase's peak on SmolLM2-135M."""

    name: str
    tensor: torch.Tensor
    held: torch.Tensor | Callable[[], torch.Tensor]

    @property
    def base(self) -> torch.Tensor:
        return self.held if isinstance(self.held, torch.Tensor) else self.held()

    def place(self, delta: torch.Tensor | None) -> None:
        """Make the forward see ``base + delta`` (``base`` itself for None), in place."""
        with torch.no_grad():
            base = self.base
            self.tensor.copy_(base if delta is None else base + delta)


_ABSENT = object()


def _requantized(layer: QuantLinear) -> Callable[[], torch.Tensor]:
    """A function giving ``layer``'s Q(w) as its class computes it for the scored forward (PreQuant's outlier slices
    included), bit for bit, as a tensor of its own that the layer does not keep cached."""
    quantized_weight = type(layer).quantized_weight

    def value() -> torch.Tensor:
        with torch.no_grad():
            q = quantized_weight(layer).detach()
        layer.__dict__.pop("_qcache", None)
        return q.clone() if q.data_ptr() == layer.weight.data_ptr() else q  # an identity quantizer: the parameter

    return value


def _constant(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


def _through_input_scale(
    leaf: torch.Tensor, base: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """The weight a smoothed layer's forward reads when the slot is its unsmoothed W_eff = Q(W s) / s.

    Q(W s) + (W_eff + e - W_eff) * s rather than (W_eff + e) * s: at e = 0 the forward gets Q(W s) bit for
    bit (dividing and multiplying back by s would round), so the base loss is the scored one.
    """
    return lambda: quantized + (leaf - base) * scale


@contextmanager
def perturbable_weights(model: nn.Module) -> Iterator[list[WeightSlot]]:
    """Yield the measured weights of ``model`` as slots whose tensors can be perturbed and differentiated.

    A ``QuantLinear``'s ``quantized_weight`` is shadowed by an instance attribute returning a leaf tensor
    holding its frozen Q(w) (the forward is Q(w) + e; the value at e = 0 is recomputed when needed, and the
    evaluation's cached Q(w) is dropped meanwhile, so the weights are held as W, leaf and gradient); with
    an ``input_scale`` s the leaf holds the unsmoothed Q(W s) / s and the forward reads Q(W s) + e * s. An
    ``nn.Linear``'s own weight parameter is the slot; its value is copied back bit for bit on exit. Every
    other parameter has autograd off meanwhile (no graph is built for it). On exit, weights, the
    ``requires_grad`` flags and every module's train/eval mode are as they were, exception or not.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    slots: list[WeightSlot] = []
    shadowed: list[tuple[QuantLinear, object]] = []  # (layer, what its instance dict held before, if anything)
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        seen: set[int] = set()
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                shadowed.append((module, module.__dict__.get("quantized_weight", _ABSENT)))
                requantized, scale = _requantized(module), module.input_scale
                if scale is None:
                    leaf, held = requantized().requires_grad_(True), requantized
                    module.quantized_weight = _constant(leaf)
                else:  # the forward needs Q(W s) itself (see _through_input_scale): kept
                    frozen = requantized()
                    held = frozen / scale.detach()
                    leaf = held.clone().requires_grad_(True)
                    module.quantized_weight = _through_input_scale(leaf, held, frozen, scale.detach().clone())
                slots.append(WeightSlot(name, leaf, held))
            elif isinstance(module, nn.Linear) and id(module.weight) not in seen:
                seen.add(id(module.weight))
                module.weight.requires_grad_(True)
                slots.append(WeightSlot(name, module.weight, module.weight.detach().clone()))
        yield slots
    finally:
        for slot in slots:
            if isinstance(slot.tensor, nn.Parameter):
                slot.place(None)
        for module, before in shadowed:
            if before is _ABSENT:
                module.__dict__.pop("quantized_weight", None)
            else:
                module.quantized_weight = before
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


# ---- vector arithmetic over slots (norms and dots accumulate in Python floats: exact enough, any device)


def _dot(a: Vectors, b: Vectors) -> float:
    return sum(torch.dot(x.flatten().float(), y.flatten().float()).item() for x, y in zip(a, b, strict=True))


def _norm(vs: Vectors) -> float:
    return math.sqrt(sum(torch.linalg.vector_norm(v, dtype=torch.float32).item() ** 2 for v in vs))


def _scaled(vs: Vectors, factor: float) -> Vectors:
    return [v * factor for v in vs]


def _axpy(y: Vectors, alpha: float, x: Vectors) -> Vectors:
    """y + alpha * x."""
    return [a + alpha * b for a, b in zip(y, x, strict=True)]


def _zeros(slots: list[WeightSlot]) -> Vectors:
    return [torch.zeros_like(s.tensor) for s in slots]


def _on_slots(slots: list[WeightSlot], make: Callable[[tuple[int, ...]], torch.Tensor]) -> Vectors:
    """Build one CPU tensor per slot (in slot order, so a seed fixes the whole vector) and move it there."""
    return [make(tuple(s.tensor.shape)).to(device=s.tensor.device, dtype=s.tensor.dtype) for s in slots]


def _gaussian_unit(slots: list[WeightSlot], seed: int) -> Vectors:
    gen = torch.Generator().manual_seed(seed)
    vs = _on_slots(slots, lambda shape: torch.randn(shape, generator=gen))
    return _scaled(vs, 1.0 / _norm(vs))


def _rademacher(slots: list[WeightSlot], gen: torch.Generator) -> Vectors:
    return _on_slots(slots, lambda shape: torch.randint(0, 2, shape, generator=gen).float() * 2 - 1)


# ---- loss, gradient and Hessian-vector products at the slots' current values


def _scalar(term: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(term) or term.dim() != 0:
        shape = tuple(term.shape) if torch.is_tensor(term) else type(term).__name__
        raise ValueError(f"loss_fn must return a scalar tensor or an iterable of them, got {shape}")
    return term


def _terms(out: torch.Tensor | Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The loss as a sum of scalar terms: one for a tensor, one per batch for a lazy (batchwise) loss."""
    if torch.is_tensor(out):
        yield _scalar(out)
    else:
        for term in out:
            yield _scalar(term)


def _grads_of(term: torch.Tensor, slots: list[WeightSlot], *, create_graph: bool = False) -> Vectors:
    """d term / d slots (zeros where a slot is unused or the term does not depend on the weights)."""
    if not term.requires_grad:
        return _zeros(slots)
    found = torch.autograd.grad(
        term, [s.tensor for s in slots], allow_unused=True, create_graph=create_graph, retain_graph=create_graph
    )
    return [torch.zeros_like(s.tensor) if g is None else g for g, s in zip(found, slots, strict=True)]


def _loss_and_grads(
    model: nn.Module, loss_fn: LossFn, slots: list[WeightSlot], *, grads: bool = True
) -> tuple[float, Vectors | None]:
    """The loss and its gradient with respect to the slots, term by term (a term's graph is freed at once).

    Each term's backward accumulates into the slot tensors' ``.grad`` in place (``backward(inputs=...)``), so
    one gradient vector is alive, not a running total beside each term's own gradient: on a 135M-parameter
    decoder that is 0.5 GB less at the sharpness phase's peak."""
    tensors = [s.tensor for s in slots]
    held = [t.grad for t in tensors]  # a Parameter slot's own .grad (normally None), given back after
    for t in tensors:
        t.grad = None
    loss = 0.0
    try:
        with torch.set_grad_enabled(grads):
            for term in _terms(loss_fn(model)):
                loss += term.item()
                if grads and term.requires_grad:
                    term.backward(inputs=tensors)
        total = [torch.zeros_like(s.tensor) if t.grad is None else t.grad for s, t in zip(slots, tensors, strict=True)]
    finally:
        for t, grad in zip(tensors, held, strict=True):
            t.grad = grad
    return loss, total if grads else None


def _hvp(grads: Vectors, slots: list[WeightSlot], v: Vectors) -> Vectors:
    """H v by differentiating (grad . v) again; the graph of ``grads`` is kept for the next product."""
    pairs = [(g, x) for g, x in zip(grads, v, strict=True) if g.requires_grad]
    if not pairs:  # the term is at most linear in the weights
        return _zeros(slots)
    with torch.enable_grad():
        found = torch.autograd.grad(
            [g for g, _ in pairs],
            [s.tensor for s in slots],
            grad_outputs=[x for _, x in pairs],
            retain_graph=True,
            allow_unused=True,
        )
    return [torch.zeros_like(s.tensor) if h is None else h.detach() for h, s in zip(found, slots, strict=True)]


def _hessian_products(model: nn.Module, loss_fn: LossFn, slots: list[WeightSlot]) -> Callable[[Vectors], Vectors]:
    """v -> H v for the loss at the slots' values.

    A tensor loss: its gradient graph (``create_graph``) is built once and every product reuses it, so
    memory holds every batch's double-backward graph. A lazy loss (an iterable of per-batch terms): each
    product re-runs ``loss_fn`` and sums the terms' products, holding one batch's graph at a time, for
    about 1.5x the time of a product on a kept graph.
    """
    with torch.enable_grad():
        out = loss_fn(model)
        if torch.is_tensor(out):
            loss = _scalar(out)
            _finite(loss, "at the model's weights")
            grads = _grads_of(loss, slots, create_graph=True)
            return lambda v: _hvp(grads, slots, v)
    pending = [out]  # the first product consumes the iterable already returned

    def product(v: Vectors) -> Vectors:
        total = _zeros(slots)
        with torch.enable_grad():
            for term in _terms(pending.pop() if pending else loss_fn(model)):
                _finite(term, "at the model's weights")
                total = _axpy(total, 1.0, _hvp(_grads_of(term, slots, create_graph=True), slots, v))
        return total

    return product


@contextmanager
def _double_backward_ready() -> Iterator[None]:
    """Fused SDPA kernels (CPU flash, CUDA flash/efficient) have no second derivative; the math one does."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _finite(loss: torch.Tensor | float, what: str) -> float:
    value = loss.item() if torch.is_tensor(loss) else float(loss)
    if not math.isfinite(value):
        raise ValueError(f"loss is {value} {what}: sharpness is undefined there")
    return value


# ---- the metrics


def sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    rho: float = 0.05,
    steps: int = 5,
    seed: int = 0,
    step_size: float | None = None,
) -> dict[str, float | int]:
    """Worst loss increase in an L2 ball of radius ``rho`` around the measured weights (SAM's sharpness).

    Estimates max over ||e|| <= rho of L(w + e) - L(w), with ||e|| the L2 norm over all measured weights
    together, by ``steps`` projected normalized-gradient ascent steps: e <- P(e + step_size * g/||g||), P the
    projection onto the ball, g the gradient at w + e, ``step_size`` = ``rho`` by default. The first step
    from e = 0 is SAM's own perturbation rho * g/||g|| (so ``steps=1`` is SAM's estimate); at a stationary
    point (g = 0, where SAM has no direction) it starts from a Gaussian direction drawn with ``seed``.
    Every visited e lies in the ball, and the best increase seen is returned, so the value is a lower bound
    of the true maximum, and >= 0 since e = 0 is in the ball. Cost: ``steps`` forward+backward passes of
    ``loss_fn`` plus one forward.

    Returns ``{value, rho, steps, base_loss, seconds}``; ``base_loss`` is L at the (quantized) weights.
    Raises ``ValueError`` when the loss is not finite at w or at a visited point.
    """
    if rho < 0 or steps < 0:
        raise ValueError(f"sharpness needs rho >= 0 and steps >= 0 (got rho={rho}, steps={steps})")
    step = rho if step_size is None else step_size
    start = time.perf_counter()
    with perturbable_weights(model) as slots, _recomputed_activations(model):
        loss, grads = _loss_and_grads(model, loss_fn, slots, grads=steps > 0)
        base_loss = _finite(loss, "at the model's weights")
        best = 0.0
        for k in range(steps):
            g_norm = _norm(grads)
            if g_norm == 0.0 and k > 0:  # a stationary point inside the ball: ascent cannot move
                break
            direction, factor = (_gaussian_unit(slots, seed), 1.0) if g_norm == 0.0 else (grads, 1.0 / g_norm)
            del grads  # freed before the next backward: one gradient vector alive at a time
            _ascend(slots, direction, step * factor, rho)
            del direction
            loss, grads = _loss_and_grads(model, loss_fn, slots, grads=k < steps - 1)
            best = max(best, _finite(loss, f"at ascent step {k + 1} (rho={rho})") - base_loss)
    return {"value": best, "rho": rho, "steps": steps, "base_loss": base_loss, "seconds": time.perf_counter() - start}


RECOMPUTE_ABOVE = 100_000_000  # parameters: from here the backward recomputes each layer's activations


@contextmanager
def _recomputed_activations(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing for a model of ``RECOMPUTE_ABOVE`` parameters or more (Hugging Face's, where the
    model supports it): the backward recomputes each layer's activations instead of keeping all of them, the
    same values for more time (SmolLM2-135M, 512-token windows: peak RSS 3.4 -> 2.8 GB, ~40% more seconds).
    MiniLM's batches keep little, and stay as they are.

    Hugging Face checkpoints a layer only while that layer is in training mode; the measured model is in eval
    mode, so each checkpointing layer's own flag is set (its submodules, dropout included, stay in eval) and put
    back on exit."""
    # transformers 5 names it activation checkpointing; 4.x gradient checkpointing (same switch)
    new_names = hasattr(model, "activation_checkpointing_enable")
    prefix = "activation" if new_names else "gradient"
    if (
        not hasattr(model, f"{prefix}_checkpointing_enable")
        or not getattr(model, "supports_gradient_checkpointing", False)
        or getattr(model, f"is_{prefix}_checkpointing", True)  # already on: the caller's choice, left alone
        or sum(p.numel() for p in model.parameters()) < RECOMPUTE_ABOVE
    ):
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    getattr(model, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    modes = [m.training for m in layers]
    try:
        for layer in layers:
            layer.training = True
        yield
    finally:
        for layer, mode in zip(layers, modes, strict=True):
            layer.training = mode
        getattr(model, f"{prefix}_checkpointing_disable")()


def _ascend(slots: list[WeightSlot], direction: Vectors, alpha: float, rho: float) -> None:
    """Move the slots from base + e to base + P(e + alpha * direction), P the projection onto the rho-ball, in
    place: e lives in the slot tensors themselves (tensor - base), so no vector of perturbations is kept beside
    the weights and their base copies."""
    with torch.no_grad():
        for slot, d in zip(slots, direction, strict=True):
            slot.tensor.add_(d, alpha=alpha)
        e_norm = math.sqrt(
            sum(torch.linalg.vector_norm(s.tensor - s.base, dtype=torch.float32).item() ** 2 for s in slots)
        )
        if e_norm > rho:
            for slot in slots:  # base + (tensor - base) * rho / |e|
                base = slot.base
                slot.tensor.sub_(base).mul_(rho / e_norm).add_(base)


def hessian_top_eig(
    model: nn.Module, loss_fn: LossFn, *, iters: int = 20, tol: float = 1e-3, seed: int = 0
) -> dict[str, float | int | bool]:
    """The Hessian eigenvalue of largest magnitude over the measured weights, by power iteration (PyHessian).

    One forward and backward with ``create_graph`` builds the gradient graph; each iteration is one
    Hessian-vector product on it (double backward), starting from a Gaussian unit vector drawn with
    ``seed``. The estimate is the Rayleigh quotient v.Hv; iteration stops when it changes by less than
    ``tol`` relative (PyHessian's rule) or after ``iters`` products. The graph holds every batch's
    activations at once: memory grows with what ``loss_fn`` evaluates.

    Returns ``{value, iters, converged, seconds}`` (``iters``: products computed).
    """
    if iters < 1:
        raise ValueError(f"hessian_top_eig needs iters >= 1 (got {iters})")
    start = time.perf_counter()
    with perturbable_weights(model) as slots, _double_backward_ready():
        hessian_times = _hessian_products(model, loss_fn, slots)
        v = _gaussian_unit(slots, seed)
        eig, converged, done = 0.0, False, 0
        for done in range(1, iters + 1):
            hv = hessian_times(v)
            previous, eig = eig, _dot(v, hv)
            hv_norm = _norm(hv)
            if hv_norm == 0.0:  # v is in the null space; with a Gaussian start, H = 0 on these weights
                converged = True
                break
            v = _scaled(hv, 1.0 / hv_norm)
            if done > 1 and abs(eig - previous) <= tol * (abs(previous) + 1e-6):
                converged = True
                break
    return {"value": eig, "iters": done, "converged": converged, "seconds": time.perf_counter() - start}


def hessian_trace(model: nn.Module, loss_fn: LossFn, *, samples: int = 20, seed: int = 0) -> dict[str, float | int]:
    """Trace of the Hessian over the measured weights by Hutchinson's estimator (PyHessian): the mean of
    v.Hv over ``samples`` Rademacher vectors v drawn with ``seed``, each one Hessian-vector product on a
    gradient graph built once.

    Returns ``{value, samples, stderr, seconds}``; ``stderr`` is the standard error of the mean (the
    estimator is unbiased; its spread comes from the Hessian's off-diagonal entries).
    """
    if samples < 1:
        raise ValueError(f"hessian_trace needs samples >= 1 (got {samples})")
    start = time.perf_counter()
    with perturbable_weights(model) as slots, _double_backward_ready():
        hessian_times = _hessian_products(model, loss_fn, slots)
        gen = torch.Generator().manual_seed(seed)
        estimates = []
        for _ in range(samples):
            v = _rademacher(slots, gen)
            estimates.append(_dot(v, hessian_times(v)))
    mean = sum(estimates) / samples
    spread = math.sqrt(sum((x - mean) ** 2 for x in estimates) / (samples - 1)) if samples > 1 else math.nan
    return {
        "value": mean,
        "samples": samples,
        "stderr": spread / math.sqrt(samples),
        "seconds": time.perf_counter() - start,
    }


def mean_loss(
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    loss: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    lazy: bool = False,
) -> LossFn:
    """A ``loss_fn``: the mean of ``loss(model, batch)`` over fixed ``batches`` (default: a Hugging Face
    model's own ``model(**batch).loss``, batches holding ``labels``), moved to the model's device; every call
    sees the same data. Tasks pass their ``Task.loss``.

    ``lazy=False`` returns the mean as one tensor (the plain contract; a Hessian metric then keeps every
    batch's graph). ``lazy=True`` yields the terms loss_b / n batch by batch, so the metrics hold one batch's
    graph at a time: same values up to float rounding, a fraction of the memory (the runner's choice).
    """
    kept = list(batches)
    if not kept:
        raise ValueError("mean_loss needs at least one batch")
    loss = loss or (lambda model, batch: model(**batch).loss)

    def terms(model: nn.Module) -> Iterator[torch.Tensor]:
        device = next(model.parameters()).device
        for batch in kept:
            yield loss(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}) / len(kept)

    def loss_fn(model: nn.Module) -> torch.Tensor | Iterator[torch.Tensor]:
        return terms(model) if lazy else sum(terms(model))

    return loss_fn
