"""What a user of the masked optimizers meets (issue 17): torch's own gradient clipping with
``free_dense_grads=True``, a Triton request that cannot run, and the optimizer's memory footprint."""
from __future__ import annotations

import pytest
import torch

from fishkern import MaskedAdamW, MaskedSGD
from fishkern.optim import MaskedGrad
from tests._reference import SelectedModel, random_masks, selected
from tests.conftest import HAS_TRITON, triton_devices, triton_status


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(11, 6), torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)
    ).to(dtype)


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).mean(1).float(), y)


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 11, (6, 4), generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def _dense_grads(model, masks, x, y):
    """The dense gradient of a fresh copy of ``model`` over the two micro-batches."""
    twin = _model()
    twin.load_state_dict(model.state_dict())
    _loss(twin, x[:3], y[:3]).backward()
    _loss(twin, x[3:], y[3:]).backward()
    return [p.grad for p in twin.parameters()]


# ---------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_torch_clip_grad_norm_clips_with_free_dense_grads(foreach, norm_type):
    """The bug: with free_dense_grads the hooks left .grad None, torch.nn.utils.clip_grad_norm_
    saw no gradient, returned 0.0 and clipped nothing. Now .grad is a MaskedGrad over the k
    gathered entries: torch's clip (foreach or not) measures and scales exactly what step() uses,
    also across gradient accumulation, and training equals torch.optim.AdamW on the entries."""
    model = _model()
    masks = random_masks(list(model.parameters()), density=0.3)
    ref = SelectedModel(list(model.parameters()), masks)
    opt = MaskedAdamW(model.parameters(), masks, lr=1e-2, free_dense_grads=True)
    ref_opt = torch.optim.AdamW(ref.params, lr=1e-2, foreach=False)
    clipped = 0
    for x, y in _batches(3):
        opt.zero_grad()
        ref.set_grads(_dense_grads(model, masks, x, y))
        _loss(model, x[:3], y[:3]).backward()
        _loss(model, x[3:], y[3:]).backward()  # accumulates into the MaskedGrads (their add_)
        assert all(isinstance(p.grad, MaskedGrad) for p in model.parameters())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, norm_type=norm_type, foreach=foreach)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.params, 0.05, norm_type=norm_type, foreach=foreach)
        torch.testing.assert_close(norm, ref_norm)
        clipped += float(norm) > 0.05
        opt.step()
        ref_opt.step()
        assert all(p.grad is None for p in model.parameters()), "step() consumes the gathered gradients"
        for p, m, q in zip(model.parameters(), masks, ref.params):
            torch.testing.assert_close(selected(p, m), q.detach(), rtol=1e-6, atol=1e-7)
    assert clipped == 3, "the test must actually clip"


@pytest.mark.parametrize("foreach", [None, False, True])
def test_torch_clip_grad_value_with_free_dense_grads(foreach):
    model = _model()
    masks = random_masks(list(model.parameters()), density=0.3)
    opt = MaskedSGD(model.parameters(), masks, lr=1.0, free_dense_grads=True)
    x, y = _batches(1)[0]
    dense = _dense_grads(model, masks, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, x[:3], y[:3]).backward()
    _loss(model, x[3:], y[3:]).backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.01, foreach=foreach)
    opt.step()
    for p, p0, g, m in zip(model.parameters(), before, dense, masks):
        want = selected(p0, m) - g.reshape(-1)[m].clamp(-0.01, 0.01)
        torch.testing.assert_close(selected(p, m), want, rtol=0, atol=1e-7)
    assert any((g.reshape(-1)[m].abs() > 0.01).any() for g, m in zip(dense, masks)), "the test must clip"


