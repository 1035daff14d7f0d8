"""MaskedAdamW / MaskedSGD (PyTorch path) against torch.optim on the selected entries alone.

On fp32 and fp64 the masked trajectory must be bit-identical to torch.optim.AdamW / SGD run on a
model whose only parameters are the selected entries, and every unselected entry must never move.
"""
import io

import pytest
import torch

from fishkern import MaskedAdamW, MaskedSGD
from tests._reference import SelectedModel, random_grads, random_masks, selected, unselected_mask

SHAPES = [(7,), (5, 9), (3, 4, 5), (1,), (), (2, 3, 3, 3), (33, 17)]

ADAMW_CONFIGS = [
    dict(lr=1e-2),
    dict(lr=3e-2, weight_decay=0.1),
    dict(lr=1e-2, weight_decay=0.05, amsgrad=True),
    dict(lr=1e-2, weight_decay=0.05, maximize=True),
    dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0, amsgrad=True, maximize=True),
]
SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=5e-4),
    dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=1e-2, maximize=True),
]
CASES = [(MaskedAdamW, torch.optim.AdamW, c) for c in ADAMW_CONFIGS] + [
    (MaskedSGD, torch.optim.SGD, c) for c in SGD_CONFIGS
]


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


def reference_opt(ref_cls, params, cfg):
    extra = {"foreach": False} if ref_cls is not None else {}
    return ref_cls(params, **cfg, **extra)


def run_pair(masked_cls, ref_cls, cfg, *, dtype=torch.float32, steps=6, none_every=None, shuffle=False, seed=0):
    params = make_params(dtype, seed)
    before = [p.detach().clone() for p in params]
    masks = random_masks(params, density=0.35, seed=seed, shuffle=shuffle)
    ref = SelectedModel(params, masks)
    opt = masked_cls(params, masks, implementation="torch", **cfg)
    ref_opt = reference_opt(ref_cls, ref.params, cfg)
    for step in range(steps):
        grads = random_grads(params, seed=100 + step, none_every=none_every, step=step)
        for p, g in zip(params, grads):
            p.grad = g
        ref.set_grads(grads)
        opt.step()
        ref_opt.step()
    return params, before, masks, ref, opt, ref_opt


@pytest.mark.parametrize("masked_cls,ref_cls,cfg", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bit_identical_to_torch_on_selected_entries(masked_cls, ref_cls, cfg, dtype):
    params, before, masks, ref, opt, _ = run_pair(masked_cls, ref_cls, cfg, dtype=dtype)
    for p, p0, m, q in zip(params, before, masks, ref.params):
        assert torch.equal(selected(p, m), q.detach()), "selected entries differ from torch.optim"
        keep = unselected_mask(p, m)
        assert torch.equal(p.detach().reshape(-1)[keep], p0.reshape(-1)[keep]), "an unselected entry moved"
        assert not torch.equal(selected(p, m), selected(p0, m)), "selected entries did not move"


@pytest.mark.parametrize("masked_cls,ref_cls,cfg", [CASES[1], CASES[2], CASES[8]])
def test_params_without_grad_are_skipped_like_torch(masked_cls, ref_cls, cfg):
    # some parameters get grad None on some steps: their step counts drift apart, as in torch
    params, before, masks, ref, opt, ref_opt = run_pair(masked_cls, ref_cls, cfg, none_every=3, steps=7)
    for p, m, q in zip(params, masks, ref.params):
        assert torch.equal(selected(p, m), q.detach())
    for p, q in zip(params, ref.params):
        if "step" in ref_opt.state[q]:
            assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"])


@pytest.mark.parametrize("masked_cls,ref_cls,cfg", [CASES[2], CASES[8]])
def test_unsorted_indices_are_sorted(masked_cls, ref_cls, cfg):
    params, _, masks, ref, _, _ = run_pair(masked_cls, ref_cls, cfg, shuffle=True)
    for p, m, q in zip(params, masks, ref.params):
        assert torch.equal(selected(p, m), q.detach())


def test_state_has_size_k_and_eight_bytes_per_entry():
    params, _, masks, _, opt, _ = run_pair(MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2))
    k = sum(m.numel() for m in masks)
    for p, m in zip(params, masks):
        st = opt.state[p]
        assert st["exp_avg"].shape == (m.numel(),) and st["exp_avg"].dtype == torch.float32
        assert st["exp_avg_sq"].shape == (m.numel(),)
    assert opt.num_masked() == k
    assert opt.state_bytes() == 8 * k
    _, _, masks, _, sgd, _ = run_pair(MaskedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9))
    assert sgd.state_bytes() == 4 * sum(m.numel() for m in masks)
    _, _, _, _, plain, _ = run_pair(MaskedSGD, torch.optim.SGD, dict(lr=0.1))
    assert plain.state_bytes() == 0


def test_empty_mask_freezes_parameter_and_keeps_no_state():
    params = make_params()
    masks = random_masks(params)
    masks[1] = torch.empty(0, dtype=torch.long)
    frozen = params[1].detach().clone()
    opt = MaskedAdamW(params, masks, lr=0.1, weight_decay=0.5)
    for step in range(3):
        for p, g in zip(params, random_grads(params, seed=step)):
            p.grad = g
        opt.step()
    assert torch.equal(params[1].detach(), frozen)
    assert params[1] not in opt.state
    assert opt.state_bytes() == 8 * sum(m.numel() for m in masks)


