"""The steady-state step's host shortcuts keep torch.optim's contract: step hooks and the profiler
range (torch's wrapper is skipped only when neither is there), LR schedulers, dispatch modes and
torch.compile see the op, and a clean check is reused only within the step that made it."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from fishkern import MaskedAdamW, MaskedSGD
from fishkern.ops import param_table as pt

CLASSES = [MaskedAdamW, MaskedSGD]


def _model_and_masks(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 7, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    masks = [torch.tensor([0, 3, 9, 34]), torch.tensor([1, 6])]
    return params, masks


def _backward(params, seed):
    g = torch.Generator().manual_seed(seed)
    loss = sum((p * torch.randn(p.shape, generator=g)).sum() ** 2 for p in params)
    loss.backward()


@pytest.mark.parametrize("cls", CLASSES)
def test_step_hooks_run_once_each_in_order(cls):
    params, masks = _model_and_masks()
    opt = cls(params, masks, lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    h1 = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("gpre", o)))
    h2 = register_optimizer_step_post_hook(lambda o, a, k: calls.append(("gpost", o)))
    try:
        for s in range(2):
            _backward(params, s)
            opt.step()
            opt.zero_grad()
    finally:
        h1.remove()
        h2.remove()
    assert calls == [("gpre", opt), ("pre", opt), ("post", opt), ("gpost", opt)] * 2


@pytest.mark.parametrize("cls", CLASSES)
def test_a_pre_hook_that_replaces_the_closure_is_honoured(cls):
    params, masks = _model_and_masks()
    opt = cls(params, masks, lr=1e-2)
    ran = []

    def closure():
        ran.append(True)
        _backward(params, 0)
        return torch.tensor(3.0)

    opt.register_step_pre_hook(lambda o, a, k: ((a[0],), {"closure": closure}))
    assert float(opt.step()) == 3.0 and ran == [True]


def test_the_profiler_sees_the_step_range():
    params, masks = _model_and_masks()
    opt = MaskedAdamW(params, masks, lr=1e-2)
    _backward(params, 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = {e.name for e in prof.events()}
    assert "Optimizer.step#MaskedAdamW.step" in names, sorted(names)[:20]


def test_without_hooks_torch_does_not_wrap_the_step():
    # the class step is ours (marked hooked), not torch's profile_hook_step wrapper
    assert MaskedAdamW.step.__qualname__ == "MaskedOptimizer.step" and MaskedAdamW.step.hooked


def test_a_subclass_overriding_step_gets_the_hooks_once():
    class Logged(MaskedAdamW):
        def step(self, closure=None):
            self.seen = getattr(self, "seen", 0) + 1
            return super().step(closure)

    params, masks = _model_and_masks()
    opt = Logged(params, masks, lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    _backward(params, 0)
    opt.step()
    assert calls == ["pre", "post"] and opt.seen == 1


@pytest.mark.parametrize("cls", CLASSES)
def test_lr_scheduler_sees_the_step(cls):
    params, masks = _model_and_masks()
    opt = cls(params, masks, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would be raised
        for s in range(3):
            _backward(params, s)
            opt.step()
            sched.step()
            opt.zero_grad()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls,op", [(MaskedAdamW, "fishkern.masked_adamw_step_.default"),
                                    (MaskedSGD, "fishkern.masked_sgd_step_.default")])
def test_under_a_dispatch_mode_the_step_goes_through_the_op(cls, op):
    params, masks = _model_and_masks()
    ref_params, _ = _model_and_masks()
    kw = {"lr": 1e-2} if cls is MaskedAdamW else {"lr": 1e-2, "momentum": 0.9}
    opt, ref = cls(params, masks, **kw), cls(ref_params, masks, **kw)
    for s in range(3):
        _backward(params, s)
        _backward(ref_params, s)
        mode = _OpNames()
        with mode:
            opt.step()
        ref.step()  # eager: the kernel is called directly
        assert mode.names.count(op) == 1, mode.names
        opt.zero_grad()
        ref.zero_grad()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # both ways run the same kernel


def test_a_clean_check_is_reused_only_within_its_step():
    params, masks = _model_and_masks()
    opt = MaskedAdamW(params, masks, lr=1e-2)
    table = opt._runtime[0].table
    _backward(params, 0)
    opt.step()
    assert not table.take_clean(pt.DENSE), "a remembered check outlived its step"
    # a check made by anyone else (clip_grad_norm_, a direct op call) is never taken as the step's
    _backward(params, 1)
    assert not table.check(pt.DENSE) & pt.NEEDS_SLOW_PATH
    assert not table.take_clean(pt.DENSE)
    assert not table.check(pt.DENSE, remember=True) & pt.NEEDS_SLOW_PATH and table.take_clean(pt.DENSE)
    table.forget_clean()
    assert not table.take_clean(pt.DENSE)


def test_a_failing_step_forgets_its_check():
    params, masks = _model_and_masks()
    opt = MaskedAdamW(params, masks, lr=1e-2)
    _backward(params, 0)
    opt.step()
    _backward(params, 1)
    rt = opt._runtime[0]

    def boom(*a, **k):
        raise RuntimeError("boom")

    opt._call_op = boom
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert not rt.table.take_clean(pt.DENSE)


def test_grad_mode_is_restored_also_after_an_error():
    params, masks = _model_and_masks()
    opt = MaskedAdamW(params, masks, lr=1e-2)
    _backward(params, 0)
    opt._call_op = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        opt.step()
    assert torch.is_grad_enabled()
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            opt.step()
        assert not torch.is_grad_enabled()


@pytest.mark.parametrize("free", [True, False])
def test_a_refusal_in_a_later_group_leaves_the_earlier_groups_untouched(free):
    params, masks = _model_and_masks()
    extra = torch.nn.Parameter(torch.randn(4))
    opt = MaskedAdamW([{"params": params, "mask_indices": masks},
                       {"params": [extra], "mask_indices": [torch.tensor([0, 2])]}], lr=1e-2, free_dense_grads=free)
    for s in range(2):  # into the steady state
        _backward(params + [extra], s)
        opt.step()
        opt.zero_grad()
    _backward(params, 5)
    before = [p.detach().clone() for p in params]
    versions = [p._version for p in params]
    grads = [p.grad for p in params]
    extra.grad = torch.ones(4).to_sparse()  # group 1 refuses sparse gradients
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    assert all(p._version == v for p, v in zip(params, versions)), "group 0 was committed before group 1 refused"
    assert all(p.grad is g for p, g in zip(params, grads)), "group 0 lost its gradients"
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    # the user fixes it and steps: the same result as an optimizer that never saw the refusal
    extra.grad = torch.ones(4)
    opt.step()
    assert not all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("free", [True, False])
def test_the_steady_step_bumps_versions_so_stale_graphs_raise(free):
    params, masks = _model_and_masks()
    opt = MaskedAdamW(params, masks, lr=1e-2, free_dense_grads=free)
    for s in range(3):
        _backward(params, s)
        opt.step()
        opt.zero_grad()
    saved = (params[0] * params[0]).sum()  # saves params[0] for backward
    _backward(params, 9)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
    if free:
        assert all(p.grad is None for p in params), "the gathered gradients are consumed by step()"
