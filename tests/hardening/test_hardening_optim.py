"""Issue 10, items 5, 6 and 13 (optimizer part): nothing half-applied, no bypassable mask check,
clear errors for malformed state dicts."""
import copy

import pytest
import torch

from fishkern import MaskedAdamW, MaskedSGD


def _two_group_opt(cls=MaskedAdamW):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 5))
    conv = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    groups = [
        {"params": [a], "mask_indices": [torch.tensor([0, 7, 29])]},
        {"params": [conv], "mask_indices": [torch.tensor([1, 50, 100])]},
    ]
    opt = cls(groups, None, lr=0.1)
    return opt, a, conv


def _backward(*params):
    sum((p * torch.randn_like(p)).sum() for p in params).backward()


@pytest.mark.parametrize("cls", [MaskedAdamW, MaskedSGD])
def test_step_checks_every_group_before_touching_any(cls):
    """Item 5: group 1's parameter became channels_last; step() must refuse with group 0 untouched."""
    opt, a, conv = _two_group_opt(cls)
    _backward(a, conv)
    opt.step()
    before = {"a": a.detach().clone(), "state": copy.deepcopy(opt.state_dict())}
    conv.data = conv.data.to(memory_format=torch.channels_last)
    opt.zero_grad()
    _backward(a, conv)
    with pytest.raises(RuntimeError, match="param group 1, parameter 0 .* changed its shape, memory layout"):
        opt.step()
    assert torch.equal(a, before["a"])
    steps = [float(opt.state[p]["step"]) for p in (a,)]
    assert steps == [1.0]  # group 0 did not step


def test_step_refuses_a_bad_gradient_before_touching_any_group():
    opt, a, conv = _two_group_opt()
    a.grad = torch.randn_like(a)
    conv.grad = torch.randn(4, 3, 3, 3).to_sparse()
    a0 = a.detach().clone()
    with pytest.raises(RuntimeError, match="param group 1, parameter 0 .* sparse gradient"):
        opt.step()
    assert torch.equal(a, a0) and a not in opt.state


def _trained(cls=MaskedAdamW, idx=(1, 3, 5)):
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(10))
    opt = cls([p], [torch.tensor(list(idx))], lr=0.1)
    p.grad = torch.randn(10)
    opt.step()
    return opt, p


@pytest.mark.parametrize("masks", [[], None, [[]], "x", [[["d", 3]]], [[["d", 3, 10]], [["e", 1, 1]]]])
def test_mask_check_cannot_be_bypassed(masks):
    """Item 6: an empty, missing or malformed mask record loads nothing."""
    src, _ = _trained(idx=(0, 2, 4))  # another mask, same k
    dst, p = _trained(idx=(1, 3, 5))
    sd = src.state_dict()
    if masks is None:
        del sd["fishkern"]["masks"]
    else:
        sd["fishkern"]["masks"] = masks
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(ValueError, match="mask record"):
        dst.load_state_dict(sd)
    after = dst.state_dict()
    assert torch.equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("exp_avg", [0.1, 0.2, 0.3], "'exp_avg' must be a floating-point tensor, got a list"),
        ("exp_avg", torch.tensor([1, 2, 3]), "'exp_avg' must be a floating-point tensor, got a torch.int64 tensor"),
        ("step", "one", "'step' must be a non-negative whole number"),
        ("step", torch.tensor(-2.0), "'step' must be a non-negative whole number"),
        ("step", torch.tensor(1.5), "'step' must be a non-negative whole number"),
        ("step", None, "'step' must be a non-negative whole number"),
    ],
)
def test_malformed_state_values_are_clear_errors(field, value, match):
    opt, p = _trained()
    sd = copy.deepcopy(opt.state_dict())
    if value is None:
        del sd["state"][0][field]
    else:
        sd["state"][0][field] = value
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("bad", [{"state": {}, "param_groups": "x"}, {"state": [], "param_groups": []}, "not a dict"])
def test_malformed_state_dict_structure(bad):
    opt, p = _trained()
    if isinstance(bad, dict):
        bad = {**bad, "fishkern": opt.state_dict()["fishkern"]}
    with pytest.raises((ValueError, TypeError), match="state dict|load_state_dict expects"):
        opt.load_state_dict(bad)


def test_valid_state_dict_still_round_trips():
    opt, p = _trained()
    sd = copy.deepcopy(opt.state_dict())
    opt2, p2 = _trained()
    opt2.load_state_dict(sd)
    p.grad = torch.ones(10)
    p2.grad = torch.ones(10)
    opt.step()
    opt2.step()
    assert torch.equal(p, p2)


@pytest.mark.parametrize("cls", [MaskedAdamW, MaskedSGD])
def test_a_dropped_optimizer_frees_its_model(cls):
    """free_dense_grads hooks held the optimizer: parameter -> hook -> optimizer -> parameter, a cycle
    the garbage collector cannot free (found when a benchmark ran out of memory after a few models)."""
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
    opt = cls(list(model.parameters()), [torch.tensor([0, 3]), torch.tensor([], dtype=torch.long),
                                         torch.tensor([1]), torch.tensor([0])], lr=0.1, free_dense_grads=True)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    refs = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(opt)]
    del model, opt
    gc.collect()
    assert all(r() is None for r in refs)
