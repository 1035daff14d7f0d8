"""The masked optimizer step ops (fishkern::masked_adamw_step_ / masked_sgd_step_): opcheck on every
device present, the capturable variants against the host-scalar ones, the Triton kernels (CPU
interpreter) against the default kernel, argument errors, and a CUDA graph capture where CUDA exists."""
import pytest
import torch

from fishkern import MaskedAdamW, MaskedSGD
from fishkern.ops import param_table as pt
from fishkern.ops.masked_step import masked_adamw_step_, masked_sgd_step_

from conftest import HAS_CUDA, requires_triton, triton_devices

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _table(device, dtype=torch.float32, seed=0):
    """A ParamTable over odd-shaped tensors (one with no entry, one channels_last) and its K."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (3,), (4, 3, 2, 2), (11,)]
    params = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    params[2] = params[2].to(memory_format=torch.channels_last)
    ks = [9, 0, 13, 4]
    indices = [torch.randperm(p.numel(), generator=g)[:k].sort().values for p, k in zip(params, ks)]
    from fishkern.optim._layout import build_group_layout

    lay = build_group_layout(params, [i.to(device) for i in indices], 0)
    table = pt.ParamTable(lay.params, lay.starts, lay.flat_mem_indices, lay.flat_indices, lay.trainable, lay.device,
                          lay.state_dtype)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
    return table, lay


def _bufs(lay, seed, n, positive=()):
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n):
        b = torch.randn(lay.total, generator=g, dtype=torch.float64).to(lay.device, lay.state_dtype)
        out.append(b.abs() if j in positive else b)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("capturable", [False, True])
def test_opcheck_masked_adamw_step(device, amsgrad, capturable):
    table, lay = _table(device)
    grad, master, work, m, v, vmax = _bufs(lay, 1, 6, positive=(4, 5))
    step_t = torch.tensor(3.0, device=device) if capturable else None
    lr_t = torch.tensor(0.01, device=device) if capturable else None
    # With masters the op's results are a function of its arguments alone (opcheck runs it on copies
    # several times; the parameters themselves are reached through the table).
    args = (table.handle, 0, 3, grad, True, master, work, m, v, vmax if amsgrad else None, 3, step_t, 0.01, lr_t,
            0.9, 0.999, 1e-8, 0.01, False, "torch")
    torch.library.opcheck(masked_adamw_step_, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_opcheck_masked_sgd_step(device, momentum, nesterov):
    table, lay = _table(device)
    grad, master, work, buf = _bufs(lay, 2, 4)
    args = (table.handle, 0, 3, grad, True, master, work, buf if momentum else None, 0.05, None, momentum, 0.0, 1e-3,
            nesterov, False, False, "torch")
    torch.library.opcheck(masked_sgd_step_, args)


def test_step_op_reads_dense_gradients_and_updates_only_selected_entries():
    """grads_in_flat=False: the default kernel gathers each .grad (channels_last included)."""
    table, lay = _table("cpu")
    before = [p.clone() for p in lay.params]
    grad, m, v = torch.zeros(lay.total), torch.zeros(lay.total), torch.zeros(lay.total)
    masked_adamw_step_(table.handle, 0, 3, grad, False, None, None, m, v, None, 1, None, 0.1, None, 0.9, 0.999, 1e-8,
                       0.0, False, "torch")
    for i, (p, b) in enumerate(zip(lay.params, before)):
        sel = torch.zeros(p.numel(), dtype=torch.bool)
        sel[lay.indices[i].long()] = True
        changed = (p.reshape(-1) != b.reshape(-1))
        assert not changed[~sel].any(), f"tensor {i}: an unselected entry moved"
        # step 1 of Adam moves every selected entry by about lr (sign of the gradient)
        want = b.reshape(-1)[sel] - 0.1 * torch.sign(p.grad.reshape(-1)[sel])
        torch.testing.assert_close(p.reshape(-1)[sel], want, atol=1e-5, rtol=0)


def test_step_op_errors_name_the_argument():
    table, lay = _table("cpu")
    grad, m, v = torch.zeros(lay.total), torch.zeros(lay.total), torch.zeros(lay.total)
    base = [table.handle, 0, 3, grad, True, None, None, m, v, None, 1, None, 0.1, None, 0.9, 0.999, 1e-8, 0.0, False,
            "torch"]
    bad = list(base)
    bad[8] = torch.zeros(lay.total - 1)
    with pytest.raises(ValueError, match="exp_avg_sq must be a contiguous 1-D"):
        masked_adamw_step_(*bad)
    bad = list(base)
    bad[7] = torch.zeros(lay.total, dtype=torch.float64)
    with pytest.raises(ValueError, match="exp_avg must be a contiguous 1-D torch.float32 buffer"):
        masked_adamw_step_(*bad)
    bad = list(base)
    bad[2] = 4
    with pytest.raises(ValueError, match="run \\[0, 4\\] is outside the table's 4 tensors"):
        masked_adamw_step_(*bad)
    bad = list(base)
    bad[-1] = "cuda"
    with pytest.raises(ValueError, match="impl must be one of"):
        masked_adamw_step_(*bad)
    bad = list(base)
    bad[0] = 10**9
    with pytest.raises(RuntimeError, match="parameter table .* does not exist"):
        masked_adamw_step_(*bad)
    bad = list(base)
    bad[3] = None
    with pytest.raises(ValueError, match="grads_in_flat needs the grad buffer"):
        masked_adamw_step_(*bad)


def _model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)).to(device)


def _masks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(p.numel(), generator=g)[: max(1, p.numel() // 3)].to(p.device) for p in model.parameters()]


def _trajectory(device, cls, steps=5, **kw):
    model = _model(device)
    opt = cls(model.parameters(), _masks(model), **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 6, generator=g).to(device)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().cpu() for p in model.parameters()], opt


@pytest.mark.parametrize("free", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_capturable_adamw_matches_host_scalars(free, amsgrad):
    """capturable=True (step count and lr tensor read on the device) follows the same trajectory as
    the host-scalar step, to fp32 rounding (beta**step is then computed in fp32)."""
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, free_dense_grads=free, implementation="torch")
    want, _ = _trajectory("cpu", MaskedAdamW, **kw)
    got, opt = _trajectory("cpu", MaskedAdamW, capturable=True, **kw)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(float(st["step"]) == 5.0 for st in opt.state.values())
    # a tensor lr on the device is read there
    got_t, _ = _trajectory("cpu", MaskedAdamW, capturable=True, **{**kw, "lr": torch.tensor(1e-2)})
    for a, b in zip(want, got_t):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_capturable_sgd_with_tensor_lr_matches_float_lr():
    kw = dict(momentum=0.9, nesterov=True, weight_decay=1e-3, implementation="torch")
    want, _ = _trajectory("cpu", MaskedSGD, lr=0.05, **kw)
    got, _ = _trajectory("cpu", MaskedSGD, lr=torch.tensor(0.05), capturable=True, **kw)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


@requires_triton
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("amsgrad", [False, True])
def test_capturable_triton_kernel_matches_default_kernel(device, amsgrad):
    kw = dict(lr=torch.tensor(1e-2, device=device), weight_decay=0.1, amsgrad=amsgrad, capturable=True)
    want, _ = _trajectory(device, MaskedAdamW, implementation="torch", **kw)
    got, _ = _trajectory(device, MaskedAdamW, implementation="triton", **kw)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    want, _ = _trajectory(device, MaskedSGD, implementation="torch", lr=torch.tensor(0.05, device=device),
                          momentum=0.9, capturable=True)
    got, _ = _trajectory(device, MaskedSGD, implementation="triton", lr=torch.tensor(0.05, device=device),
                         momentum=0.9, capturable=True)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_capturable_refuses_a_step_without_every_gradient():
    model = _model("cpu")
    opt = MaskedAdamW(model.parameters(), _masks(model), capturable=True)
    model(torch.randn(2, 6)).sum().backward()
    model[2].bias.grad = None
    with pytest.raises(RuntimeError, match="capturable=True steps every trained tensor"):
        opt.step()


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("free", [False, True])
def test_cuda_graph_capture_and_replay_of_the_step(free):
    """Warm up, capture opt.step() in a CUDA graph, replay it on new gradients: same parameters as
    the eager capturable optimizer, and the step count advanced on the device."""
    device = "cuda"
    eager_model, graph_model = _model(device), _model(device)
    masks = _masks(eager_model)
    kw = dict(lr=torch.tensor(1e-2, device=device), weight_decay=0.1, capturable=True, free_dense_grads=free)
    eager = MaskedAdamW(eager_model.parameters(), masks, **kw)
    graphed = MaskedAdamW(graph_model.parameters(), masks, **kw)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 6, generator=g).to(device) for _ in range(8)]

    def backward(model, x):
        model(x).square().mean().backward()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x in xs[:3]:  # warm-up: buffers, tables and Triton kernels are created eagerly
            for model, opt in ((eager_model, eager), (graph_model, graphed)):
                backward(model, x)
                opt.step()
                opt.zero_grad(set_to_none=free)
    torch.cuda.current_stream().wait_stream(s)
    backward(graph_model, xs[3])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    backward(eager_model, xs[3])
    eager.step()
    eager.zero_grad(set_to_none=free)
    graph.replay()
    graphed.zero_grad(set_to_none=free)
    for x in xs[4:]:
        backward(eager_model, x)
        eager.step()
        eager.zero_grad(set_to_none=free)
        backward(graph_model, x)
        graph.replay()
        graphed.zero_grad(set_to_none=free)
    torch.cuda.synchronize()
    for a, b in zip(eager_model.parameters(), graph_model.parameters()):
        torch.testing.assert_close(b, a)
    assert float(graphed._runtime[0].step_dev) == float(eager._runtime[0].step_dev) == 8.0


@pytest.mark.parametrize("impl", ["torch"] + (["triton"] if triton_devices() == ["cpu"] else []))
def test_a_step_bumps_the_autograd_version_so_a_stale_graph_raises(impl):
    """The step writes parameters in place (scatter op or raw pointers): autograd must learn of it,
    as after p.add_(), so a graph that saved the old values refuses to backward."""
    if impl == "triton":
        pytest.importorskip("triton")
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = MaskedAdamW([w], [torch.tensor([0, 5, 11])], lr=0.1, implementation=impl)
    x = torch.randn(2, 4, requires_grad=True)
    y = (x @ w).square().sum()  # saves w for the gradient of x
    w.grad = torch.ones_like(w)
    v = w._version
    opt.step()
    assert w._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