def test_grad_scaler_unscale_then_torch_clip():
    """torch.amp.GradScaler.unscale_ (a foreach op over .grad) divides the k entries, in place."""
    model, twin = _model(), _model()
    masks = random_masks(list(model.parameters()), density=0.3)
    opt = MaskedAdamW(model.parameters(), masks, lr=1e-2, free_dense_grads=True)
    ref_opt = MaskedAdamW(twin.parameters(), masks, lr=1e-2)
    for x, y in _batches(2):
        for m, o in ((model, opt), (twin, ref_opt)):
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            o.zero_grad()
            scaler.scale(_loss(m, x, y)).backward()
            scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1e6)  # no clipping: the unscale alone
            scaler.step(o)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bf16_parameters_with_masters_and_channels_last():
    """The MaskedGrad has the parameter's dtype and strides (its entries stay fp32): clipping a
    bf16 channels_last model works as on its dense gradient."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last).bfloat16()
    masks = random_masks(list(conv.parameters()), density=0.4)
    opt = MaskedAdamW(conv.parameters(), masks, lr=1e-2, master_weights=True, free_dense_grads=True)
    x = torch.randn(2, 3, 6, 6).bfloat16().to(memory_format=torch.channels_last)
    twin = torch.nn.Conv2d(3, 4, 3).bfloat16()
    twin.load_state_dict(conv.state_dict())
    twin(x.contiguous()).float().square().sum().backward()
    conv(x).float().square().sum().backward()
    w = conv.weight.grad
    assert isinstance(w, MaskedGrad) and w.dtype == torch.bfloat16 and w.stride() == conv.weight.stride()
    dense = w.to_dense()
    assert dense.stride() == conv.weight.stride()
    want = torch.zeros(conv.weight.numel())
    want[masks[0]] = twin.weight.grad.reshape(-1)[masks[0]].float()
    torch.testing.assert_close(dense.float().reshape(-1), want, rtol=1e-2, atol=1e-2)
    norm = torch.nn.utils.clip_grad_norm_(conv.parameters(), 0.1)
    ref = torch.linalg.vector_norm(torch.cat([g.reshape(-1)[m].float() for g, m in
                                              zip((twin.weight.grad, twin.bias.grad), masks)]))
    assert norm.dtype == torch.bfloat16  # as torch's clip on bf16 gradients
    torch.testing.assert_close(norm.float(), ref, rtol=1e-2, atol=0)
    after = torch.linalg.vector_norm(torch.cat([opt._runtime[0].grad]))
    torch.testing.assert_close(after, torch.tensor(0.1), rtol=1e-2, atol=0)
    opt.step()


def test_masked_grad_reads_as_the_dense_gradient_and_writes_reach_step():
    p = torch.nn.Parameter(torch.randn(4, 5))
    idx = torch.tensor([0, 3, 7, 19])
    opt = MaskedSGD([p], [idx], lr=1.0, free_dense_grads=True)
    x = torch.randn(3, 5)
    (x @ p.t()).square().sum().backward()
    ref = torch.zeros(20)
    q = p.detach().clone().requires_grad_()
    (x @ q.t()).square().sum().backward()
    ref[idx] = q.grad.reshape(-1)[idx]
    ref = ref.reshape(4, 5)
    mg = p.grad
    assert isinstance(mg, MaskedGrad) and mg.shape == p.shape and mg.dtype == p.dtype
    for read in (mg.to_dense(), mg.clone(), mg * 1, mg.detach().to_dense(), mg.data.to_dense()):
        assert type(read) is torch.Tensor
        torch.testing.assert_close(read, ref, rtol=0, atol=0)
    torch.testing.assert_close(mg[1:3].clone(), ref[1:3], rtol=0, atol=0)
    assert float(mg.sum()) == pytest.approx(float(ref.sum()))
    assert "MaskedGrad(k=4 of 20" in repr(mg)
    mg.mul_(2.0)  # in place on the k entries
    mg[0, 0] = 5.0  # __setitem__ writes back
    mg[0, 1] = 7.0  # an unselected entry: not stored
    before = p.detach().clone()
    opt.step()
    want = ref * 2
    want[0, 0] = 5.0
    torch.testing.assert_close(p.detach(), before - want, rtol=0, atol=1e-6)


def test_dropped_or_replaced_grad_is_what_step_sees():
    """.grad is the truth, as in torch: model.zero_grad() after backward leaves nothing to step
    (the old code kept stepping with the gathered gradient), and a .grad the user sets is used."""
    model = _model()
    masks = random_masks(list(model.parameters()), density=0.3)
    opt = MaskedSGD(model.parameters(), masks, lr=0.5, free_dense_grads=True)
    x, y = _batches(1)[0]
    _loss(model, x, y).backward()
    model.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    # a backward after the drop starts afresh (nothing stale is added)
    _loss(model, x, y).backward()
    dense = _dense_grads(model, masks, x[:6], y[:6])
    opt.zero_grad()
    _loss(model, x[:3], y[:3]).backward()
    _loss(model, x[3:], y[3:]).backward()
    p0 = list(model.parameters())[1]
    p0.grad = torch.full_like(p0, 0.25)  # replaced by the user
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for j, (p, b, g, m) in enumerate(zip(model.parameters(), before, dense, masks)):
        use = torch.full((m.numel(),), 0.25) if j == 1 else g.reshape(-1)[m]
        torch.testing.assert_close(selected(p, m), selected(b, m) - 0.5 * use, rtol=0, atol=1e-6)


def test_zero_grad_without_none_then_accumulate():
    model, twin = _model(), _model()
    masks = random_masks(list(model.parameters()), density=0.3)
    opt = MaskedAdamW(model.parameters(), masks, lr=1e-2, free_dense_grads=True)
    ref = MaskedAdamW(twin.parameters(), masks, lr=1e-2)
    for x, y in _batches(3):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad(set_to_none=False)
            m.zero_grad(set_to_none=False)
            _loss(m, x[:3], y[:3]).backward()
            _loss(m, x[3:], y[3:]).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_own_clip_grad_norm_and_torch_clip_agree():
    """opt.clip_grad_norm_ (the optimizer's own) still works; torch's clip afterwards sees the
    clipped gradient (norm max_norm) and leaves it as it is."""
    model = _model()
    masks = random_masks(list(model.parameters()), density=0.3)
    for free in (False, True):
        opt = MaskedAdamW(model.parameters(), masks, lr=1e-2, free_dense_grads=free)
        x, y = _batches(1)[0]
        _loss(model, x, y).backward()
        norm = opt.clip_grad_norm_(0.05)
        assert float(norm) > 0.05
        if free:
            again = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            torch.testing.assert_close(again, torch.tensor(0.05), rtol=1e-5, atol=0)
        opt.step()
        opt.zero_grad()
        opt.remove_grad_hooks()


# ---------------------------------------------------------------------------------------- item 3
def test_triton_on_cpu_is_refused_at_construction_with_what_is_there(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton is not installed: the request is refused for that reason")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match=r"are on cpu.*Triton kernels need CUDA tensors.*implementation='auto' or 'torch'"):
        MaskedSGD([p], [torch.tensor([1])], implementation="triton")
    # where a GPU exists, the message says so and says to move the model first
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match=r"CUDA is available here \(2 device\(s\)\).*model.to\('cuda'\)"):
        MaskedAdamW([p], [torch.tensor([1])], implementation="triton")
    assert p.requires_grad and not p._post_accumulate_grad_hooks, "a refused construction leaves nothing behind"


def test_triton_not_installed_names_the_alternatives(monkeypatch):
    import fishkern.optim._masked as masked

    monkeypatch.setattr(masked, "triton_supported", lambda: False)
    monkeypatch.setattr(masked, "triton_status", lambda: "triton is not installed")
    with pytest.raises(RuntimeError, match=r"triton is not installed.*implementation='auto' or 'torch'"):
        MaskedAdamW([torch.nn.Parameter(torch.randn(3))], [torch.tensor([1])], implementation="triton")


# ---------------------------------------------------------------------------------------- item 9
def _params(dtype):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in ((7, 5), (5,), (3, 4))]


MASKS = [torch.tensor([0, 4, 9, 33, 34]), torch.tensor([1, 2]), torch.tensor([0, 5, 6, 11])]
K = 11


def _step(opt, params):
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()


@pytest.mark.parametrize(
    "cls,cfg,dtype,state,master,work",
    [
        (MaskedAdamW, {}, torch.float32, 8, 0, 4),
        (MaskedAdamW, {"amsgrad": True}, torch.float32, 12, 0, 4),
        (MaskedAdamW, {}, torch.bfloat16, 8, 0, 4),
        (MaskedAdamW, {"master_weights": True}, torch.bfloat16, 8, 4, 0),
        (MaskedAdamW, {"master_weights": True}, torch.float32, 8, 0, 4),  # fp32 entries need no master
        (MaskedAdamW, {}, torch.float64, 16, 0, 8),
        (MaskedSGD, {"momentum": 0.9}, torch.float32, 4, 0, 4),
        (MaskedSGD, {}, torch.float32, 0, 0, 4),
    ],
)
def test_memory_footprint_by_part_before_and_after_the_first_step(cls, cfg, dtype, state, master, work):
    params = _params(dtype)
    opt = cls(params, MASKS, lr=1e-3, implementation="torch", **cfg)
    grad = 8 if dtype == torch.float64 else 4  # gathered gradients: the state dtype
    n = len(params)
    before = opt.memory_footprint()
    # before any step: the mask's indices (row-major + memory order, int32), the step counters (4 per
    # trained tensor: every tensor here) and the parameter table's host mirror of the parameter and
    # gradient addresses (2 int64 per tensor)
    assert all(m.numel() for m in MASKS)
    tables = 4 * n + 16 * n
    assert before == {"state": 0, "master": 0, "indices": 8 * K, "grad": 0, "work": 0, "tables": tables,
                      "total": 8 * K + tables}
    assert opt.state_bytes() == 0
    _step(opt, params)
    after = opt.memory_footprint()
    want = {"state": state * K, "master": master * K, "indices": 8 * K, "grad": grad * K, "work": work * K,
            "tables": tables}
    want["total"] = sum(want.values())
    assert after == want
    assert opt.state_bytes() == (state + master) * K  # as documented: state and masters only
    _step(opt, params)
    assert opt.memory_footprint() == after, "nothing grows after the first step"


def test_memory_footprint_of_adamw_fp32_is_24_bytes_per_entry_and_hooks_gather_before_step():
    """The README's number: MaskedAdamW, fp32, PyTorch path: 24 bytes per trained entry (state 8,
    indices 8, gathered gradients 4, parameter scratch 4) plus O(tensors) counters."""
    model = _model()
    masks = random_masks(list(model.parameters()), density=0.3)
    k = sum(m.numel() for m in masks)
    n = len(masks)
    opt = MaskedAdamW(model.parameters(), masks, free_dense_grads=True, implementation="torch")
    x, y = _batches(1)[0]
    _loss(model, x, y).backward()
    fp = opt.memory_footprint()
    trained = sum(1 for m in masks if m.numel())
    tables = 4 * trained + 16 * n  # step counters (one per trained tensor), address mirror
    assert fp["grad"] == 4 * k and fp["state"] == 0 and fp["total"] == 12 * k + tables  # the hooks gathered
    opt.step()
    fp = opt.memory_footprint()
    assert fp["total"] - fp["tables"] == 24 * k and fp["tables"] == tables


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason=triton_status())
def test_memory_footprint_on_the_triton_path():
    """The fused kernel reads dense .grad and the parameters in place: no gathered gradients or
    scratch (16 bytes per entry plus the block and address tables)."""
    device = triton_devices()[0]
    params = [p.detach().to(device).requires_grad_() for p in _params(torch.float32)]
    opt = MaskedAdamW(params, [m.to(device) for m in MASKS], lr=1e-3, implementation="triton")
    _step(opt, params)
    fp = opt.memory_footprint()
    n, blocks = len(params), len(MASKS)  # every tensor's entries fit in one block of 1024
    # step counters (every tensor is trained), block table, segment ends, device address table, host mirror
    tables = 4 * n + blocks * (4 + 8) + 8 * n + 2 * 8 * n + 16 * n
    assert fp == {"state": 8 * K, "master": 0, "indices": 8 * K, "grad": 0, "work": 0, "tables": tables,
                  "total": 16 * K + tables}


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason=triton_status())
def test_torch_clip_reaches_the_fused_kernel():
    """On the Triton path the kernel reads the gathered buffer that torch's clip scaled."""
    device = triton_devices()[0]
    runs = []
    for impl in ("torch", "triton"):
        model = _model().to(device)
        masks = random_masks(list(model.parameters()), density=0.3)
        opt = MaskedAdamW(model.parameters(), masks, lr=1e-2, free_dense_grads=True, implementation=impl)
        for x, y in _batches(2):
            _loss(model, x.to(device), y.to(device)).backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            assert float(norm) > 0.05
            opt.step()
        runs.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason=triton_status())
