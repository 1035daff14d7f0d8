"""Low-precision parameters, fp32 masters, memory layouts and the free_dense_grads option."""
import pytest
import torch

from fishkern import MaskedAdamW, MaskedSGD
from fishkern.optim import MaskedGrad
from tests._reference import SelectedModel, random_grads, random_masks, selected, unselected_mask
from tests.optim.test_masked_equivalence import make_params


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("master", [False, True])
def test_low_precision_params_follow_fp32_adamw(dtype, master):
    """bf16/fp16 parameters: the update is computed in fp32 from fp32 state.

    Without masters each step starts from the parameter's rounded values; with masters the fp32
    copy of the k entries carries the exact trajectory and the parameter holds its rounding.
    """
    params = make_params(dtype)
    before = [p.detach().clone() for p in params]
    masks = random_masks(params)
    ref = SelectedModel(params, masks, dtype=torch.float32)
    opt = MaskedAdamW(params, masks, lr=1e-2, weight_decay=0.1, master_weights=master)
    ref_opt = torch.optim.AdamW(ref.params, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(5):
        grads = random_grads(params, seed=step, dtype=dtype)
        for p, g in zip(params, grads):
            p.grad = g
        ref.set_grads(grads)
        if not master:  # the reference restarts from the rounded values, as the optimizer does
            for q, p, m in zip(ref.params, params, masks):
                q.data.copy_(selected(p, m).float())
        opt.step()
        ref_opt.step()
        for p, m, q in zip(params, masks, ref.params):
            assert torch.equal(selected(p, m), q.detach().to(dtype))
    for p, p0, m in zip(params, before, masks):
        keep = unselected_mask(p, m)
        assert torch.equal(p.detach().reshape(-1)[keep], p0.reshape(-1)[keep])
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert ("master" in opt.state[p]) == master
    k = sum(m.numel() for m in masks)
    assert opt.state_bytes() == (12 if master else 8) * k


def test_master_weights_keep_small_updates_that_bf16_rounds_away():
    p = torch.nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16))
    idx = torch.arange(0, 64, 2)
    plain = torch.nn.Parameter(p.detach().clone())
    opt = MaskedSGD([p], [idx], lr=1e-4, master_weights=True)
    opt_plain = MaskedSGD([plain], [idx], lr=1e-4)
    for _ in range(200):
        p.grad = torch.ones_like(p)
        plain.grad = torch.ones_like(plain)
        opt.step()
        opt_plain.step()
    # 200 steps of 1e-4 = 0.02: the master accumulates it, plain bf16 loses every single step
    assert torch.all(plain.detach()[idx] == 1.0)
    assert torch.allclose(p.detach()[idx].float(), torch.full((32,), 0.98), atol=4e-3)
    assert torch.allclose(opt.state[p]["master"], torch.full((32,), 0.98, dtype=torch.float32), atol=1e-5)


def test_mixed_dtypes_in_one_group_and_float64_rules():
    params = [
        torch.nn.Parameter(torch.randn(6, 5)),
        torch.nn.Parameter(torch.randn(9).bfloat16()),
        torch.nn.Parameter(torch.randn(4, 4)),
    ]
    masks = random_masks(params)
    opt = MaskedAdamW(params, masks, lr=0.1)
    for p, g in zip(params, random_grads(params, seed=1)):
        p.grad = g
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1 for p in params)
    with pytest.raises(TypeError, match="float64"):
        mixed = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64)), params[0]]
        MaskedAdamW(mixed, random_masks(mixed))
    with pytest.raises(TypeError, match="not supported"):
        MaskedAdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], [torch.tensor([0])])


def test_channels_last_and_transposed_parameters():
    """Flat indices are row-major whatever the memory layout."""
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    w = conv.weight
    assert not w.is_contiguous()
    t = torch.nn.Parameter(torch.randn(7, 5).t())  # non-contiguous, shape (5, 7)
    params = [w, t]
    masks = random_masks(params, density=0.4)
    ref = SelectedModel(params, masks)
    opt = MaskedAdamW(params, masks, lr=0.05, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.params, lr=0.05, weight_decay=0.1, foreach=False)
    before = [p.detach().clone() for p in params]
    for step in range(3):
        grads = random_grads(params, seed=step)
        # autograd gives channels_last grads for channels_last weights; also try a contiguous grad
        grads[0] = grads[0].contiguous(memory_format=torch.channels_last) if step % 2 else grads[0].contiguous()
        for p, g in zip(params, grads):
            p.grad = g
        ref.set_grads(grads)
        opt.step()
        ref_opt.step()
    for p, p0, m, q in zip(params, before, masks, ref.params):
        assert torch.equal(selected(p, m), q.detach())
        keep = unselected_mask(p, m)
        assert torch.equal(p.detach().reshape(-1)[keep], p0.reshape(-1)[keep])


