"""The diagonal Fisher estimate: F̂ = Σₙ (∂ℓₙ/∂θ)² over N samples, one squared gradient per sample.

Batched path: the model runs once per batch with its parameters temporarily frozen
(requires_grad=False), so autograd computes only what back-propagation needs (input gradients),
never the batch weight gradient. Forward hooks on every module that owns trainable parameters keep
its input; a hook on its output receives the output gradient during the backward pass, and the
module's rule (`rules.py`) adds Σₙ Gₙ² for its parameters on the spot.

Loop path (`implementation="loop"`, and the automatic fallback): the original algorithm, one
forward/backward per sample, squared gradients summed. It is also the reference the tests use.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from ._batches import Batch, parse_batch, right_padded_lengths, select, take, truncate
from ..models.kinds import is_causal_lm
from .losses import CausalLM, check_kind, fisher_terms
from .rules import DEFAULT_CHUNK_ELEMS, Context, EmbeddingRule, GenericRule, LinearRule, Rule, _Unsupported, rule_for
from .tied import TiedEmbeddingRule, TiedHeadRule, TiedPair

IMPLEMENTATIONS = ("auto", "torch", "triton", "loop")


class _UseLoop(Exception):
    pass


@dataclass
class FisherResult:
    """Scores per trainable parameter (model order), and how they were obtained."""

    scores: dict[str, Tensor]
    num_samples: int
    kind: str
    implementation: str  # what actually ran: "torch", "triton" or "loop"
    seconds: float
    fallback_reason: str | None = None
    generic_modules: list[str] = field(default_factory=list)


def _acc_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def _fisher_mode(model: nn.Module, seed: int | None):
    """Eval mode (dropout off, BatchNorm on running statistics, which are not updated) and parameters
    frozen; everything restored afterwards, also on error. `.grad` is never touched."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"]
    rng = torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices}), enabled=seed is not None)
    try:
        with rng, torch.enable_grad():
            if seed is not None:
                torch.manual_seed(seed)
            model.eval()
            yield
    finally:
        for m, t in modes:
            m.training = t
        for p, r in flags:
            p.requires_grad_(r)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------- loop path
def _loop_batch(model, params, acc, b: Batch, kind, loss_fn, lm: CausalLM | None = None) -> None:
    tensors = [p for _, p in params]
    for i in range(b.size):
        one = take(b, i, i + 1)
        out = one.call(model)
        terms = fisher_terms(out, one, kind, loss_fn, lm)
        for j, t in enumerate(terms):
            grads = torch.autograd.grad(t.sum(), tensors, retain_graph=j < len(terms) - 1, allow_unused=True)
            for (n, _), gr in zip(params, grads):
                if gr is None:
                    continue
                a = acc[n]  # on the parameter's device, or off it (scores_device / scores_file)
                if gr.is_sparse:  # an Embedding with sparse=True: only the rows of this sample's ids
                    gr = gr.coalesce()  # repeated ids summed first: the sample's gradient row, then squared
                    rows = gr.values().to(a.dtype)
                    a.index_add_(0, gr.indices()[0].to(a.device), (rows * rows).to(a.device))
                elif a.device == gr.device:
                    gr = gr.to(a.dtype)
                    a.addcmul_(gr, gr)  # in place: no squared copy of the gradient
                else:
                    a.add_(gr.to(a.dtype).square().to(a.device))


@contextlib.contextmanager
def _sparse_embedding_grads(model: nn.Module, params):
    """The trainable nn.Embedding weights get sparse gradients (the rows of the sample's ids) for the
    duration: the per-sample reference then never allocates, fills and squares a dense V x d
    gradient per sample (BERT's word embeddings are half of MiniLM's parameters). A weight also used
    elsewhere (tied) still gets its whole gradient: autograd sums the sparse and dense parts."""
    trained = {id(p) for _, p in params}
    switched = [m for m in model.modules()
                if isinstance(m, nn.Embedding) and not m.sparse and not m.scale_grad_by_freq  # (no sparse form)
                and id(m.weight) in trained]
    for m in switched:
        m.sparse = True
    try:
        yield
    finally:
        for m in switched:
            m.sparse = False


