"""fishkern::gather_masked / fishkern::scatter_masked_ (fishkern/ops/masked_copy.py): declared in
Python with a fake and a plain-PyTorch default kernel, native CPU kernels beside it. Every kernel
against an independent reference, bit for bit, on fresh random inputs (many tensors, odd and empty
shapes, permuted layouts, gaps between segments, int32 / int64 indices, bf16 / fp16 / fp32 / fp64
tensors, fp32 / fp64 buffers); opcheck on every device present; the default kernel against the
native one; the same errors from both."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from fishkern._native import native_available
from fishkern.ops import library
from fishkern.ops.masked_copy import (
    gather_masked,
    gather_masked_default,
    scatter_masked_,
    scatter_masked_default,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
needs_native = pytest.mark.skipif(not native_available(), reason="fishkern's native extension is not built")
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
GATHER = torch.ops.fishkern.gather_masked.default
SCATTER = torch.ops.fishkern.scatter_masked_.default


def _memory_order(t):
    """t's entries in memory order, by an independent route: permute the dims by decreasing stride."""
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.shape[d]), reverse=True)
    return t.permute(order).reshape(-1)


def _random_tensor(g, device):
    dtype = PARAM_DTYPES[int(torch.randint(0, 4, (1,), generator=g))]
    kind = int(torch.randint(0, 5, (1,), generator=g))
    if kind == 0:
        shape = (int(torch.randint(0, 40, (1,), generator=g)),)
    else:
        shape = tuple(int(torch.randint(1, 7, (1,), generator=g)) for _ in range(kind if kind < 4 else 4))
    t = (torch.randn(shape, generator=g) * 3).to(dtype)
    if kind == 2:
        t = t.t()  # transposed: memory order != row-major order
    elif kind == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.to(device)


def random_case(g, device, *, unique: bool):
    """(tensors, index, begins, ends, flat buffer dtype): segments in order with gaps, some empty."""
    n = int(torch.randint(1, 30, (1,), generator=g))
    tensors = [_random_tensor(g, device) for _ in range(n)]
    index_dtype = (torch.int32, torch.int64)[int(torch.randint(0, 2, (1,), generator=g))]
    parts, begins, ends, at = [], [], [], 0
    for t in tensors:
        gap = int(torch.randint(0, 3, (1,), generator=g))
        if gap:  # entries of no segment (filled with junk the kernels must not read)
            parts.append(torch.full((gap,), -7, dtype=torch.int64))
            at += gap
        m = int(torch.randint(0, t.numel() + 1, (1,), generator=g))
        if unique:
            idx = torch.randperm(t.numel(), generator=g)[:m]
        else:
            idx = torch.randint(0, max(t.numel(), 1), (m,), generator=g)[: m if t.numel() else 0]
        parts.append(idx)
        begins.append(at)
        at += idx.numel()
        ends.append(at)
    index = torch.cat(parts).to(index_dtype).to(device)
    flat_dtype = (torch.float32, torch.float64)[int(torch.randint(0, 2, (1,), generator=g))]
    return tensors, index, begins, ends, flat_dtype


def reference_gather(tensors, index, begins, ends, out):
    out = out.clone()
    for t, b, e in zip(tensors, begins, ends):
        out[b:e] = _memory_order(t.cpu())[index[b:e].cpu().long()].to(out.dtype)
    return out


def reference_scatter(tensors, index, begins, ends, values):
    out = []
    for t, b, e in zip(tensors, begins, ends):
        t = t.cpu().clone()
        mem = t.as_strided((t.numel(),), (1,))
        assert torch.equal(_memory_order(t), mem)  # the reference's idea of memory order is right
        mem[index[b:e].cpu().long()] = values[b:e].cpu().to(t.dtype)
        out.append(t)
    return out


def _bits(t):
    # reshape(-1) of a contiguous tensor: stride 1 even where a size-1 last dim had another one
    return t.cpu().contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.cpu().reshape(-1)


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(_bits(a), _bits(b))


def _kernels(device):
    """(name, gather, scatter) for every kernel that runs on `device` in this installation."""
    out = [("default", gather_masked_default, scatter_masked_default)]
    if device == "cpu" and native_available():
        out.append(("native", GATHER, SCATTER))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_every_kernel_matches_the_reference_bit_for_bit(device, seed):
    g = torch.Generator().manual_seed(100 + seed)
    for case in range(8):
        unique = case % 2 == 0  # repeated indices: fine for a gather, undefined for a scatter
        tensors, index, begins, ends, fd = random_case(g, device, unique=unique)
        size = index.numel()
        values = (torch.randn(size, generator=g, dtype=torch.float64) * 5).to(fd).to(device)
        want_out = reference_gather(tensors, index, begins, ends, torch.full((size,), 0.5, dtype=fd))
        want_tensors = reference_scatter(tensors, index, begins, ends, values)
        for name, gather, scatter in _kernels(device):
            out = torch.full((size,), 0.5, dtype=fd, device=device)  # entries outside segments stay
            gather(tensors, index, begins, ends, out)
            assert _same_bits(out, want_out), name
            if not unique:
                continue
            dsts = [t.clone() for t in tensors]
            scatter(dsts, index, begins, ends, values)
            for got, want in zip(dsts, want_tensors):
                assert _same_bits(got, want), name  # also: clone() kept each layout


