"""The Triton Linear-layer Fisher kernel (under TRITON_INTERPRET=1 on CPU, natively on CUDA) against
a float64 per-sample reference: odd and multi-tile shapes, B = 1, T = 1, right-padding lengths,
strided inputs, bf16 / fp16, accumulation onto a non-zero acc, the split (workspace) path, tile
choice, and argument errors. The kernel lives in fishkern.ops.linear_fisher_triton (the CUDA kernel
of fishkern::linear_fisher_acc_); fishkern.fisher.linear_triton keeps its public names."""
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fishkern.fisher.linear_triton import linear_fisher_reference, linear_fisher_triton_
from tests.conftest import HAS_TRITON, requires_triton, triton_devices

if HAS_TRITON:  # the kernel module imports triton
    from fishkern.ops import linear_fisher_triton as lft


def _inputs(b, t, out_f, in_f, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, in_f, generator=gen).to(dtype).to(device)
    g = torch.randn(b, t, out_f, generator=gen).to(dtype).to(device)
    return x, g


def _check(acc, expected, dtype=torch.float32):
    # Exact-product fp32 sums: a few fp32 ulps relative, plus an absolute floor for entries where a
    # sample's gradient nearly cancels (its square's relative error is then large, its size not).
    rtol = 1e-5 if dtype == torch.float32 else 1e-4
    atol = rtol * float(expected.abs().mean()) if expected.numel() else 0.0
    torch.testing.assert_close(acc.double().cpu(), expected.cpu(), rtol=rtol, atol=atol)