# ------------------------------------------------------------------------------- batched path
class _Call:
    """One call of a hooked module during a forward: its input, and the output gradients received."""

    __slots__ = ("module", "name", "rule", "args", "kwargs", "versions", "outs", "grads", "lengths", "hooks")

    def __init__(self, module, name, rule, args, kwargs, lengths):
        self.module, self.name, self.rule = module, name, rule
        self.args, self.kwargs, self.lengths = args, kwargs, lengths
        leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        self.versions = [(t, t._version) for t in leaves]
        self.outs: list[Tensor] = []
        self.grads: list[Tensor | None] = []
        self.hooks: list = []  # handles of the gradient hooks on self.outs

    def release(self) -> None:
        """Drop the hooks and every tensor. Each output tensor holds (in C++, invisible to Python's
        garbage collector) a hook whose closure holds this record, which holds the output again:
        left alone, that cycle keeps every batch's activations, inputs and the engine (with its
        accumulators) alive after estimate_fisher returns."""
        for h in self.hooks:
            h.remove()
        self.hooks, self.outs, self.grads, self.versions = [], [], [], []
        self.args, self.kwargs, self.lengths = (), {}, None

    def check_unmodified(self):
        for t, v in self.versions:
            if t._version != v:
                raise RuntimeError(
                    f"fishkern Fisher: the input of '{self.name}' was modified in place after its forward; "
                    "the batched estimate needs it intact (use implementation='loop' for this model)"
                )


