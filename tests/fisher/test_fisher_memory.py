"""estimate_fisher leaves nothing behind: no hook, no per-call record, no activation, no reference to
the model once it returns (also on error and on the fallback to the loop), so repeated calls do not
grow the process.

Regression: each hooked output kept a gradient hook whose closure held the estimator's record of the
call, which held the output again — a cycle through autograd's C++ hook list that Python's garbage
collector cannot see. Every call leaked its batches' activations, the inputs, the engine with its
accumulators and the model (≈ 385 MB per call on MiniLM, N=256).
"""
import gc
import weakref

import pytest
import torch
import torch.nn as nn

from fishkern.fisher import estimate_fisher
from fishkern.fisher import estimator as est


class TinySeq(nn.Module):
    """Token model: embedding, a Linear over the sequence, a non-parameter module, a head."""

    def __init__(self, vocab=20, d=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)
        self.act = nn.Tanh()
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask):
        h = self.act(self.lin(self.emb(input_ids)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class TwiceCalled(TinySeq):
    """Calls `lin` twice per forward: the batched path refuses it and falls back to the loop."""

    def forward(self, input_ids, attention_mask):
        h = self.lin(self.act(self.lin(self.emb(input_ids))))
        return self.head(h.mean(1))


def batches(n=12, batch=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[s:s + batch] * mask[s:s + batch], "attention_mask": mask[s:s + batch],
             "labels": labels[s:s + batch]} for s in range(0, n, batch)]


def model(cls=TinySeq):
    torch.manual_seed(0)
    return cls()


def live_tensors() -> int:
    gc.collect()
    # type() rather than isinstance(): some tracked objects warn or fail on __class__ lookups
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def live_records() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in (est._Call, est._Engine))


def module_hooks(m: nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
    return sum(len(getattr(sub, n, None) or {}) for sub in m.modules() for n in names)


def test_repeated_calls_keep_no_tensor_alive():
    net, data = model(), batches()
    estimate_fisher(net, data, 12, progress=False)  # first call: lazy initialisations, if any
    base = live_tensors()
    for _ in range(3):
        res = estimate_fisher(net, data, 12, progress=False)
        assert res.implementation == "torch"
        del res
        assert live_records() == 0
        assert live_tensors() == base


def test_activations_and_model_are_freed_after_the_call():
    net, data = model(), batches()
    seen = []  # weak references to what the estimator hooks: the outputs of `lin`, as `act` receives them
    net.act.register_forward_pre_hook(lambda mod, args: seen.append(weakref.ref(args[0])))
    scores = estimate_fisher(net, data, 12, progress=False).scores
    assert seen and all(r() is None for r in seen)
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None
    assert set(scores) == {"emb.weight", "lin.weight", "lin.bias", "head.weight", "head.bias"}


def test_no_hook_left_on_modules_or_tensors():
    net, data = model(), batches()
    before = module_hooks(net)
    kept = []  # strong references this time: the hooked outputs must carry no gradient hook afterwards
    net.act.register_forward_pre_hook(lambda mod, args: kept.append(args[0]))
    estimate_fisher(net, data, 12, progress=False)
    assert module_hooks(net) == before + 1  # only our own pre-hook
    assert kept and all(t.grad_fn is not None for t in kept)
    assert all(not (t._backward_hooks or {}) for t in kept)
    assert all(p._backward_hooks is None or not p._backward_hooks for p in net.parameters())


def test_error_inside_a_batch_leaves_nothing_alive():
    net, data = model(), batches()

    def loss_fn(out, batch):
        if out.shape[0] > 1:  # the loop's samples pass; the batched run fails after its forward
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, batch["labels"], reduction="none")

    with pytest.raises(RuntimeError, match="boom"):
        estimate_fisher(net, data, 12, loss_fn=loss_fn, progress=False)
    assert live_records() == 0
    assert module_hooks(net) == 0
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


def test_fallback_to_the_loop_leaves_nothing_alive():
    net, data = model(TwiceCalled), batches()
    with pytest.warns(UserWarning, match="called more than once"):
        res = estimate_fisher(net, data, 12, progress=False)
    assert res.implementation == "loop"
    del res
    assert live_records() == 0
    assert module_hooks(net) == 0
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal(capsys):
    net, data = model(), batches()
    estimate_fisher(net, data, 12, progress=False)
    assert capsys.readouterr().err == ""
    estimate_fisher(net, data, 12, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "Fisher: done 12/12 sample" in err
