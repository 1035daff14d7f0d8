"""The steady state's prepared launches (MaskedAdamW on the Triton path): the fused kernel's
arguments are bound once per run and only the per-step scalars are passed. These tests check that
this shortcut is taken, that it gives bit for bit what the op call gives, and that it is rebound
whenever something it bound changes (hyper-parameters, buffers, a tensor lr, the gradient buffer).
Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

from fishkern import MaskedAdamW
from fishkern.ops import masked_step
from fishkern.ops.triton_support import triton_usable_on

pytestmark = pytest.mark.skipif(not triton_usable_on(torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="triton is not usable here (needs CUDA or TRITON_INTERPRET=1)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(13, 7), (7,), (3, 5, 2), (11,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE, dtype)) for s in shapes]


def _masks(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, p in enumerate(params):
        k = 0 if i == 3 else max(1, p.numel() // 3)  # one tensor untrained
        out.append(torch.randperm(p.numel(), generator=g)[:k].sort().values.to(DEVICE))
    return out


def _grads(params, step):
    """A backward pass whose gradients are fresh random tensors (through the optimizer's hooks with
    free_dense_grads, as in training)."""
    g = torch.Generator().manual_seed(100 + step)
    loss = sum((p * torch.randn(p.shape, generator=g).to(p.device, p.dtype)).sum() for p in params)
    loss.backward()


def _pair(**kw):
    """Two optimizers on equal copies: `fast` with prepared launches, `ref` with every run taking the
    op call (its optimizer says it has none)."""
    a, b = _params(kw.pop("dtype", torch.float32)), None
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    masks = _masks(a)
    fast = MaskedAdamW(a, masks, implementation="triton", **kw)
    ref = MaskedAdamW(b, masks, implementation="triton", **kw)
    ref._prepared_key = lambda group: None
    return (a, fast), (b, ref)


def _step_both(pairs, step):
    for params, opt in pairs:
        _grads(params, step)
        opt.step()
        opt.zero_grad()


def _assert_same(pairs):
    (a, fast), (b, ref) = pairs
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    for name in fast._runtime[0].buffers:
        assert torch.equal(fast._runtime[0].buffers[name], ref._runtime[0].buffers[name]), name
    assert [fast.state[p]["step"].item() for p in a if p in fast.state] == \
        [ref.state[q]["step"].item() for q in b if q in ref.state]


def _count_op_calls(monkeypatch):
    calls = []
    real = masked_step.masked_adamw_step_eager

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    import fishkern.optim.adamw as adamw_mod

    monkeypatch.setattr(adamw_mod, "masked_adamw_step_eager", counted)
    return calls


@pytest.mark.parametrize("free", [True, False])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_prepared_launch_is_taken_and_equals_the_op_call(monkeypatch, free, amsgrad):
    pairs = _pair(lr=3e-2, weight_decay=0.1, amsgrad=amsgrad, free_dense_grads=free)
    calls = _count_op_calls(monkeypatch)
    for s in range(5):
        _step_both(pairs, s)
    _assert_same(pairs)
    fast, ref = pairs[0][1], pairs[1][1]
    assert fast._runtime[0].prepared and all(fast._runtime[0].prepared)
    # every op call was the reference optimizer's: one per step and run
    assert len(calls) == 5 * len(ref._runtime[0].full_runs)


def test_a_changed_hyper_parameter_or_lr_rebinds_and_stays_equal():
    pairs = _pair(lr=1e-2, weight_decay=0.05)
    fast = pairs[0][1]
    keys = []
    for s in range(8):
        for _, opt in pairs:
            g = opt.param_groups[0]
            if s == 2:
                g["lr"] = 5e-3  # a scheduler's change: per-step scalar, no rebind
            if s == 3:
                g["betas"] = (0.8, 0.99)
            if s == 4:
                g["weight_decay"] = 0.0  # a constexpr of the kernel changes
            if s == 5:
                g["eps"] = 1e-6
            if s == 6:
                g["maximize"] = True
        _step_both(pairs, s)
        keys.append(fast._runtime[0].prepared_key)
        _assert_same(pairs)
    assert keys[2] == keys[1], "an lr change must not rebind"
    assert len({k for k in keys}) == 5  # initial, betas, weight_decay, eps, maximize


def test_amsgrad_switched_on_mid_training_rebinds_to_the_new_buffer():
    pairs = _pair(lr=1e-2)
    for s in range(3):
        _step_both(pairs, s)
    for _, opt in pairs:
        opt.param_groups[0]["amsgrad"] = True
    for s in range(3, 6):
        _step_both(pairs, s)
    _assert_same(pairs)
    assert "max_exp_avg_sq" in pairs[0][1]._runtime[0].buffers


def test_a_loaded_state_dict_rebinds_to_the_loaded_buffers():
    pairs = _pair(lr=1e-2, free_dense_grads=True)
    for s in range(3):
        _step_both(pairs, s)
    (a, fast), (b, ref) = pairs
    saved = ref.state_dict()
    fast.load_state_dict(saved)
    for p, q in zip(a, b):
        with torch.no_grad():
            p.copy_(q)
    for s in range(3, 6):
        _step_both(pairs, s)
    _assert_same(pairs)


def test_a_tensor_lr_with_capturable_is_read_where_it_lives():
    lr_a, lr_b = torch.tensor(1e-2, device=DEVICE), torch.tensor(1e-2, device=DEVICE)
    (a, fast), (b, ref) = _pair(lr=lr_a, capturable=True)
    ref.param_groups[0]["lr"] = lr_b
    pairs = ((a, fast), (b, ref))
    for s in range(4):
        if s == 2:
            lr_a.fill_(2e-3)  # changed in place: read on the device, no rebind needed
            lr_b.fill_(2e-3)
        _step_both(pairs, s)
    _assert_same(pairs)
    key = fast._runtime[0].prepared_key
    fast.param_groups[0]["lr"] = torch.tensor(4e-3, device=DEVICE)  # a new tensor: rebound
    ref.param_groups[0]["lr"] = torch.tensor(4e-3, device=DEVICE)
    _step_both(pairs, 4)
    _assert_same(pairs)
    assert fast._runtime[0].prepared_key != key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_with_masters(dtype):
    pairs = _pair(lr=1e-2, dtype=dtype, master_weights=True)
    for s in range(4):
        _step_both(pairs, s)
    _assert_same(pairs)
    assert "master" in pairs[0][1]._runtime[0].buffers


def test_prepared_arguments_match_the_kernel_signature():
    """The bound argument list must have one entry per kernel argument (not constexpr) in order:
    a scalar slot shifted by one would still run, with wrong values."""
    from fishkern.ops import adamw_triton

    import inspect

    import triton.language as tl

    fn = adamw_triton._masked_adamw_kernel
    fn = getattr(fn, "fn", fn)  # the Python function behind the JIT / interpreter wrapper
    names = [n for n, prm in inspect.signature(fn).parameters.items()
             if prm.annotation is not tl.constexpr and prm.annotation not in ("tl.constexpr", "constexpr")]
    (a, fast), _ = _pair(lr=1e-2)
    _grads(a, 0)
    fast.step()
    launch = fast._runtime[0].prepared[0]
    prepared = launch.__closure__[[c.cell_contents.__class__.__name__ for c in launch.__closure__].index(
        "PreparedAdamW")].cell_contents
    assert len(prepared.args) == len(names)
    assert names[adamw_triton.PreparedAdamW._SCALARS] == [
        "decay", "one_minus_beta1", "beta2", "one_minus_beta2", "neg_step_size", "bias_correction2_sqrt", "eps"]
    assert names[adamw_triton.PreparedAdamW._LR] == "lr"