# (B, T, OUT, IN): odd single-tile sizes, B = 1, T = 1, and several 64 x 64 tiles with T > BLOCK_T.
SHAPES = [(3, 13, 37, 29), (1, 13, 37, 29), (4, 1, 37, 29), (2, 40, 70, 67), (2, 5, 1, 1)]


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.triton
@requires_triton
def test_matches_reference(device, shape, with_lengths):
    b, t, out_f, in_f = shape
    x, g = _inputs(*shape, device=device)
    lengths = None
    if with_lengths:
        # 0, full length and values in between (cycled over the batch).
        lengths = torch.tensor([[0, t, max(t // 2, 1)][i % 3] for i in range(b)], device=device)
        if b == 1:
            lengths = torch.tensor([t - 1 if t > 1 else 0], device=device)
    acc = torch.zeros(out_f, in_f, device=device)
    out = linear_fisher_triton_(acc, x, g, lengths)
    assert out is acc
    _check(acc, linear_fisher_reference(x, g, lengths))


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.triton
@requires_triton
def test_half_inputs(device, dtype):
    b, t, out_f, in_f = 3, 21, 37, 70
    x, g = _inputs(b, t, out_f, in_f, dtype=dtype, device=device, seed=1)
    lengths = torch.tensor([21, 0, 9], dtype=torch.int32, device=device)
    acc = torch.zeros(out_f, in_f, device=device)
    linear_fisher_triton_(acc, x, g, lengths)
    # The reference reads the same rounded values (it upcasts x and g to float64).
    _check(acc, linear_fisher_reference(x, g, lengths), dtype)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.triton
@requires_triton
def test_padding_is_not_read_and_acc_accumulates(device):
    b, t, out_f, in_f = 3, 11, 37, 29
    x, g = _inputs(b, t, out_f, in_f, device=device, seed=2)
    lengths = torch.tensor([11, 0, 4], dtype=torch.int64, device=device)
    x_pad, g_pad = x.clone(), g.clone()
    for i, n in enumerate(lengths.tolist()):
        x_pad[i, n:] = float("nan")
        g_pad[i, n:] = float("inf")
    acc0 = torch.rand(out_f, in_f, generator=torch.Generator().manual_seed(3)).to(device) * 50
    acc = acc0.clone()
    linear_fisher_triton_(acc, x_pad, g_pad, lengths)
    assert torch.isfinite(acc).all()
    expected = acc0.double() + linear_fisher_reference(x, g, lengths)
    _check(acc, expected)
    # A second batch adds on top.
    linear_fisher_triton_(acc, x, g)
    _check(acc, expected + linear_fisher_reference(x, g))


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.triton
@requires_triton
def test_all_lengths_zero_leaves_acc_unchanged(device):
    x, g = _inputs(2, 7, 37, 29, device=device)
    acc0 = torch.rand(37, 29).to(device)
    acc = acc0.clone()
    linear_fisher_triton_(acc, x, g, torch.zeros(2, dtype=torch.int32, device=device))
    assert torch.equal(acc, acc0)


def _strided_views(b, t, out_f, in_f, device):
    gen = torch.Generator().manual_seed(4)
    # x: (T, B, IN) storage viewed as (B, T, IN), and a slice of a wider feature dim.
    x_tb = torch.randn(t, b, in_f + 5, generator=gen).to(device).transpose(0, 1)[..., 2:in_f + 2]
    # g: feature dim not unit-stride (stored as (B, OUT, T)); copied by the wrapper.
    g_ot = torch.randn(b, out_f, t, generator=gen).to(device).transpose(1, 2)
    # every other sample and every other token
    x_step = torch.randn(2 * b, 2 * t, in_f, generator=gen).to(device)[::2, ::2]
    g_step = torch.randn(2 * b, 2 * t, out_f, generator=gen).to(device)[::2, ::2]
    return [(x_tb, g_ot), (x_step, g_step), (x_tb, g_step), (x_step.transpose(1, 2).contiguous().transpose(1, 2), g_ot)]


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.triton
@requires_triton
def test_strided_inputs(device):
    b, t, out_f, in_f = 3, 9, 37, 29
    lengths = torch.tensor([9, 4, 0], device=device)
    for x, g in _strided_views(b, t, out_f, in_f, device):
        assert not (x.is_contiguous() and g.is_contiguous())
        x_before, g_before = x.clone(), g.clone()
        acc = torch.zeros(out_f, in_f, device=device)
        linear_fisher_triton_(acc, x, g, lengths)
        _check(acc, linear_fisher_reference(x, g, lengths))
        assert torch.equal(x, x_before) and torch.equal(g, g_before)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.triton
@requires_triton
def test_sample_splits_with_workspace(device, splits):
    """Several sample splits (the workspace path, used when the tiles alone do not fill the GPU) of
    unequal sizes, with small blocks so that tiles and T steps have edges."""
    b, t, out_f, in_f = 5, 19, 37, 29
    x, g = _inputs(b, t, out_f, in_f, device=device, seed=5)
    lengths = torch.tensor([19, 0, 3, 16, 17], device=device)
    acc0 = torch.rand(out_f, in_f).to(device)
    acc = acc0.clone()
    lft._launch(acc, x, g, lengths, splits=splits, block_o=16, block_i=16, block_t=16)
    _check(acc, acc0.double() + linear_fisher_reference(x, g, lengths))


@requires_triton
def test_num_splits_fills_the_gpu_without_empty_splits(monkeypatch):
    calls = []

    def props(index):
        calls.append(index)
        return SimpleNamespace(multi_processor_count=132)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    lft._sm_count.cache_clear()
    try:
        cuda = torch.device("cuda", 0)
        assert lft._num_splits(64, 4096, 4096 * 4096, cuda) == 1  # tiles alone fill it: no workspace
        assert lft._num_splits(1, 1, 16, cuda) == 1
        for batch in (1, 2, 7, 8, 33, 256):
            for tiles in (1, 9, 144, 263, 264):
                s = lft._num_splits(batch, tiles, tiles * 64 * 64, cuda)
                capped = s == lft._MAX_WORKSPACE_X or (s + 1) * tiles * 64 * 64 * 4 > lft._MAX_WORKSPACE_BYTES
                assert 1 <= s <= batch and (s * tiles >= 264 or s == batch or capped), (batch, tiles, s)
                assert s == 1 or (s * tiles * 64 * 64 * 4 <= lft._MAX_WORKSPACE_BYTES and s <= lft._MAX_WORKSPACE_X)
                assert (s - 1) * tiles < 264  # no more splits than it takes to fill the GPU
        # the SM count is read once per device, not per call
        assert calls == [0]
        lft._num_splits(8, 1, 16, torch.device("cuda", 1))
        assert calls == [0, 1]
        # the workspace bound: a 2048 x 2048 layer in one tile (a GPU with many SMs) gets 4 splits,
        # not 64, and never more than _MAX_WORKSPACE_X times acc
        assert lft._num_splits(256, 1, 2048 * 2048, cuda) == lft._MAX_WORKSPACE_BYTES // (4 * 2048 * 2048)
        assert lft._num_splits(256, 1, 16, cuda) == lft._MAX_WORKSPACE_X
    finally:
        lft._sm_count.cache_clear()  # the fake count must not outlive the test
    assert lft._num_splits(8, 1, 16, torch.device("cpu")) == 1


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("shape", [(0, 5, 3, 4), (2, 0, 3, 4), (2, 5, 0, 4), (2, 5, 3, 0)])
@requires_triton
def test_empty_inputs_are_a_no_op(device, shape):
    x, g = _inputs(*shape, device=device)
    acc = torch.ones(shape[2], shape[3], device=device)
    assert linear_fisher_triton_(acc, x, g) is acc
    assert torch.equal(acc.cpu(), torch.ones(shape[2], shape[3]))


@requires_triton
def test_argument_errors():
    x, g = _inputs(2, 5, 3, 4)
    acc = torch.zeros(3, 4)
    bad = [
        ((acc, x[0], g), "x must be a 3-D"),
        ((acc, x, g[0]), "g must be a 3-D"),
        ((acc, x, g[:1]), "must agree on"),
        ((acc, x, g[:, :4]), "must agree on"),
        ((acc, x, g.bfloat16()), "share one dtype"),
        ((acc, x.double(), g.double()), "acc must be float32 .float64 for float64 x and g"),
        ((torch.zeros(4, 3), x, g), "acc must have shape"),
        ((torch.zeros(3, 4, dtype=torch.float64), x, g), "acc must be float32"),
        ((torch.zeros(4, 3).t(), x, g), "acc must be contiguous"),
        ((torch.zeros(3, 4, device="meta"), x, g), "one device"),
        ((acc, x, g, torch.tensor([5])), "lengths must have shape"),
        ((acc, x, g, torch.tensor([[5, 5]])), "lengths must have shape"),
        ((acc, x, g, torch.tensor([5.0, 5.0])), "integer tensor"),
        ((acc, x, g, torch.tensor([True, True])), "integer tensor"),
        ((acc, x, g, torch.tensor([-1, 5])), r"\[0, T\]"),
        ((acc, x, g, torch.tensor([0, 6])), r"\[0, T\]"),
        ((acc, x, g, torch.tensor([0, 6], device="meta")), "lengths .* device"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            linear_fisher_triton_(*args)
    assert torch.equal(acc, torch.zeros(3, 4))
    # float64 is the op's (default kernel), not the Triton kernel's
    with pytest.raises(ValueError, match="Triton Fisher kernel takes a float32 acc"):
        linear_fisher_triton_(acc.double(), x.double(), g.double())


def test_reference_matches_materialised_per_sample_gradients():
    """The reference itself, against autograd per-sample gradients of a Linear layer."""
    b, t, out_f, in_f = 3, 6, 5, 4
    x, _ = _inputs(b, t, out_f, in_f, seed=6)
    x = x.double()
    lengths = torch.tensor([6, 2, 0])
    layer = torch.nn.Linear(in_f, out_f, bias=False).double()
    expected = torch.zeros(out_f, in_f, dtype=torch.float64)
    outs = layer(x)
    g = torch.randn(outs.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for i in range(b):
        n = int(lengths[i])
        (grad,) = torch.autograd.grad((layer(x[i, :n]) * g[i, :n]).sum(), layer.weight, allow_unused=True)
        grad = torch.zeros_like(layer.weight) if grad is None else grad
        expected += grad**2
    torch.testing.assert_close(linear_fisher_reference(x, g, lengths), expected)


def test_import_does_not_import_triton():
    check = ("import sys, fishkern, fishkern.fisher.linear_triton, fishkern.ops.linear_fisher; "
             "assert 'triton' not in sys.modules; print('ok')")
    env = {"TRITON_INTERPRET": "0", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# (3, 5, 9, 100): token strides 100 and 9, not multiples of 16, so rows cannot be read as vectors
# (the shape whose default launch spilled registers on sm_80 / sm_90; see tile_config).
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.triton
@requires_triton
def test_unaligned_rows_match_reference(device, dtype, sliced):
    b, t, out_f, in_f = 3, 5, 9, 100
    x, g = _inputs(b, t, out_f + 3, in_f + 3, dtype=dtype, device=device, seed=8)
    # views starting 3 elements in: base pointers that are not 16-byte aligned
    x, g = (x[..., 3:], g[..., 3:]) if sliced else (x[..., 3:].contiguous(), g[..., 3:].contiguous())
    assert lft.tile_config(x, g).num_stages == 1  # the unaligned config
    lengths = torch.tensor([5, 0, 2], device=device)
    for lens in (None, lengths):
        acc = torch.zeros(out_f, in_f, device=device)
        linear_fisher_triton_(acc, x, g, lens)
        _check(acc, linear_fisher_reference(x, g, lens), dtype)


@requires_triton
def test_launch_config_by_row_alignment(monkeypatch):
    """Rows not 16-aligned (stride or base pointer) launch with more warps and no pipelining; the
    aligned fast path keeps Triton's default stages. Checked on what _launch passes to the kernel."""
    launched = []
    monkeypatch.setattr(lft, "_linear_fisher_kernel", _FakeKernel(launched))
    aligned = _inputs(2, 32, 64, 48)
    odd = _inputs(3, 5, 9, 100)
    wide = torch.zeros(2, 32, 51)
    cases = [
        (aligned, {"num_warps": 4}),
        (odd, {"num_warps": 8, "num_stages": 1}),  # a 16 x 64 tile: 2 warps aligned, 8 here
        ((wide[..., 3:], aligned[1]), {"num_warps": 8, "num_stages": 1}),  # stride 51, pointer +12 B
        ((aligned[0], torch.zeros(2, 32, 67)[..., 3:]), {"num_warps": 8, "num_stages": 1}),
    ]
    for (x, g), expected in cases:
        launched.clear()
        lft._launch(torch.zeros(g.shape[2], x.shape[2]), x, g, None, splits=1)
        assert len(launched) == 1
        config = {k: v for k, v in launched[0].items() if k in ("num_warps", "num_stages")}
        assert config == expected, (tuple(x.shape), x.stride(), config)


@requires_triton
def test_tiles_follow_the_shape():
    """BLOCK_O / BLOCK_I: the next power of two of OUT / IN in [16, 64]; BLOCK_T 16 for T <= 16;
    warps by tile size (4 from 2048 entries, 2 from 512, else 1; unaligned rows: the swept table)."""
    cases = [  # (B, T, OUT, IN) -> (BLOCK_O, BLOCK_I, BLOCK_T, warps)
        ((2, 128, 1024, 1024), (64, 64, 32, 4)),
        ((2, 16, 1024, 1024), (64, 64, 16, 4)),
        ((2, 17, 16, 64), (16, 64, 32, 2)),
        ((2, 1, 16, 16), (16, 16, 16, 1)),
        ((2, 8, 32, 16), (32, 16, 16, 2)),
        ((2, 64, 64, 32), (64, 32, 32, 4)),
        ((2, 64, 1, 1), (16, 16, 32, 4)),  # rows of 1 element: unaligned
        ((3, 5, 9, 100), (16, 64, 16, 8)),  # unaligned
        ((3, 40, 30, 60), (32, 64, 32, 4)),  # unaligned
    ]
    for (b, t, out_f, in_f), (bo, bi, bt, warps) in cases:
        x, g = _inputs(b, t, out_f, in_f)
        c = lft.tile_config(x, g)
        assert (c.block_o, c.block_i, c.block_t, c.num_warps) == (bo, bi, bt, warps), ((b, t, out_f, in_f), c)
        # every config the wrapper chooses is exact against the reference (interpreter or GPU)
    x, g = _inputs(2, 3, 20, 40)
    acc = torch.zeros(20, 40)
    if torch.cuda.is_available():
        x, g, acc = x.cuda(), g.cuda(), acc.cuda()
    linear_fisher_triton_(acc, x, g)
    _check(acc, linear_fisher_reference(x, g))


class _FakeKernel:
    """Stands in for the jitted kernel: records each launch's keyword arguments."""

    def __init__(self, launched):
        self.launched = launched

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append(kwargs)