def test_layout_change_after_construction_is_refused():
    conv = torch.nn.Conv2d(3, 4, 3)
    opt = MaskedAdamW(conv.parameters(), [torch.tensor([0, 7]), torch.tensor([1])])
    conv.to(memory_format=torch.channels_last)
    conv(torch.randn(1, 3, 5, 5)).sum().backward()
    with pytest.raises(RuntimeError, match="memory layout"):
        opt.step()


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(11, 6),
        torch.nn.Linear(6, 8),
        torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 3),
    )


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).mean(1), y)


@pytest.mark.parametrize("opt_cls,cfg", [(MaskedAdamW, dict(lr=1e-2, weight_decay=0.1)), (MaskedSGD, dict(lr=0.1, momentum=0.9, nesterov=True))])
def test_free_dense_grads_matches_gather_at_step(opt_cls, cfg):
    m1, m2 = _tiny_model(), _tiny_model()
    masks = random_masks(list(m1.parameters()), density=0.3)
    masks[2] = torch.empty(0, dtype=torch.long)  # Linear(6, 8).bias frozen
    o1 = opt_cls(m1.parameters(), masks, **cfg)
    o2 = opt_cls(m2.parameters(), masks, free_dense_grads=True, **cfg)
    assert not list(m2.parameters())[2].requires_grad, "a parameter with no selected entry needs no gradient"
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x, y = torch.randint(0, 11, (5, 4), generator=g), torch.randint(0, 3, (5,), generator=g)
        for model, opt in ((m1, o1), (m2, o2)):
            opt.zero_grad()
            # two backward passes before one step: gradients accumulate
            _loss(model, x[:3], y[:3]).backward()
            _loss(model, x[3:], y[3:]).backward()
        # dense grads are freed by the hooks: .grad holds the k entries only (none for the frozen bias)
        kinds = [type(p.grad) for p in m2.parameters()]
        assert kinds == [type(None) if i == 2 else MaskedGrad for i in range(len(kinds))]
        o1.step()
        o2.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    o2.remove_grad_hooks()
    assert all(p.requires_grad for p in m2.parameters())
    _loss(m2, x, y).backward()
    assert all(p.grad is not None for p in m2.parameters())
    o2.step()


def test_free_dense_grads_consumed_by_step():
    """Gathered gradients are used once: a later step without backward does not reuse them."""
    model = _tiny_model()
    masks = random_masks(list(model.parameters()))
    opt = MaskedSGD(model.parameters(), masks, lr=0.1, free_dense_grads=True)
    _loss(model, torch.randint(0, 11, (2, 3)), torch.tensor([0, 1])).backward()
    opt.step()
    after = [p.detach().clone() for p in model.parameters()]
    opt.step()  # nothing gathered since: no parameter has a gradient
    assert all(torch.equal(a, p.detach()) for a, p in zip(after, model.parameters()))


def test_native_copies_and_torch_copies_give_identical_trajectories(monkeypatch):
    """The CPU path moves data with the native multi-tensor gather/scatter when the extension is
    built, else with index_select / index_put_: both must give bit-identical results."""
    from fishkern._native import native_available
    from fishkern.ops import masked_step

    if not native_available():
        pytest.skip("fishkern's native extension is not built: only the index_select path exists here")

    def build():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        lin = torch.nn.Linear(10, 7).bfloat16()
        return [conv.weight, conv.bias, lin.weight, lin.bias, torch.nn.Parameter(torch.randn(9, 4).t())]

    a, b = build(), build()
    masks = random_masks(a, density=0.4)
    masks[1] = torch.empty(0, dtype=torch.long)
    calls = []
    real = masked_step.gather_masked
    monkeypatch.setattr(masked_step, "gather_masked", lambda *a: (calls.append(1), real(*a)))
    for master in (False, True):
        oa = MaskedAdamW(a, masks, lr=0.05, weight_decay=0.1, master_weights=master)
        ob = MaskedAdamW(b, masks, lr=0.05, weight_decay=0.1, master_weights=master)
        for step in range(3):
            grads = random_grads(a, seed=step)
            grads[4] = grads[4].contiguous()  # strides differ from the parameter's: per-tensor fallback
            for p, q, g in zip(a, b, grads):
                p.grad, q.grad = g.clone(), g.clone()
            with monkeypatch.context() as m:
                m.setattr(masked_step, "MULTI_TENSOR_COPIES", True)
                oa.step()
            assert calls, "the multi-tensor copies did not run"
            with monkeypatch.context() as m:
                m.setattr(masked_step, "MULTI_TENSOR_COPIES", False)
                calls.clear()
                ob.step()
                assert not calls, "the per-tensor copies used the multi-tensor op"
        for p, q in zip(a, b):
            assert torch.equal(p, q)