@needs_native
def test_default_and_native_round_alike_where_rounding_is_hard():
    """fp64 / fp32 values next to the rounding boundaries of bf16 / fp16 (ties, subnormals,
    overflow, ±0, ±inf), written by both kernels: the same bits (round to nearest even)."""
    g = torch.Generator().manual_seed(7)
    pieces = []
    for dt in (torch.bfloat16, torch.float16):
        base = torch.randn(2000, generator=g).to(dt).double()
        ulp = (torch.nextafter(base.to(dt).float(), torch.tensor(float("inf"))).double() - base).abs()
        pieces += [base + ulp / 2, base - ulp / 2, base + ulp / 2 * (1 + 1e-9), base + ulp / 2 * (1 - 1e-9)]
    pieces.append(torch.tensor([0.0, -0.0, 1e-8, -1e-8, 6e-8, 1e-40, 65504.0, 65520.0, 1e39, float("inf"), -float("inf")],
                               dtype=torch.float64))
    values64 = torch.cat(pieces)
    n = values64.numel()
    index = torch.randperm(n, generator=g)
    for fd in (torch.float64, torch.float32):
        values = values64.to(fd)
        for dt in PARAM_DTYPES:
            a, b = torch.zeros(n, dtype=dt), torch.zeros(n, dtype=dt)
            SCATTER([a], index, [0], [n], values)
            scatter_masked_default([b], index, [0], [n], values)
            assert _same_bits(a, b), (fd, dt)
            assert _same_bits(b[index], values.to(dt))  # as Tensor.to rounds
            out_a, out_b = torch.empty(n, dtype=fd), torch.empty(n, dtype=fd)
            GATHER([a], index, [0], [n], out_a)
            gather_masked_default([b], index, [0], [n], out_b)
            assert _same_bits(out_a, out_b)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_on_random_cases(device):
    """Schema, fake, autograd registration, AOT dispatch, with the kernel the dispatcher picks on
    `device` (native on CPU when built; the default kernel elsewhere)."""
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        tensors, index, begins, ends, fd = random_case(g, device, unique=True)
        size = index.numel()
        torch.library.opcheck(GATHER, (tensors, index, begins, ends, torch.zeros(size, dtype=fd, device=device)))
        values = torch.randn(size, generator=g, dtype=fd).to(device)
        torch.library.opcheck(SCATTER, ([t.clone() for t in tensors], index, begins, ends, values))


_DEFAULT_KERNEL_CHECK = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import torch
    from fishkern._native import ensure_loaded
    from fishkern.ops import library
    from test_ops_masked_copy import random_case, reference_gather, reference_scatter, _same_bits
    import fishkern.ops.masked_copy as mc

    assert not ensure_loaded()
    for name in ("gather_masked", "scatter_masked_"):
        assert not library.has_kernel(name, "CPU"), name  # so the dispatcher runs the default kernel
    g = torch.Generator().manual_seed(12)
    for _ in range(4):
        tensors, index, begins, ends, fd = random_case(g, "cpu", unique=True)
        size = index.numel()
        out = torch.zeros(size, dtype=fd)
        torch.library.opcheck(mc._GATHER, (tensors, index, begins, ends, out))
        mc.gather_masked(tensors, index, begins, ends, out)
        assert _same_bits(out, reference_gather(tensors, index, begins, ends, torch.zeros(size, dtype=fd)))
        values = torch.randn(size, generator=g, dtype=fd)
        torch.library.opcheck(mc._SCATTER, ([t.clone() for t in tensors], index, begins, ends, values))
        dsts = [t.clone() for t in tensors]
        mc.scatter_masked_(dsts, index, begins, ends, values)
        assert all(_same_bits(a, b) for a, b in zip(dsts, reference_scatter(tensors, index, begins, ends, values)))
    print("ok")
