"""The Triton Conv2d Fisher kernel (the CUDA kernel of fishkern::conv2d_fisher_acc_; under
TRITON_INTERPRET=1 on CPU, natively on CUDA) against the float64 per-sample autograd reference:
stride, padding, dilation, groups (depthwise included), 1x1 and non-square kernels, B = 1, odd
channel counts that leave tile edges, strided / channels_last inputs, bf16 / fp16 inputs,
accumulation onto a non-zero acc, the split (workspace) path, determinism, and the op's dispatch to
it. Shapes are tiny: the interpreter runs one program at a time."""
import pytest
import torch

from fishkern.ops import conv_fisher as cf
from tests.conftest import HAS_TRITON, requires_triton, triton_devices

if HAS_TRITON:  # the kernel module imports triton
    from fishkern.ops import conv_fisher_triton as cft

pytestmark = [pytest.mark.triton, requires_triton]


def _inputs(b, cin, h, w, cout, kernel, stride=1, padding=0, dilation=1, groups=1, dtype=torch.float32,
            device="cpu", seed=0):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    (sh, sw), (ph, pw), (dh, dw) = (cf._pair(v, "") for v in (stride, padding, dilation))
    ho, wo = cf.output_size(h, kh, sh, ph, dh), cf.output_size(w, kw, sw, pw, dw)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=gen).to(dtype).to(device)
    g = torch.randn(b, cout, ho, wo, generator=gen).to(dtype).to(device)
    acc = torch.zeros(cout, cin // groups, kh, kw, device=device)
    return acc, x, g, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _expected(acc, x, g, geo):
    return cf.conv2d_fisher_reference(x, g, acc.shape, **geo)


def _check(acc, expected, dtype=torch.float32):
    # fp32 products are exact in the kernel (no TF32): a few fp32 ulps relative over the sums, plus
    # an absolute floor for entries whose per-sample gradients nearly cancel.
    rtol = 1e-5 if dtype == torch.float32 else 1e-4
    atol = rtol * float(expected.abs().mean()) if expected.numel() else 0.0
    torch.testing.assert_close(acc.double().cpu(), expected.cpu(), rtol=rtol, atol=atol)


# (B, Cin, H, W, Cout, kernel, geometry): ResNet-style 3x3 / strided 3x3 / 1x1 downsample / 7x7 stem
# shrunk, dilation, non-square kernel and image, groups and depthwise, B = 1, output 1x1.
GEOMETRIES = [
    (2, 3, 9, 9, 5, 3, dict(padding=1)),
    (3, 4, 10, 7, 6, 3, dict(stride=2, padding=1)),
    (2, 5, 8, 8, 7, 1, dict(stride=2)),
    (2, 3, 11, 11, 4, 7, dict(stride=2, padding=3)),
    (2, 3, 9, 10, 4, 3, dict(padding=2, dilation=2)),
    (2, 4, 7, 9, 6, (1, 3), dict(stride=(1, 2), padding=(0, 1))),
    (2, 6, 6, 6, 9, 3, dict(padding=1, groups=3)),
    (2, 5, 6, 6, 5, 3, dict(padding=1, groups=5)),
    (1, 3, 5, 5, 4, 3, dict()),
    (2, 3, 3, 3, 2, 3, dict()),
]


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("case", GEOMETRIES, ids=lambda c: "x".join(map(str, c[:5])) + str(c[6]))
def test_matches_reference(device, case):
    b, cin, h, w, cout, kernel, geo = case
    acc, x, g, geo = _inputs(b, cin, h, w, cout, kernel, **geo, device=device)
    assert cf.conv2d_fisher_triton_(acc, x, g, **geo) is acc
    _check(acc, _expected(acc, x, g, geo))


@pytest.mark.parametrize("device", triton_devices())
def test_multi_tile_channels_and_positions(device):
    """OUT = 70 and IN = Cin * 9 = 99 need two tiles each at 64; 12x12 = 144 positions, several
    BLOCK_T steps with an edge."""
    acc, x, g, geo = _inputs(2, 11, 12, 12, 70, 3, padding=1, device=device, seed=1)
    cf.conv2d_fisher_triton_(acc, x, g, **geo)
    _check(acc, _expected(acc, x, g, geo))


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(device, dtype):
    acc, x, g, geo = _inputs(3, 4, 7, 7, 5, 3, padding=1, stride=2, dtype=dtype, device=device, seed=2)
    cf.conv2d_fisher_triton_(acc, x, g, **geo)
    # the reference reads the same rounded values (it upcasts to float64)
    _check(acc, _expected(acc, x, g, geo), dtype)


@pytest.mark.parametrize("device", triton_devices())
def test_strided_and_channels_last_inputs(device):
    b, cin, h, w, cout = 2, 4, 7, 8, 5
    acc, x, g, geo = _inputs(b, cin, h, w, cout, 3, padding=1, device=device, seed=3)
    gen = torch.Generator().manual_seed(4)
    x_wide = torch.randn(b, cin + 3, h, w + 2, generator=gen).to(device)[:, 1:cin + 1, :, 1:w + 1]
    views = [
        (x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)),
        (x_wide, g),
        (x, g.transpose(2, 3).contiguous().transpose(2, 3)),  # g's (Ho, Wo) not one flat axis
    ]
    for xv, gv in views:
        assert not (xv.is_contiguous() and gv.is_contiguous())
        before = (xv.clone(), gv.clone())
        acc = torch.zeros_like(acc)
        cf.conv2d_fisher_triton_(acc, xv, gv, **geo)
        _check(acc, _expected(acc, xv, gv, geo))
        assert torch.equal(xv, before[0]) and torch.equal(gv, before[1])


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("splits", [2, 3])
def test_sample_splits_accumulate_onto_acc(device, splits):
    """Several sample splits of unequal size (the workspace path), small blocks so tiles have edges,
    onto a non-zero acc; then a second batch on top."""
    acc, x, g, geo = _inputs(5, 3, 6, 6, 7, 3, padding=1, device=device, seed=5)
    acc0 = torch.rand(acc.shape, generator=torch.Generator().manual_seed(6)).to(device) * 10
    acc.copy_(acc0)
    cft._launch(acc, x, g, (1, 1), (1, 1), (1, 1), 1, splits=splits, block_o=16, block_i=16, block_t=16)
    expected = acc0.double() + _expected(acc, x, g, geo)
    _check(acc, expected)
    cf.conv2d_fisher_triton_(acc, x[:2], g[:2], **geo)
    _check(acc, expected + _expected(acc, x[:2], g[:2], geo))