class _Engine:
    def __init__(self, model: nn.Module, params, acc, linear_kernel: str, chunk_elems: int):
        self.model = model
        self.acc = acc
        self.staged = _needs_staging(params, acc)
        self.ctx = {dt: Context(dt, linear_kernel, chunk_elems) for dt in (torch.float32, torch.float64)}
        self.active = False
        self.batch_size = 0
        self.lengths_for: tuple[tuple[int, int], Tensor] | None = None
        self.calls: list[_Call] = []
        self.leaves: list[Tensor] = []
        self.use_lengths = True
        self.generic: list[str] = []
        trainable = {id(p) for _, p in params}
        name_of = {id(p): n for n, p in params}
        self.owned: dict[nn.Module, tuple[str, Rule, dict[str, str]]] = {}
        for mname, m in model.named_modules():
            own = {pn: name_of[id(p)] for pn, p in m.named_parameters(recurse=False) if id(p) in trainable}
            if not own:
                continue
            try:
                rule = rule_for(m, mname or type(m).__name__)
            except _Unsupported as e:
                raise _UseLoop(str(e)) from None
            if isinstance(rule, GenericRule):
                self.generic.append(mname)
            self.owned[m] = (mname, rule, own)
        self.pairs = self._tie(model)
        self.handles = [m.register_forward_hook(self._on_forward, with_kwargs=True) for m in self.owned]

    def _tie(self, model: nn.Module) -> list[TiedPair]:
        """Parameters used by more than one module: an input embedding tied to a Linear head is done
        exactly (fisher/tied.py); any other sharing goes to the per-sample loop."""
        users: dict[str, list[tuple[str, nn.Module, str]]] = {}
        for mname, m in model.named_modules(remove_duplicate=False):
            if m not in self.owned:
                continue
            for pn, full in self.owned[m][2].items():
                users.setdefault(full, []).append((mname, m, pn))
        pairs = []
        for full, use in users.items():
            if len(use) == 1:
                continue
            kinds = {type(self.owned[m][1]): (m, pn) for _, m, pn in use}
            emb, head = kinds.get(EmbeddingRule), kinds.get(LinearRule)
            if len(use) != 2 or emb is None or head is None or emb[1] != "weight" or head[1] != "weight":
                raise _UseLoop(f"parameter '{full}' is shared by modules {[u[0] for u in use]} (tied weights)")
            pair = TiedPair(full, emb[0], head[0])
            (ename, erule, eown), (hname, _, hown) = self.owned[emb[0]], self.owned[head[0]]
            self.owned[emb[0]] = (ename, TiedEmbeddingRule(erule, pair), eown)
            self.owned[head[0]] = (hname, TiedHeadRule(pair), hown)
            pairs.append(pair)
        return pairs

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    # forward: keep the input, make the output a differentiable node, hook its gradient
    def _on_forward(self, module, args, kwargs, output):
        if not self.active:
            return None
        name, rule, own = self.owned[module]
        if any(c.module is module for c in self.calls):
            raise _UseLoop(f"module '{name}' is called more than once per forward")
        x = args[0] if args else next(iter(kwargs.values()), None)
        B = self.batch_size
        expanded = False
        if (
            isinstance(rule, EmbeddingRule) and isinstance(x, Tensor) and isinstance(output, Tensor)
            and x.dim() > 0 and x.shape[0] == 1 and output.shape[0] == 1 and B > 1
        ):
            # ids shared by the batch (BERT's position ids, shape (1, T)): the output is broadcast
            # over the samples downstream; expanding it here gives each sample its own gradient
            x = x.expand(B, *x.shape[1:])
            args, output, expanded = (x,) + tuple(args[1:]), output.expand(B, *output.shape[1:]), True
        if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[0] != B):
            raise _UseLoop(
                f"module '{name}' sees an input of shape {tuple(x.shape)} whose first dimension is not "
                f"the batch's {self.batch_size} samples"
            )
        if isinstance(rule, TiedEmbeddingRule):
            rule.pair.ids = x.detach()
        lengths = None
        if self.lengths_for is not None and isinstance(x, Tensor) and x.dim() >= 2:
            if tuple(x.shape[:2]) == self.lengths_for[0]:
                lengths = self.lengths_for[1]
        call = _Call(module, name, rule, _detach(args), _detach(kwargs), lengths)
        self.calls.append(call)
        leaves, spec = torch.utils._pytree.tree_flatten(output)
        changed = expanded
        for i, t in enumerate(leaves):
            if not (isinstance(t, Tensor) and t.is_floating_point()):
                continue
            if isinstance(rule, GenericRule) and (t.dim() == 0 or t.shape[0] != B):
                raise _UseLoop(f"module '{name}' returns a tensor of shape {tuple(t.shape)} whose first dimension is not the samples")
            if not t.requires_grad:
                # nothing upstream requires grad (parameters are frozen): start the graph here, at a
                # leaf; the clone keeps the leaf safe from in-place ops downstream
                leaf = t.detach().requires_grad_()
                self.leaves.append(leaf)
                t = leaf.clone()
                leaves[i], changed = t, True
            slot = len(call.outs)
            call.outs.append(t)
            call.grads.append(None)
            call.hooks.append(t.register_hook(lambda g, call=call, slot=slot: self._on_grad(call, slot, g)))
        if not call.outs:
            raise _UseLoop(f"module '{name}' returns no floating-point tensor")
        return torch.utils._pytree.tree_unflatten(leaves, spec) if changed else None

    def _on_grad(self, call: _Call, slot: int, g: Tensor):
        if call.rule.exact_batched:
            call.check_unmodified()
            with torch.no_grad():
                self._into_acc(call, lambda acc, ctx: call.rule.accumulate(
                    call.module, call.args, call.kwargs, g, call.lengths, acc, ctx))
        else:
            call.grads[slot] = g if call.grads[slot] is None else call.grads[slot] + g

    def _acc_of(self, call: _Call) -> dict[str, Tensor]:
        own = self.owned[call.module][2]
        return {pn: self.acc[full] for pn, full in own.items()}

    def _into_acc(self, call: _Call, run) -> None:
        """run(acc, ctx) adds this call's Σₙ Gₙ² into its parameters' accumulators. Scores kept off
        the parameters' device (``scores_device`` / ``scores_file``) are reached through a scratch
        accumulator on that device, one module's parameters at a time, added in and dropped: the
        pass holds at most one layer's scores on the GPU."""
        acc = self._acc_of(call)
        ctx = self.ctx[next(iter(acc.values())).dtype]
        if not self.staged:
            run(acc, ctx)
            return
        scratch = {pn: torch.zeros(a.shape, dtype=a.dtype, device=getattr(call.module, pn).device)
                   for pn, a in acc.items()}
        run(scratch, ctx)
        for pn, a in acc.items():
            a.add_(scratch[pn].to(a.device))

    def _finish_generic(self):
        for call in self.calls:
            if call.rule.exact_batched or all(g is None for g in call.grads):
                call.grads = [None] * len(call.grads)
                continue
            call.check_unmodified()
            self.active = False  # the functional re-run must not be captured
            with torch.no_grad():
                self._into_acc(call, lambda acc, ctx: call.rule.accumulate_multi(
                    call.module, call.args, call.kwargs, call.grads, call.outs, self.batch_size, acc, ctx))
            call.grads = [None] * len(call.grads)

    def run_batch(self, b: Batch, kind, loss_fn, use_lengths: bool | None = None, lm: CausalLM | None = None):
        self.calls, self.leaves, self.batch_size = [], [], b.size
        mask = b.attention_mask
        self.lengths_for = None
        if (self.use_lengths if use_lengths is None else use_lengths) and mask is not None and mask.shape[0] == b.size:
            lengths = right_padded_lengths(mask)
            if lengths is not None:
                self.lengths_for = (tuple(mask.shape), lengths)
        try:
            self.active = True
            try:
                out = b.call(self.model)
            finally:
                self.active = False
            for call in self.calls:  # before any backward, so that nothing is accumulated yet
                try:
                    call.check_unmodified()
                except RuntimeError as e:
                    raise _UseLoop(f"the input of '{call.name}' is modified in place after its forward") from e
            terms = fisher_terms(out, b, kind, loss_fn, lm)
            # Every graph path starts at a leaf made in _on_forward (parameters are frozen): asking for
            # the leaves' gradients runs the whole backward, so every output hook fires, also on outputs
            # modified in place later. No parameter gradient is computed or stored.
            starts = self.leaves or [t for c in self.calls for t in c.outs if t.requires_grad]
            for j, term in enumerate(terms):
                if not term.requires_grad:
                    raise RuntimeError(
                        "fishkern Fisher: the loss does not depend on any trainable parameter's module"
                    )
                for pair in self.pairs:
                    pair.forget()
                torch.autograd.grad(term.sum(), starts, retain_graph=j < len(terms) - 1, allow_unused=True)
                self._finish_generic()
        finally:
            # also on error, the forward's included (a refusal in _on_forward): break the hook cycles
            # (see _Call.release)
            for call in self.calls:
                call.release()
            for pair in self.pairs:
                pair.release()
            self.calls, self.leaves, self.lengths_for = [], [], None


