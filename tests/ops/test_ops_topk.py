"""fishkern::topk_select (fishkern/topk/ops.py): declared in Python with a fake and the exact
plain-PyTorch radix select as its default kernel; native CPU / CUDA kernels beside it. opcheck on
every device present and with the default kernel; default and native kernels bit for bit on fresh
random inputs (odd sizes, many tensors, ties, ±0, ±inf, subnormals); loading before the first
dispatch; the installation without the native extension."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fishkern._native import native_available
from fishkern.ops import library
from fishkern.topk import global_topk, global_topk_reference
from fishkern.topk.fallback import NaNScoresError
from fishkern.topk.ops import native_kernel_for, topk_select_default

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
TOPK = torch.ops.fishkern.topk_select.default


def random_scores(g, kind: str, device="cpu"):
    """A fresh list of score tensors of odd sizes and a k in [0, total]."""
    n = int(torch.randint(1, 60 if kind == "many" else 6, (1,), generator=g))
    out = []
    for _ in range(n):
        shape = [int(torch.randint(0, 9 if kind == "many" else 300, (1,), generator=g))]
        if torch.randint(0, 3, (1,), generator=g) == 0:
            shape.append(int(torch.randint(1, 5, (1,), generator=g)))
        if kind == "ties":
            x = torch.randint(-2, 3, shape, generator=g).float()
        elif kind == "specials":
            pool = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.0, -1.0, 1e-45, -1e-45, 3.4e38])
            x = pool[torch.randint(0, pool.numel(), shape, generator=g)]
        elif kind == "tiny":
            x = torch.randn(shape, generator=g) * 1e-42  # subnormals: the low bits decide
        else:
            x = torch.randn(shape, generator=g)
        out.append(x.to(device))
    total = sum(x.numel() for x in out)
    ks = {0, total, int(torch.randint(0, total + 1, (1,), generator=g))}
    return out, sorted(ks)


def _same(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_the_kernel_the_dispatcher_picks(device):
    """Schema, fake, autograd registration, AOT dispatch (native where built, else the default)."""
    g = torch.Generator().manual_seed(6)
    for kind in ("normal", "ties", "many", "specials"):
        scores, ks = random_scores(g, kind, device)
        for k in ks[:2]:
            torch.library.opcheck(TOPK, (scores, k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["normal", "ties", "many", "specials", "tiny"])
def test_default_and_native_kernels_agree_bit_for_bit(device, kind):
    ok, why = native_kernel_for(torch.device(device))
    if not ok:
        pytest.skip(f"no native kernel for {device}: {why}")
    g = torch.Generator().manual_seed(hash(kind) % 2**31)
    for _ in range(10):
        scores, ks = random_scores(g, kind, device)
        for k in ks:
            native = TOPK(scores, k)
            default = topk_select_default(scores, k)
            assert _same(native, default), (kind, k)
            assert _same(default, global_topk_reference([s.cpu() for s in scores], k))


def test_the_default_kernel_refuses_nan_as_both_error_kinds():
    bad = [torch.randn(4), torch.tensor([1.0, float("nan")])]
    with pytest.raises(NaNScoresError, match="score tensor 1 contains NaN"):
        topk_select_default(bad, 1)
    for kind in (ValueError, RuntimeError):  # the fallback's old kind, and every torch op's
        with pytest.raises(kind, match="score tensor 1 contains NaN"):
            global_topk(bad, 1, backend="torch")


def test_the_fake_checks_what_needs_no_data():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()) as mode:  # data-dependent output sizes need a shape env
        out = TOPK([mode.from_tensor(torch.rand(5)), mode.from_tensor(torch.rand(2, 3))], 4)
    assert [o.dtype for o in out] == [torch.int64] * 2 and all(o.dim() == 1 for o in out)
    m = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    with pytest.raises(RuntimeError, match=r"k = 12 must lie in \[0, 11\]"):
        TOPK([m(5), m(2, 3)], 12)
    with pytest.raises(RuntimeError, match="score tensor 1 has dtype torch.float64"):
        TOPK([m(5), m(3, dtype=torch.float64)], 1)
    # the default kernel gives the same messages as the native ones
    with pytest.raises(RuntimeError, match="score tensor 1 has dtype torch.float64"):
        topk_select_default([torch.rand(5), torch.rand(3, dtype=torch.float64)], 1)
    with pytest.raises(RuntimeError, match=r"k = -1 must lie in \[0, 5\]"):
        topk_select_default([torch.rand(5)], -1)


def test_the_op_is_declared_once_in_python():
    assert "topk_select" in library.defined_ops()
    assert str(TOPK._schema) == "fishkern::topk_select(Tensor[] scores, int k) -> Tensor[]"
    assert library.has_kernel("topk_select", "CompositeExplicitAutograd")
    assert library.has_kernel("topk_select", "CPU") == native_available()
    assert TOPK([], 0) == []  # no tensor to dispatch on: the default kernel


_FIRST_DISPATCH = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import torch
    import fishkern.topk
    from fishkern import _native
    from fishkern.ops import library
    assert _native.native_info.cache_info().currsize == 0, "imported fishkern.topk loaded the library"
    assert not library.has_kernel("topk_select", "CPU")
    got = fishkern.topk.global_topk([torch.arange(10.0)], 3)
    assert [t.tolist() for t in got] == [[7, 8, 9]]
    assert _native.native_info.cache_info().currsize == 1
    assert library.has_kernel("topk_select", "CPU") == _native.native_available()
    print("ok")
""")


def test_the_native_kernels_are_registered_before_the_first_dispatch():
    out = subprocess.run([sys.executable, "-c", _FIRST_DISPATCH.format(root=ROOT)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"


_NO_NATIVE = textwrap.dedent("""
    import sys, warnings
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import pytest, torch
    from fishkern._native import NativeExtensionMissing, ensure_loaded
    from fishkern.ops import library
    from fishkern.topk import global_topk, global_topk_reference
    from test_ops_topk import random_scores, _same

    assert not ensure_loaded()
    assert not library.has_kernel("topk_select", "CPU")  # the dispatcher runs the default kernel
    op = torch.ops.fishkern.topk_select.default
    g = torch.Generator().manual_seed(21)
    for kind in ("normal", "ties", "many", "specials"):
        scores, ks = random_scores(g, kind)
        for k in ks:
            want = global_topk_reference(scores, k)
            assert _same(op(scores, k), want), (kind, k)
            assert _same(global_topk(scores, k, backend="torch"), want)
        torch.library.opcheck(op, (scores, ks[-1]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        global_topk([torch.randn(9)], 2)
        global_topk([torch.randn(9)], 2)
    said = [str(w.message) for w in caught if "plain-PyTorch path" in str(w.message)]
    assert len(said) == 1 and "FISHKERN_NO_NATIVE" in said[0], said  # once per process
    with pytest.raises(NativeExtensionMissing, match="no native kernel for cpu"):
        global_topk([torch.randn(9)], 2, backend="native")
    print("ok")
""")


def test_without_the_native_extension_the_op_runs_its_default_kernel():
    code = _NO_NATIVE.format(root=ROOT, tests=os.path.join(ROOT, "tests", "ops"))
    env = {**os.environ, "FISHKERN_NO_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