@pytest.mark.parametrize("device", triton_devices())
def test_bit_identical_between_runs(device):
    acc, x, g, geo = _inputs(4, 3, 6, 6, 5, 3, padding=1, device=device, seed=7)
    runs = []
    for splits in (1, 3, 3):
        out = torch.zeros_like(acc)
        cft._launch(out, x, g, (1, 1), (1, 1), (1, 1), 1, splits=splits)
        runs.append(out)
    assert torch.equal(runs[1], runs[2])  # the same split count: the same bits
    _check(runs[0], _expected(acc, x, g, geo))


@pytest.mark.parametrize("device", triton_devices())
def test_empty_batch_and_no_output_positions_are_no_ops(device):
    acc, x, g, geo = _inputs(2, 3, 5, 5, 4, 3, device=device)
    acc.fill_(1.0)
    cf.conv2d_fisher_triton_(acc, x[:0], g[:0], **geo)
    assert torch.equal(acc.cpu(), torch.ones(acc.shape))
    acc2, x2, g2, geo2 = _inputs(2, 3, 2, 2, 4, 3, device=device)  # 3x3 kernel on a 2x2 image: Ho = 0
    assert g2.shape[2:] == (0, 0)
    acc2.fill_(1.0)
    cf.conv2d_fisher_triton_(acc2, x2, g2, **geo2)
    assert torch.equal(acc2.cpu(), torch.ones(acc2.shape))


def test_tile_config_shrinks_to_the_layer():
    c = cft.tile_config(5, 27, 9)
    assert (c.block_o, c.block_i, c.block_t) == (16, 32, 16)
    c = cft.tile_config(512, 4608, 16)
    assert (c.block_o, c.block_i, c.block_t) == (64, 64, 16)
    c = cft.tile_config(64, 576, 1024)
    assert (c.block_o, c.block_i, c.block_t) == (64, 64, 32)
    # the one config whose 8-warp bf16 / fp16 build spills on sm_80 (see tile_config) gets 4 warps
    assert cft.tile_config(512, 4608, 16).num_warps == 8 and cft.tile_config(512, 4608, 16, half=True).num_warps == 4


def test_argument_errors_and_float64():
    acc, x, g, geo = _inputs(2, 3, 5, 5, 4, 3)
    with pytest.raises(ValueError, match="g must have shape"):
        cf.conv2d_fisher_triton_(acc, x, g[:, :, 1:], **geo)
    with pytest.raises(ValueError, match="share one dtype"):
        cf.conv2d_fisher_triton_(acc, x, g.half(), **geo)
    with pytest.raises(ValueError, match="Triton conv Fisher kernel takes a float32 acc"):
        cf.conv2d_fisher_triton_(acc.double(), x.double(), g.double(), **geo)
    assert torch.equal(acc, torch.zeros_like(acc))


def test_op_on_cuda_dispatches_to_triton(monkeypatch):
    """The op's CUDA kernel calls the Triton launcher for form "auto" with an fp32 acc, and the default
    kernel for a forced form or float64 (run here on CPU tensors by calling the kernel function)."""
    calls = []
    monkeypatch.setattr(cf, "triton_usable_on", lambda device: True)
    monkeypatch.setattr(cft, "launch", lambda *a: calls.append("triton"))
    acc, x, g, geo = _inputs(2, 3, 5, 5, 4, 3, padding=1)
    args = (geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    cf._cuda_kernel(acc, x, g, *args)
    assert calls == ["triton"] and torch.equal(acc, torch.zeros_like(acc))
    cf._cuda_kernel(acc, x, g, *args, form="unfold")
    cf._cuda_kernel(acc.double(), x.double(), g.double(), *args)
    assert calls == ["triton"]
    _check(acc, _expected(acc, x, g, geo))