def _detach(obj):
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, obj)


# -------------------------------------------------------------------------------- self-check
# Two samples: the fewest that can show samples mixing across the batch dimension, and the two most
# padded ones of the first batch (kept at the batch's length, so padded tokens are exercised).
_CHECK_SAMPLES = 2
_CHECK_RTOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
# model -> {structure key: use_lengths that passed}: a model is checked once per process for each
# structure it is estimated with (its modules, trainable parameters, device, Fisher kind, loss and
# batch layout). Per model instance, not per class: two instances of one class may behave
# differently (a config flag read in forward), and only running the check can tell.
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, bool]]" = weakref.WeakKeyDictionary()


def clear_self_check_cache() -> None:
    """Forget which models passed the self-check (the next estimate of each checks again)."""
    _CHECKED.clear()


def _structure_key(model: nn.Module, params, b: Batch, kind, loss_fn, lm: CausalLM | None = None) -> tuple:
    modules = tuple((n, type(m)) for n, m in model.named_modules())
    trainable = tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in params)
    if isinstance(b.inputs, Mapping):
        layout = tuple(sorted((k, isinstance(v, Tensor) and v.dim()) for k, v in b.inputs.items()))
    else:
        layout = (type(b.inputs),)
    return modules, trainable, kind, loss_fn, lm is not None, layout, b.attention_mask is not None