""")


def test_opcheck_with_the_default_kernels_without_the_native_extension():
    """FISHKERN_NO_NATIVE=1: the ops exist, the dispatcher runs their default kernels, opcheck passes."""
    code = _DEFAULT_KERNEL_CHECK.format(root=ROOT, tests=os.path.join(ROOT, "tests", "ops"))
    env = {**os.environ, "FISHKERN_NO_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"


def _bad_calls():
    """(what, op kind, args, message fragment) for calls every kernel must refuse."""
    t = [torch.randn(10), torch.randn(3, 4)]
    idx = torch.tensor([1, 2, 0, 5, 11], dtype=torch.int32)
    cases = []
    for bad, where in ((-1, "index[4] = -1"), (12, "index[4] = 12"), (2**31 - 1, "index[4] = 2147483647")):
        i = idx.clone()
        i[4] = bad
        cases.append(("gather", (t, i, [0, 2], [2, 5], torch.zeros(5)), f"{where} is outside srcs[1], which has 12 elements"))
        cases.append(("scatter", (t, i, [0, 2], [2, 5], torch.zeros(5)), f"{where} is outside dsts[1], which has 12 elements"))
    gap = torch.tensor([1, 2, -7, 0, 5, 12], dtype=torch.int64)  # index[2] is in no segment: never read
    cases.append(("gather", (t, gap, [0, 3], [2, 6], torch.zeros(6)), "index[5] = 12 is outside srcs[1], which has 12"))
    cases.append(("scatter", (t, gap, [0, 3], [2, 6], torch.zeros(6)), "index[5] = 12 is outside dsts[1], which has 12"))
    wide = torch.tensor([3, 10], dtype=torch.int64)
    cases.append(("gather", ([t[0]], wide, [0], [2], torch.zeros(2)), "index[1] = 10 is outside srcs[0], which has 10 elements"))
    shared = torch.zeros(4, dtype=torch.int64)
    cases.append(("gather", ([t[0]], shared, [0], [4], shared.view(torch.float64)), "out shares memory with index"))
    cases.append(("scatter", ([shared.view(torch.float64)], shared, [0], [4], torch.zeros(4)),
                  "dsts[0] shares memory with index"))
    cases.append(("gather", ([t[0], torch.randn(1, 4).expand(3, 4)], idx, [0, 2], [2, 5], torch.zeros(5)),
                  "srcs[1] must be non-overlapping and dense"))
    cases.append(("scatter", (t, idx[::2], [0, 1], [1, 3], torch.zeros(3)), "index must be a contiguous 1-D tensor"))
    cases.append(("gather", (t, idx, [0, 2], [2, 5], torch.zeros(10)[::2]), "out must be a contiguous 1-D tensor"))
    cases.append(("scatter", (t, idx, [0, 1], [2, 5], torch.zeros(5)), "segment 1 starts at 1 before segment 0 ends"))
    cases.append(("gather", (t, idx, [0], [2], torch.zeros(5)), "srcs has 2 tensors but begins has 1"))
    return cases


@pytest.mark.parametrize("kernel", ["default", pytest.param("native", marks=needs_native)])
def test_bad_calls_get_the_same_clear_error_and_a_refused_scatter_changes_nothing(kernel):
    for kind, args, message in _bad_calls():
        if kernel == "native":
            fn = GATHER if kind == "gather" else SCATTER
        else:
            fn = gather_masked_default if kind == "gather" else scatter_masked_default
        before = [x.clone() for x in args[0]]
        with pytest.raises(RuntimeError, match=re.escape(message)):
            fn(*args)
        if kind == "scatter":
            assert all(torch.equal(a, b) for a, b in zip(args[0], before)), message


def test_meta_tensors_get_shape_checks_only():
    m = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    srcs, idx = [m(10), m(3, 4, dtype=torch.bfloat16)], m(4, dtype=torch.int64)
    GATHER(srcs, idx, [0, 2], [2, 4], m(4))
    SCATTER(srcs, idx, [0, 2], [2, 4], m(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"segment 1 .* is outside the index / out"):
        GATHER(srcs, idx, [0, 2], [2, 6], m(6))


def test_written_tensors_get_a_new_autograd_version():
    """Both ops bump the version of what they write (as in-place torch ops do), so autograd
    refuses a backward through values they overwrote instead of computing a wrong gradient."""
    x = torch.randn(5, requires_grad=True)
    y = x * 1
    loss = (y * y).sum()  # saves y
    v = y._version
    scatter_masked_([y], torch.tensor([1]), [0], [1], torch.zeros(1))
    assert y._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    out = torch.zeros(2)
    v = out._version
    gather_masked([x.detach()], torch.tensor([0, 4]), [0], [2], out)
    assert out._version > v and torch.equal(out, x.detach()[[0, 4]])


def test_the_wrappers_skip_empty_calls_but_refuse_mismatched_lists():
    gather_masked([], torch.empty(0, dtype=torch.int64), [], [], torch.empty(0))
    scatter_masked_([], torch.empty(0, dtype=torch.int64), [], [], torch.empty(0))
    with pytest.raises(RuntimeError, match="begins and ends must have one entry per tensor"):
        gather_masked([], torch.empty(0, dtype=torch.int64), [0], [0], torch.empty(0))


def test_the_ops_are_declared_once_in_python():
    ops = library.defined_ops()
    assert {"gather_masked", "scatter_masked_"} <= set(ops)
    assert str(GATHER._schema) == (
        "fishkern::gather_masked(Tensor[] srcs, Tensor index, int[] begins, int[] ends, Tensor(a!) out) -> ()"
    )
    assert str(SCATTER._schema) == (
        "fishkern::scatter_masked_(Tensor(a!)[] dsts, Tensor index, int[] begins, int[] ends, Tensor values) -> ()"
    )
    for name in ("gather_masked", "scatter_masked_"):
        assert library.has_kernel(name, "CompositeExplicitAutograd")
        assert library.has_kernel(name, "CPU") == native_available()