def test_native_gather_scatter_ops_directly():
    from fishkern._native import native_available

    if not native_available():
        pytest.skip("fishkern's native extension is not built")
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(50, generator=g), torch.randn(7, 3, generator=g).bfloat16(), torch.randn(5, generator=g).half()]
    idx = [torch.tensor([0, 9, 49]), torch.tensor([2, 20]), torch.tensor([4])]
    flat_idx = torch.cat(idx).int()
    begins, ends = [0, 3, 5], [3, 5, 6]
    out = torch.zeros(6)
    from fishkern.ops.masked_copy import gather_masked

    gather_masked(tensors, flat_idx, begins, ends, out)
    want = torch.cat([t.reshape(-1)[i].float() for t, i in zip(tensors, idx)])
    assert torch.equal(out, want)
    values = torch.randn(6, generator=g)
    torch.ops.fishkern.scatter_masked_(tensors, flat_idx, begins, ends, values)
    for t, i, (b, e) in zip(tensors, idx, zip(begins, ends)):
        assert torch.equal(t.reshape(-1)[i], values[b:e].to(t.dtype))  # round-to-nearest-even, as .to()
    with pytest.raises(RuntimeError, match="outside the index"):
        torch.ops.fishkern.gather_masked(tensors, flat_idx, [0, 3, 5], [3, 5, 7], out)
    with pytest.raises(RuntimeError, match="one entry per tensor"):
        torch.ops.fishkern.gather_masked(tensors, flat_idx, [0, 3], [3, 5], out)
    for op, args in (
        (torch.ops.fishkern.gather_masked.default, (tensors, flat_idx, begins, ends, torch.zeros(6))),
        (torch.ops.fishkern.scatter_masked_.default, ([t.clone() for t in tensors], flat_idx, begins, ends, values)),
    ):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("free", [False, True])
def test_clip_grad_norm_matches_torch_on_selected_entries(free):
    model = _tiny_model()
    masks = random_masks(list(model.parameters()), density=0.3)
    ref = SelectedModel(list(model.parameters()), masks)
    opt = MaskedAdamW(model.parameters(), masks, lr=1e-2, free_dense_grads=free)
    ref_opt = torch.optim.AdamW(ref.params, lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        x, y = torch.randint(0, 11, (5, 4), generator=g), torch.randint(0, 3, (5,), generator=g)
        opt.zero_grad()
        ref_model = _tiny_model()
        ref_model.load_state_dict(model.state_dict())
        _loss(model, x, y).backward()
        _loss(ref_model, x, y).backward()
        ref.set_grads([p.grad for p in ref_model.parameters()])
        norm = opt.clip_grad_norm_(0.05)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.params, 0.05, foreach=False)
        torch.testing.assert_close(norm, ref_norm)
        opt.step()
        ref_opt.step()
        # the norm is one reduction per group here and a norm of per-tensor norms in torch: equal to
        # fp32 rounding, so the clipped trajectories agree to a few ulps, not bit for bit
        for p, m, q in zip(model.parameters(), masks, ref.params):
            torch.testing.assert_close(selected(p, m), q.detach(), rtol=1e-5, atol=1e-6)
    assert float(norm) > 0.05, "the test must actually clip"


def test_loading_a_state_saved_without_masters_into_an_optimizer_with_masters():
    """The masters start from the parameters' values (not zeros), so training simply continues."""
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    idx = [torch.tensor([1, 4, 7])]
    plain = MaskedAdamW([p], idx, lr=1e-3, weight_decay=0.0)
    p.grad = torch.ones_like(p)
    plain.step()
    sd = plain.state_dict()
    with_masters = MaskedAdamW([p], idx, lr=1e-3, weight_decay=0.0, master_weights=True)
    with_masters.load_state_dict(sd)
    assert torch.equal(with_masters.state[p]["master"], p.detach()[idx[0]].float())
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    with_masters.step()
    assert (p.detach()[idx[0]].float() - before[idx[0]].float()).abs().max() < 0.02  # one small Adam step