def _max_abs(tensors: list[Tensor]) -> Tensor:
    """max |t| of each tensor, float64 (one read of each: aminmax is ~4x faster on CPU than
    abs().max() or an inf-norm, which write or reduce in two passes)."""
    lo_hi = [torch.aminmax(t) for t in tensors]
    return torch.stack([torch.maximum(hi, -lo).to(torch.float64) for lo, hi in lo_hi])


def _disagreement(got, ref, params) -> str | None:
    """The first parameter whose batched scores differ from the loop's beyond the dtype's tolerance,
    with the difference; one device sync for all of them. ``got`` (the check's scores, zeroed after
    the check) is overwritten with got - ref: no temporaries."""
    names = [n for n, _ in params if ref[n].numel()]
    if not names:
        return None
    diffs, refs = [got[n] for n in names], [ref[n] for n in names]
    torch._foreach_sub_(diffs, refs)
    errs, peaks = _max_abs(diffs), _max_abs(refs)
    scale = torch.maximum(peaks, 1e-6 * peaks.max()).clamp_min(1e-30)
    rel = (errs / scale).tolist()
    dtypes = dict(params)
    for n, err in zip(names, rel):
        if not err <= _CHECK_RTOL.get(dtypes[n].dtype, 1e-3):
            return f"'{n}' (relative difference {err:.2g})"
    return None


def _reference_scores(model, params, like, b: Batch, kind, loss_fn, lm: CausalLM | None = None) -> dict[str, Tensor]:
    """The per-sample loop's scores on the batch ``b``, in fresh accumulators shaped as ``like``."""
    ref = {k: torch.zeros_like(v) for k, v in like.items()}
    for _, p in params:
        p.requires_grad_(True)
    try:
        with _sparse_embedding_grads(model, params):
            _loop_batch(model, params, ref, b, kind, loss_fn, lm)
    finally:
        for _, p in params:
            p.requires_grad_(False)
    return ref


def _self_check(engine: "_Engine", model, params, b: Batch, kind, loss_fn, lm: CausalLM | None = None) -> None:
    """Before the first batch counts: the batched rules against the per-sample loop on two samples
    (the most padded ones). Catches models that break the batched path's assumptions — dim 0 not
    the samples, padded tokens that do matter, parameters used outside their module's forward —
    and falls back (to no padding skip, or to the loop) instead of returning wrong scores. Skipped
    for a model already checked with this structure in this process (``_CHECKED``).

    The checked samples' batched scores are run into the real accumulators (still zero: this is the
    first batch), compared, and zeroed again: no second full-model accumulator is allocated. The
    reference loop gives nn.Embedding weights sparse gradients (``_sparse_embedding_grads``)."""
    key = _structure_key(model, params, b, kind, loss_fn, lm)
    try:
        hash(key)
    except TypeError:  # an unhashable loss_fn: check every time
        key = None
    passed = _CHECKED.get(model, {})
    if key is not None and key in passed:
        engine.use_lengths = passed[key]
        return
    mask = b.attention_mask
    lengths = right_padded_lengths(mask) if mask is not None and mask.shape[0] == b.size else None
    n = min(_CHECK_SAMPLES, b.size)
    order = torch.argsort(lengths.cpu(), stable=True) if lengths is not None else torch.arange(b.size)
    idx = order[:n]
    sub = select(b, idx)
    ref = None
    got = list(engine.acc.values())
    for attempt, use_lengths in enumerate((True, False) if lengths is not None else (True,)):
        if attempt:  # the comparison left got - ref in the accumulators
            torch._foreach_zero_(got)
        engine.run_batch(sub, kind, loss_fn, use_lengths=use_lengths, lm=lm)
        if ref is None:  # after the batched run: a causal LM's sampled targets (kind='true') are drawn there
            ref = _reference_scores(model, params, engine.acc, sub, kind, loss_fn, lm)
        bad = _disagreement(engine.acc, ref, params)
        if bad is None:
            engine.use_lengths = use_lengths
            # A verdict on skipping padding holds only if the samples had padding to skip.
            saw_padding = lengths is None or bool((lengths[idx.to(lengths.device)] < mask.shape[1]).any())
            if key is not None and saw_padding:
                _CHECKED.setdefault(model, {})[key] = use_lengths
            # Back to zero, and the whole batch is run as without the check: the scores do not depend
            # on whether this process had checked the model before (bit for bit).
            torch._foreach_zero_(got)
            return
    raise _UseLoop(f"the batched estimate disagrees with the per-sample loop on the first samples at {bad}")