def test_fused_kernel_with_masked_grads_beside_a_dense_grad():
    """A tensor unfrozen after construction has no hook and keeps a dense .grad; stepped in its
    own run (its step count differs), the kernel's address table must skip the MaskedGrads."""
    device = triton_devices()[0]
    a = torch.nn.Parameter(torch.randn(6, device=device))
    c = torch.nn.Parameter(torch.randn(5, device=device), requires_grad=False)
    masks = [torch.tensor([0, 2], device=device), torch.tensor([1, 4], device=device)]
    opt = MaskedSGD([a, c], masks, lr=0.1, free_dense_grads=True, implementation="triton")
    (a * 2).sum().backward()
    opt.step()
    c.requires_grad_(True)
    ((a * 2).sum() + (c * 3).sum()).backward()
    assert isinstance(a.grad, MaskedGrad) and type(c.grad) is torch.Tensor
    a0, c0 = a.detach().clone(), c.detach().clone()
    opt.step()
    assert torch.allclose(a.detach()[[0, 2]], a0[[0, 2]] - 0.2) and torch.allclose(c.detach()[[1, 4]], c0[[1, 4]] - 0.3)


@pytest.mark.parametrize("foreach", [None, True])
def test_torch_clip_over_masked_and_plain_grads_together(foreach):
    """A model trained partly by a masked optimizer and partly by a dense one: torch's clip takes
    one norm over both kinds of .grad and scales both."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(3))
    idx = torch.tensor([0, 7, 13])
    masked = MaskedSGD([a], [idx], lr=1.0, free_dense_grads=True)
    dense = torch.optim.SGD([b], lr=1.0)
    x = torch.randn(2, 4)
    ((x @ a.t()).square().sum() + (b * 4).sum()).backward()
    assert isinstance(a.grad, MaskedGrad) and type(b.grad) is torch.Tensor
    ga, gb = a.grad.to_dense().reshape(-1)[idx], b.grad.clone()
    total = torch.linalg.vector_norm(torch.cat([ga, gb]))
    norm = torch.nn.utils.clip_grad_norm_([a, b], 1.0, foreach=foreach)
    torch.testing.assert_close(norm, total)
    coef = 1.0 / (total + 1e-6)
    a0, b0 = a.detach().clone(), b.detach().clone()
    masked.step()
    dense.step()
    torch.testing.assert_close(a.detach().reshape(-1)[idx], a0.reshape(-1)[idx] - coef * ga)
    torch.testing.assert_close(b.detach(), b0 - coef * gb)
