"""The fused Triton steps (under TRITON_INTERPRET=1 on CPU, natively on CUDA) against the PyTorch
path and against torch.optim on the selected entries."""
import pytest
import torch

from fishkern import MaskedAdamW, MaskedSGD
from tests._reference import SelectedModel, random_grads, random_masks, selected, unselected_mask
from tests.conftest import requires_triton, triton_devices
from tests.optim.test_masked_equivalence import ADAMW_CONFIGS, SGD_CONFIGS

pytestmark = [pytest.mark.triton, requires_triton]

# Shapes that give several blocks per tensor (block = 1024), single-entry tensors and odd sizes.
SHAPES = [(37, 61), (5,), (1,), (3, 7, 11), (2049,), (64, 3, 3, 3)]


def _params(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype).to(device)) for s in SHAPES]


def _tol(dtype):
    # The kernel may fuse multiply-adds where PyTorch rounds twice: a few ulps apart in fp32.
    return {torch.float32: dict(rtol=2e-6, atol=2e-7)}.get(
        dtype, dict(rtol=1.6e-2, atol=1e-5)
    )


def _run_both(cls, cfg, dtype, device, *, steps=4, none_every=None, master=False, grad_layout=None):
    a, b = _params(dtype, device), _params(dtype, device)
    before = [p.detach().clone() for p in a]
    masks = random_masks(a, density=0.4)
    fused = cls(a, masks, implementation="triton", master_weights=master, **cfg)
    plain = cls(b, masks, implementation="torch", master_weights=master, **cfg)
    for step in range(steps):
        grads = random_grads(a, seed=step, none_every=none_every, step=step, dtype=dtype)
        for p, q, g in zip(a, b, grads):
            p.grad = None if g is None else (grad_layout(g) if grad_layout else g.clone())
            q.grad = None if g is None else g.clone()
        fused.step()
        plain.step()
    return a, b, before, masks, fused, plain


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("cfg", ADAMW_CONFIGS)
def test_fused_adamw_matches_torch_path(device, cfg):
    a, b, before, masks, fused, plain = _run_both(MaskedAdamW, cfg, torch.float32, device)
    for p, q, p0, m in zip(a, b, before, masks):
        torch.testing.assert_close(p, q, **_tol(torch.float32))
        keep = unselected_mask(p, m)
        assert torch.equal(p.detach().reshape(-1)[keep], p0.reshape(-1)[keep])
        for key in fused.state[p]:
            torch.testing.assert_close(fused.state[p][key], plain.state[q][key], **_tol(torch.float32))


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("cfg", SGD_CONFIGS)
def test_fused_sgd_matches_torch_path(device, cfg):
    a, b, before, masks, _, _ = _run_both(MaskedSGD, cfg, torch.float32, device)
    for p, q, p0, m in zip(a, b, before, masks):
        torch.testing.assert_close(p, q, **_tol(torch.float32))
        keep = unselected_mask(p, m)
        assert torch.equal(p.detach().reshape(-1)[keep], p0.reshape(-1)[keep])


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("cls,cfg,ref_cls", [(MaskedAdamW, ADAMW_CONFIGS[2], torch.optim.AdamW), (MaskedSGD, SGD_CONFIGS[3], torch.optim.SGD)])
def test_fused_matches_torch_optim_on_selected_entries(device, cls, cfg, ref_cls):
    params = _params(torch.float32, device)
    masks = random_masks(params, density=0.4)
    ref = SelectedModel(params, masks)
    opt = cls(params, masks, implementation="triton", **cfg)
    ref_opt = ref_cls(ref.params, foreach=False, **cfg)
    for step in range(5):
        grads = random_grads(params, seed=step)
        for p, g in zip(params, grads):
            p.grad = g
        ref.set_grads(grads)
        opt.step()
        ref_opt.step()
    for p, m, q in zip(params, masks, ref.params):
        torch.testing.assert_close(selected(p, m), q.detach(), **_tol(torch.float32))


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("master", [False, True])
def test_fused_low_precision_and_masters(device, dtype, master):
    for cls, cfg in ((MaskedAdamW, ADAMW_CONFIGS[1]), (MaskedSGD, SGD_CONFIGS[3])):
        a, b, _, _, fused, plain = _run_both(cls, cfg, dtype, device, master=master)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, **_tol(dtype))
            if master:
                torch.testing.assert_close(fused.state[p]["master"], plain.state[q]["master"], **_tol(torch.float32))


@pytest.mark.parametrize("device", triton_devices())
def test_fused_runs_with_missing_grads_and_odd_grad_layouts(device):
    # grad None on some steps -> several runs with different step counts per launch;
    # transposed-stride grads -> the gradients are gathered into the flat buffer first
    def odd_layout(g):
        return g.t().contiguous().t() if g.dim() == 2 else g.clone()

    a, b, _, _, fused, plain = _run_both(
        MaskedAdamW, ADAMW_CONFIGS[2], torch.float32, device, steps=6, none_every=3, grad_layout=odd_layout
    )
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **_tol(torch.float32))
        assert float(fused.state[p]["step"]) == float(plain.state[q]["step"])


@pytest.mark.parametrize("device", triton_devices())
def test_fused_with_free_dense_grads_and_channels_last(device):
    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 36, 5))
        return net.to(device).to(memory_format=torch.channels_last)

    n1, n2 = build(), build()
    masks = random_masks(list(n1.parameters()), density=0.3)
    o1 = MaskedAdamW(n1.parameters(), masks, lr=1e-2, implementation="triton", free_dense_grads=True)
    o2 = MaskedAdamW(n2.parameters(), masks, lr=1e-2, implementation="torch")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, generator=g).to(device)
        for net, opt in ((n1, o1), (n2, o2)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(n1.parameters(), n2.parameters()):
        torch.testing.assert_close(p, q, **_tol(torch.float32))


def test_float64_groups_take_the_torch_path():
    p = torch.nn.Parameter(torch.randn(100, dtype=torch.float64))
    opt = MaskedAdamW([p], [torch.arange(0, 100, 7)], implementation="triton")
    assert not opt._use_triton(opt._layouts[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_triton_on_cuda():
    p = torch.nn.Parameter(torch.randn(100, device="cuda"))
    opt = MaskedAdamW([p], [torch.arange(0, 100, 7, device="cuda")])
    assert opt._use_triton(opt._layouts[0])
