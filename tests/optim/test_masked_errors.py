"""Bad input gets a clear error naming the problem, before anything is changed."""
import pytest
import torch

from fishkern import MaskedAdamW, MaskedSGD


@pytest.fixture
def param():
    return torch.nn.Parameter(torch.randn(4, 5))


@pytest.mark.parametrize("cls", [MaskedAdamW, MaskedSGD])
@pytest.mark.parametrize(
    "indices,exc,match",
    [
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer dtype"),
        (torch.tensor([True, False]), TypeError, "boolean mask"),
        ([0, 1], TypeError, "1-D integer tensor"),
        (torch.tensor([0, 20]), IndexError, "mask index 20 is out of range .* 20 entries"),
        (torch.tensor([-1, 3]), IndexError, "mask index -1 is out of range"),
        (torch.tensor([4, 2, 4]), ValueError, "mask index 4 appears more than once"),
        (torch.tensor([0, 1], device="meta"), ValueError, "on meta but the parameter is on cpu"),
    ],
)
def test_bad_indices(cls, param, indices, exc, match):
    with pytest.raises(exc, match=match):
        cls([param], [indices], lr=0.1)


def test_mask_count_mismatch(param):
    other = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="fewer tensors than there are parameters"):
        MaskedAdamW([param, other], [torch.tensor([0])])
    with pytest.raises(ValueError, match="more tensors than there are parameters"):
        MaskedAdamW([param], [torch.tensor([0]), torch.tensor([1])])
    with pytest.raises(ValueError, match="no mask for param group 0"):
        MaskedAdamW([param])
    with pytest.raises(ValueError, match="one way only"):
        MaskedAdamW([{"params": [param], "mask_indices": [torch.tensor([0])]}], [torch.tensor([0])])
    with pytest.raises(ValueError, match="1 parameters but 2 mask index tensors"):
        MaskedAdamW([{"params": [param], "mask_indices": [torch.tensor([0]), torch.tensor([1])]}])


def test_bad_hyperparameters(param):
    idx = [torch.tensor([0])]
    with pytest.raises(ValueError, match="learning rate"):
        MaskedAdamW([param], idx, lr=-1)
    with pytest.raises(ValueError, match="betas"):
        MaskedAdamW([param], idx, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="epsilon"):
        MaskedAdamW([param], idx, eps=-1e-8)
    with pytest.raises(ValueError, match="weight_decay"):
        MaskedAdamW([param], idx, weight_decay=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        MaskedSGD([param], idx, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="implementation"):
        MaskedAdamW([param], idx, implementation="cuda")


def test_parameters_on_several_devices_in_one_group(param):
    meta = torch.nn.Parameter(torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match="different devices in different param groups"):
        MaskedAdamW([param, meta], [torch.tensor([0]), torch.tensor([0], device="meta")])


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = MaskedAdamW(emb.parameters(), [torch.tensor([0, 5, 39])])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()
    hooked = MaskedAdamW(emb.parameters(), [torch.tensor([0, 5, 39])], free_dense_grads=True)
    with pytest.raises(RuntimeError, match="sparse gradient"):
        emb(torch.tensor([1, 2])).sum().backward()
    del hooked


def test_triton_request_without_a_usable_device(param, monkeypatch):
    """Refused at construction (it used to be accepted and fail at the first step()), saying where
    the parameters are, what is missing, and what to use instead."""
    from fishkern.ops.triton_support import triton_status, triton_supported

    if not triton_supported():
        # refused for that reason instead: test_user_optim.test_triton_not_installed_names_the_alternatives
        pytest.skip(f"{triton_status()}: the request is refused for that reason")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for cls in (MaskedAdamW, MaskedSGD):
        with pytest.raises(RuntimeError, match=r"parameters are on cpu.*Triton kernels need CUDA tensors.*implementation='auto' or 'torch'.*TRITON_INTERPRET=1"):
            cls([param], [torch.tensor([0])], implementation="triton")
    # the interpreter makes the CPU request valid; if it is switched off later, step() still refuses
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    opt = MaskedAdamW([param], [torch.tensor([0])], implementation="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    param.grad = torch.ones_like(param)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        opt.step()
    # float64 groups always take the PyTorch path: nothing to refuse
    MaskedAdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], [torch.tensor([0])], implementation="triton")


def test_copying_or_pickling_a_masked_optimizer_is_refused_with_the_way_out():
    import copy
    import pickle

    lin = torch.nn.Linear(3, 2)
    opt = MaskedAdamW(lin.parameters(), [torch.tensor([1]), torch.tensor([0])])
    for copier in (copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="save opt.state_dict"):
            copier(opt)