def test_param_groups_with_own_masks_and_hyperparameters():
    params = make_params()
    masks = random_masks(params)
    groups = [
        {"params": params[:3], "mask_indices": masks[:3], "lr": 0.05, "weight_decay": 0.2},
        {"params": params[3:], "mask_indices": masks[3:], "amsgrad": True},
    ]
    opt = MaskedAdamW(groups, lr=0.01)
    ref = SelectedModel(params, masks)
    ref_opt = torch.optim.AdamW(
        [{"params": ref.params[:3], "lr": 0.05, "weight_decay": 0.2}, {"params": ref.params[3:], "amsgrad": True}],
        lr=0.01,
        foreach=False,
    )
    for step in range(4):
        grads = random_grads(params, seed=step)
        for p, g in zip(params, grads):
            p.grad = g
        ref.set_grads(grads)
        opt.step()
        ref_opt.step()
    for p, m, q in zip(params, masks, ref.params):
        assert torch.equal(selected(p, m), q.detach())
    # add_param_group after construction works too
    extra = torch.nn.Parameter(torch.randn(4, 4))
    opt.add_param_group({"params": [extra], "mask_indices": [torch.tensor([0, 5, 15])], "lr": 0.3})
    extra.grad = torch.ones(4, 4)
    opt.step()
    assert float(opt.state[extra]["step"]) == 1.0


def test_lr_scheduler_and_closure():
    params = make_params()
    masks = random_masks(params)
    ref = SelectedModel(params, masks)
    opt = MaskedAdamW(params, masks, lr=0.1)
    ref_opt = torch.optim.AdamW(ref.params, lr=0.1, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 / (1 + s))
    for step in range(5):
        grads = random_grads(params, seed=step)

        def closure():
            for p, g in zip(params, grads):
                p.grad = g
            return torch.tensor(float(step))

        loss = opt.step(closure)
        assert float(loss) == step
        ref.set_grads(grads)
        ref_opt.step()
        sched.step()
        ref_sched.step()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    for p, m, q in zip(params, masks, ref.params):
        assert torch.equal(selected(p, m), q.detach())


def test_zero_grad():
    params = make_params()
    opt = MaskedAdamW(params, random_masks(params))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)


def test_tensor_lr_is_accepted():
    params = make_params()
    masks = random_masks(params)
    ref = SelectedModel(params, masks)
    opt = MaskedAdamW(params, masks, lr=torch.tensor(0.01))
    ref_opt = torch.optim.AdamW(ref.params, lr=0.01, foreach=False)
    grads = random_grads(params, seed=0)
    for p, g in zip(params, grads):
        p.grad = g
    ref.set_grads(grads)
    opt.step()
    ref_opt.step()
    for p, m, q in zip(params, masks, ref.params):
        assert torch.equal(selected(p, m), q.detach())


@pytest.mark.parametrize("masked_cls,ref_cls,cfg", [CASES[2], CASES[3], CASES[8]])
def test_state_dict_save_load_midway_continues_bit_identically(masked_cls, ref_cls, cfg):
    def train(params, opt, steps, seed0):
        for step in range(steps):
            for p, g in zip(params, random_grads(params, seed=seed0 + step, none_every=4, step=step)):
                p.grad = g
            opt.step()

    params = make_params()
    masks = random_masks(params)
    opt = masked_cls(params, masks, **cfg)
    train(params, opt, 3, 0)
    buf = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    train(params, opt, 3, 10)  # the uninterrupted run

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(t) for t in ckpt["model"]]
    opt2 = masked_cls(resumed, masks, **{**cfg, "lr": 123.0})  # hyperparameters come from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["lr"] == cfg["lr"]
    train(resumed, opt2, 3, 10)
    for p, q in zip(params, resumed):
        assert torch.equal(p.detach(), q.detach())
    for p, q in zip(params, resumed):
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


def test_load_state_dict_refuses_another_mask():
    params = make_params()
    masks = random_masks(params, seed=0)
    opt = MaskedAdamW(params, masks)
    for p, g in zip(params, random_grads(params, seed=0)):
        p.grad = g
    opt.step()
    sd = opt.state_dict()
    other = random_masks(params, seed=1)
    opt2 = MaskedAdamW(make_params(), other)
    with pytest.raises(ValueError, match="different mask"):
        opt2.load_state_dict(sd)
    assert len(opt2.state) == 0, "a refused state dict must not change the optimizer"
    with pytest.raises(ValueError, match="MaskedAdamW cannot be loaded into a MaskedSGD"):
        MaskedSGD(params, masks, lr=0.1).load_state_dict(sd)
    dense = torch.optim.AdamW(params)
    with pytest.raises(ValueError, match="not saved by a fishkern"):
        opt2.load_state_dict(dense.state_dict())
    # fewer groups / parameters
    with pytest.raises(ValueError, match="parameters"):
        MaskedAdamW(params[:3], masks[:3]).load_state_dict(sd)


def test_load_state_dict_refuses_wrong_sizes():
    params = make_params()
    masks = random_masks(params)
    opt = MaskedAdamW(params, masks)
    for p, g in zip(params, random_grads(params, seed=0)):
        p.grad = g
    opt.step()
    sd = opt.state_dict()
    pid = sd["param_groups"][0]["params"][2]
    sd["state"][pid]["exp_avg"] = sd["state"][pid]["exp_avg"][:-1]
    with pytest.raises(ValueError, match="entries"):
        MaskedAdamW(params, masks).load_state_dict(sd)