# ------------------------------------------------------------------------------------ driver
def _is_int(x) -> bool:
    return not isinstance(x, bool) and hasattr(x, "__index__")


def _check_arguments(model, data, num_samples, kind, loss_fn, implementation, seed, chunk_elems) -> None:
    """Everything checkable without running the model, before any work."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(data, (str, bytes)) or not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise TypeError(f"data must be an iterable of batches (e.g. a DataLoader), got {type(data).__name__}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    check_kind(kind, loss_fn)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (model output, batch) -> per-sample losses, got {type(loss_fn).__name__}")
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not _is_int(chunk_elems) or chunk_elems < 1:
        raise ValueError(f"chunk_elems must be a positive integer, got {chunk_elems!r}")


def estimate_fisher(
    model: nn.Module,
    data: Iterable,
    num_samples: int,
    *,
    kind: str = "empirical",
    loss_fn: Callable | None = None,
    implementation: str = "auto",
    seed: int | None = 0,
    progress: bool = True,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    self_check: bool = True,
    causal_lm: bool | None = None,
    lm_samples: int = 1,
    scores_device: str | torch.device | None = None,
    scores_file: str | os.PathLike | None = None,
) -> FisherResult:
    """Diagonal Fisher scores of every trainable parameter over the first `num_samples` samples.

    model: any nn.Module; its parameters with requires_grad=True get scores.
    data: an iterable of batches: Hugging Face-style dicts with "labels" (the model is called with
        the other entries as keyword arguments) or (inputs, targets) pairs. Batches are moved to the
        model's device. The estimate stops after exactly `num_samples` samples, cutting the last
        batch; if the data run out first, it warns and uses what there was.
    kind: "empirical" (true labels; the paper's default) or "true" (exact expectation over the
        model's classes, weighted by p(y|x); for a one-output regression head, unit-variance Gaussian).
        Regression heads (one output, float labels) use the squared error of the sample, as the
        original code. The loss of every sample is its own: batch size does not change the result.
    loss_fn: custom per-sample loss, loss_fn(model_output, batch) → tensor of shape (batch_size,).
    implementation: "auto" (batched; sequence Linears through the op fishkern::linear_fisher_acc_,
        whose Triton kernel runs on CUDA when triton is usable, its PyTorch kernel otherwise),
        "torch" (batched, plain PyTorch on every device: the op's default kernel called directly),
        "triton" (batched, the Triton kernel called directly, also on CPU under TRITON_INTERPRET=1,
        for tests; an error where it cannot run), "loop" (the batch-size-1 reference loop).
        Models the batched path cannot treat exactly (tied weights, a module called twice per
        forward, BatchNorm without running statistics, modules that fold the batch dimension,
        anything the first-batch self-check catches) fall back to the loop with a warning.
    seed: the RNG is seeded inside a forked RNG state (the caller's RNG is untouched); None: unseeded.
    progress: a progress bar on stderr (tqdm on a terminal, plain lines when stderr is redirected);
        False: silent.
    chunk_elems: bound on per-sample entries alive at once in the PyTorch rules.
    self_check: before the first batch counts, compare the batched rules with the per-sample loop on
        two samples (the most padded ones); on disagreement retry without skipping padded tokens,
        then fall back to the loop, with a warning. Costs two per-sample passes and one batched pass
        of two samples, once per model and structure per process (a later estimate of the same
        model with the same modules, parameters, kind, loss and batch layout reuses the verdict;
        ``fishkern.fisher.clear_self_check_cache()`` forgets it).
    causal_lm: the model is a causal language model: one loss per sequence, the sum of −log p over
        its next-token targets (labels shifted by one, -100 and attention-masked positions excluded;
        labels default to the input ids). None (the default): True for Hugging Face causal-LM classes
        (``*ForCausalLM``, ``*LMHeadModel``), False otherwise. Not with a custom loss_fn.
    lm_samples: for kind='true' on a causal LM, the targets drawn from the model's own distribution
        per token (teacher forcing; seeded by ``seed``); the score is the mean over the draws.
    scores_device: where the scores live; None: with each parameter. ``"cpu"`` for CUDA parameters
        keeps them in pinned host memory (8B parameters are 32 GB of fp32 scores): each layer's
        Σₙ Gₙ² is formed in a scratch buffer on the GPU as backward reaches it and added in, so the
        pass needs at most one layer's scores on the GPU beyond the model's own memory (one
        device-to-host copy, synchronous, per layer and batch).
    scores_file: a path that must not exist: the scores are a memory-mapped float32 file there
        (created, zero-filled; on the CPU as ``scores_device="cpu"``), for scores larger than host
        memory. The returned tensors are views of the file; it stays on disk after the call.

    The model is in eval mode during the estimate and restored afterwards; parameters' `.grad` and
    `requires_grad` are left as they were, and no hook or reference to the model, its inputs or its
    activations outlives the call (also on error). Scores are fp32 (fp64 for fp64 parameters).
    """
    _check_arguments(model, data, num_samples, kind, loss_fn, implementation, seed, chunk_elems)
    if causal_lm is not None and not isinstance(causal_lm, bool):
        raise TypeError(f"causal_lm must be True, False or None, got {causal_lm!r}")
    if causal_lm and loss_fn is not None:
        raise ValueError("causal_lm=True sets the loss; it cannot be combined with a custom loss_fn")
    lm = None
    if loss_fn is None and (is_causal_lm(model) if causal_lm is None else causal_lm):
        # kind='true' draws targets, seeded by `seed`; seed=None takes one seed from the caller's RNG
        # (only then: the empirical Fisher leaves the caller's RNG as it was)
        draw_seed = seed if seed is not None or kind != "true" else int(torch.randint(1 << 62, ()).item())
        lm = CausalLM(lm_samples, seed=draw_seed or 0)
    params = _trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    device = params[0][1].device
    acc = _allocate_scores(params, scores_device, scores_file)
    # implementation -> how the sequence-Linear rule runs fishkern::linear_fisher_acc_ (rules.Context)
    # and what FisherResult.implementation reports.
    from ..ops.triton_support import triton_usable_on

    linear_kernel = {"auto": "op", "torch": "default", "triton": "triton", "loop": "default"}[implementation]
    if implementation == "triton" and not triton_usable_on(device):
        raise RuntimeError(
            f"implementation='triton' needs triton and CUDA parameters (or TRITON_INTERPRET=1 on CPU); "
            f"parameters are on {device}"
        )
    if implementation == "loop":
        ran = "loop"
    elif implementation == "triton" or (
            implementation == "auto" and device.type == "cuda" and triton_usable_on(device)):
        ran = "triton"  # "auto": the op dispatches CUDA tensors to its Triton kernel
    else:
        ran = "torch"
    fallback = None
    engine = None
    need_labels = kind == "empirical" and loss_fn is None and lm is None  # an LM's targets default to its inputs
    from .._progress import progress_bar

    t0 = time.perf_counter()
    count = 0
    checked = False
    bar = progress_bar(total=num_samples, desc="Fisher", unit="sample", enabled=bool(progress))
    try:
        with _fisher_mode(model, seed):
            if ran != "loop":
                try:
                    engine = _Engine(model, params, acc, linear_kernel, chunk_elems)
                except _UseLoop as e:
                    ran, fallback = "loop", str(e)
                    _warn_fallback(fallback)
            for p in model.parameters():
                p.requires_grad_(False)
            if ran == "loop":
                for _, p in params:
                    p.requires_grad_(True)
            for raw in data:
                b = parse_batch(raw, device, need_labels=need_labels)
                b.first = count
                if b.size == 0:
                    continue
                if count + b.size > num_samples:
                    b = truncate(b, num_samples - count)
                if ran != "loop":
                    try:
                        if self_check and not checked:
                            _self_check(engine, model, params, b, kind, loss_fn, lm)
                            checked = True
                        engine.run_batch(b, kind, loss_fn, lm=lm)
                    except _UseLoop as e:
                        ran, fallback = "loop", str(e)
                        _warn_fallback(fallback)
                        if count == 0:  # a failed self-check leaves its samples' scores in: start from zero
                            torch._foreach_zero_(list(acc.values()))
                        engine.close()
                        engine = None
                        for _, p in params:
                            p.requires_grad_(True)
                if ran == "loop":
                    _loop_batch(model, params, acc, b, kind, loss_fn, lm)
                count += b.size
                bar.update(b.size)
                if count >= num_samples:
                    break
    finally:
        bar.close()
        if engine is not None:
            engine.close()
    if count == 0:
        raise ValueError("the data yielded no samples")
    if count < num_samples:
        warnings.warn(f"fishkern Fisher: the data held {count} samples, fewer than num_samples={num_samples}; used {count}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return FisherResult(
        scores=acc,
        num_samples=count,
        kind=kind,
        implementation=ran,
        seconds=time.perf_counter() - t0,
        fallback_reason=fallback,
        generic_modules=list(engine.generic) if engine is not None else [],
    )


def _needs_staging(params, acc) -> bool:
    """Whether some scores live off their parameter's device (reached through a scratch buffer)."""
    return any(a.device != p.device for (_, p), a in zip(params, acc.values()))


def _allocate_scores(params, scores_device, scores_file) -> dict[str, Tensor]:
    """Zeroed accumulators: with each parameter, on ``scores_device`` (pinned when that is the CPU
    and parameters are on CUDA), or as views of a new memory-mapped float32 file."""
    if scores_file is None and scores_device is None:
        return {n: torch.zeros(p.shape, dtype=_acc_dtype(p), device=p.device) for n, p in params}
    try:
        target = torch.device(scores_device) if scores_device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"scores_device must name a device ('cpu', 'cuda:0', …), got {scores_device!r}") from e
    if scores_file is not None and target.type != "cpu":
        raise ValueError(f"scores_file keeps the scores in host memory; scores_device={scores_device!r} contradicts it")
    dtypes = {_acc_dtype(p) for _, p in params}
    total = sum(p.numel() for _, p in params)
    if scores_file is not None:
        if dtypes != {torch.float32}:
            raise ValueError("scores_file holds float32 scores; float64 parameters need scores_file=None")
        path = os.fspath(scores_file)
        if os.path.exists(path):
            raise FileExistsError(f"scores_file {path!r} exists; fishkern never overwrites a file: remove it or pick another")
        flat = torch.from_file(path, shared=True, size=total, dtype=torch.float32)  # created zero-filled
        views, offset = {}, 0
        for n, p in params:
            views[n] = flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
        return views
    pin = target.type == "cpu" and any(p.device.type == "cuda" for _, p in params)
    return {n: torch.zeros(p.shape, dtype=_acc_dtype(p), device=target, pin_memory=pin) for n, p in params}


def _warn_fallback(reason: str) -> None:
    warnings.warn(f"fishkern Fisher: using the per-sample loop because {reason}", stacklevel=3)


def fisher_scores(model: nn.Module, data: Iterable, num_samples: int, **kwargs) -> dict[str, Tensor]:
    """{parameter name: Fisher score tensor} — `estimate_fisher(...).scores`; same arguments."""
    return estimate_fisher(model, data, num_samples, **kwargs).scores


def fisher_reference(model: nn.Module, data: Iterable, num_samples: int, **kwargs) -> dict[str, Tensor]:
    """The original algorithm (batch size 1, one backward per sample): the oracle for tests."""
    return estimate_fisher(model, data, num_samples, implementation="loop", **kwargs).scores
