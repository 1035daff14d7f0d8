"""Regression tests for bugs found in review (each failed before its fix)."""
import pytest
import torch

from fishkern import FishMask, MaskedAdamW, MaskedSGD
from fishkern.optim import MaskedGrad


def _train(p, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_loading_its_own_live_state_dict_keeps_steps_and_moments():
    p = torch.nn.Parameter(torch.randn(10))
    opt = MaskedAdamW([p], [torch.tensor([1, 3, 5])], lr=0.1)
    _train(p, opt, 3)
    before = {k: v.clone() for k, v in opt.state[p].items()}
    opt.load_state_dict(opt.state_dict())  # the state dict holds views of the live buffers
    assert float(opt.state[p]["step"]) == 3.0
    for k, v in before.items():
        assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("implementation", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("cls", [MaskedSGD, MaskedAdamW])
def test_updates_bump_the_autograd_version_counter(cls, implementation):
    from tests.conftest import HAS_TRITON, triton_devices

    if implementation == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    device = triton_devices()[0] if implementation == "triton" else "cpu"
    p = torch.nn.Parameter(torch.randn(4, device=device))
    opt = cls([p], [torch.tensor([0, 1], device=device)], lr=0.1, implementation=implementation)
    loss = (p * p).sum()
    loss.backward(retain_graph=True)
    v = p._version
    opt.step()
    assert p._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the graph saw the old values: autograd must refuse, as with torch.optim


def test_dtype_change_after_construction_is_refused():
    m = torch.nn.Linear(4, 3)
    opt = MaskedAdamW(m.parameters(), [torch.tensor([0, 5, 7]), torch.tensor([1])], lr=1e-3, master_weights=True)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    m.bfloat16()
    m(torch.randn(2, 4).bfloat16()).sum().backward()
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()


def test_free_dense_grads_with_a_frozen_parameter_and_failed_construction_leave_no_trace():
    a = torch.nn.Parameter(torch.randn(4))
    z = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    opt = MaskedAdamW([a, z, b], [torch.tensor([0, 1]), torch.tensor([], dtype=torch.long), torch.tensor([2])], free_dense_grads=True)
    (a * 3).sum().backward()
    assert isinstance(a.grad, MaskedGrad) and opt._runtime[0].grad_ready[0]  # k entries, no dense memory
    opt.step()
    opt.remove_grad_hooks()
    assert z.requires_grad
    # a constructor that fails after registering hooks must undo them
    c = torch.nn.Parameter(torch.randn(4))
    y = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(IndexError):
        MaskedAdamW([c, y], [torch.tensor([0]), torch.tensor([5])], free_dense_grads=True)
    with pytest.raises(IndexError):
        MaskedAdamW([{"params": [y], "mask_indices": [torch.tensor([], dtype=torch.long)]}, {"params": [c], "mask_indices": [torch.tensor([9])]}], free_dense_grads=True)
    assert y.requires_grad, "a failed construction must not leave parameters frozen"
    (c * 3).sum().backward()
    assert c.grad is not None, "a failed construction must not leave hooks that eat gradients"


@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_momentum_switched_on_mid_training_matches_torch(dampening):
    p = torch.nn.Parameter(torch.randn(6))
    idx = torch.tensor([0, 2, 3])
    q = torch.nn.Parameter(p.detach()[idx].clone())
    opt = MaskedSGD([p], [idx], lr=0.1, momentum=0.0, dampening=dampening)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.0, dampening=dampening, foreach=False)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        if step == 1:
            opt.param_groups[0]["momentum"] = ref.param_groups[0]["momentum"] = 0.9
        grad = torch.randn(6, generator=g)
        p.grad, q.grad = grad.clone(), grad[idx].clone()
        opt.step()
        ref.step()
        assert torch.equal(p.detach()[idx], q.detach()), step
    assert "momentum_buffer" in opt.state[p]
    assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
    opt2 = MaskedSGD([torch.nn.Parameter(p.detach().clone())], [idx], lr=0.1, momentum=0.9)
    opt2.load_state_dict(opt.state_dict())


def test_bad_parameter_collections():
    w = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="expected a tensor, got float"):
        MaskedAdamW([w, 3.0], [torch.tensor([0]), torch.tensor([0])])
    with pytest.raises(TypeError, match="not a set"):
        MaskedAdamW([{"params": {w}, "mask_indices": [torch.tensor([0])]}])
    with pytest.raises(ValueError, match="appears twice"):
        MaskedAdamW([w, w], [torch.tensor([0]), torch.tensor([1])])


def test_remove_grad_hooks_mid_accumulation_is_refused():
    w = torch.nn.Parameter(torch.randn(3))
    opt = MaskedSGD([w], [torch.tensor([0, 2])], lr=0.1, free_dense_grads=True)
    (w * 2).sum().backward()
    with pytest.raises(RuntimeError, match="wait for step"):
        opt.remove_grad_hooks()
    opt.step()
    opt.remove_grad_hooks()


def test_mask_file_with_malformed_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(
        {"indices/a": torch.tensor([1], dtype=torch.int32)},
        str(path),
        metadata={"format": "fishkern.mask", "format_version": "1", "shapes": "[1, 2]", "forced": "[]", "provenance": "{}"},
    )
    with pytest.raises(ValueError, match="damaged mask metadata"):
        FishMask.load(path)
