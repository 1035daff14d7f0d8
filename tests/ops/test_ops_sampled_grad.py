"""The sparse-backward ops: ``fishkern::sampled_matmul`` (a weight gradient at chosen entries, aᵀ·b
sampled) and ``fishkern::sampled_embedding_grad`` (an embedding's gradient at chosen entries of
the batch's rows), every kernel against a float64 dense reference on fresh random inputs: odd
shapes, int32 / int64 and unsorted indices, k = 1 and k = all, no tokens, strided operands,
float64 / float32 / bf16 / fp16; float32 within the dot-product rounding bound derived below;
opcheck; argument errors. The Triton kernel runs under TRITON_INTERPRET=1 on CPU."""
import pytest
import torch
from torch.library import opcheck

from fishkern.ops import library
from fishkern.ops import sampled_embedding as se
from fishkern.ops import sampled_matmul as sm
from tests.conftest import HAS_CUDA, requires_triton, triton_devices

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available"))]
SHAPES = [(1, 1, 1), (5, 7, 3), (37, 19, 23), (130, 64, 33), (0, 4, 5), (300, 3, 129)]
UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-24, torch.float16: 2.0**-24}  # fp32 sums


def _operands(t, r, c, dtype, device="cpu", seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(t, r, generator=gen, dtype=torch.float64)
    b = torch.randn(t, c, generator=gen, dtype=torch.float64)
    if strided:  # column-major a, b a slice of a wider tensor
        a = a.t().contiguous().t()
        b = torch.cat([b, b], 1)[:, :c]
    return a.to(dtype).to(device), b.to(dtype).to(device)


def _index(r, c, k, seed=1, sort=True, dtype=torch.int64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(r * c, generator=gen)[:k]
    return (idx.sort().values if sort else idx).to(dtype).to(device)


def _check(got, a, b, index):
    """float64: 1e-12 relative to Σ|a||b|. float32 sums of T products (bf16 / fp16 operands are
    exact in fp32, their products too for bf16; fp32 products round once): the classic bound
    |ŝ - s| <= γ_T Σ_t |a_t b_t| with γ_T = T·u / (1 - T·u), u = 2^-24 (any summation order), plus
    one rounding of each fp32 product."""
    exact = sm.sampled_matmul_reference(a, b, index)
    scale = sm.sampled_matmul_reference(a.abs(), b.abs(), index)
    assert got.dtype == sm.accumulation_dtype(a.dtype)
    assert got.shape == (index.numel(),)
    if a.dtype == torch.float64:
        bound = 1e-12 * scale + 1e-300
    else:
        t, u = a.shape[0], UNIT[a.dtype]
        gamma = (t + 1) * u / (1 - (t + 1) * u)
        bound = gamma * scale + 1e-30
    err = (got.double().cpu() - exact.cpu()).abs()
    assert bool((err <= bound.cpu()).all()), f"max error {float((err - bound.cpu()).max())} over the bound"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_kernel_matches_dense_reference(dtype, shape):
    t, r, c = shape
    a, b = _operands(t, r, c, dtype, seed=t + r)
    for k, sort, idt in [(1, True, torch.int64), (max(1, r * c // 7), True, torch.int32), (r * c, False, torch.int64)]:
        index = _index(r, c, k, seed=k, sort=sort, dtype=idt)
        _check(sm.sampled_matmul(a, b, index), a, b, index)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_default_kernel_matches_dense_reference(dtype):
    for t, r, c in SHAPES:
        a, b = _operands(t, r, c, dtype, seed=3, strided=True)
        index = _index(r, c, max(1, r * c // 3), sort=False)
        _check(sm.sampled_matmul_default(a, b, index), a, b, index)


def test_cpu_kernel_strided_operands_and_long_sequences():
    a, b = _operands(2500, 9, 17, torch.float32, strided=True)  # more than one 1024-token tile
    index = _index(9, 17, 40)
    _check(sm.sampled_matmul(a, b, index), a, b, index)
    a64, b64 = _operands(2049, 5, 6, torch.float64)
    index = _index(5, 6, 30)
    _check(sm.sampled_matmul(a64, b64, index), a64, b64, index)


def test_cpu_kernel_is_registered_and_deterministic():
    assert library.has_kernel("sampled_matmul", "CPU")
    a, b = _operands(333, 40, 50, torch.float32)
    index = _index(40, 50, 500)
    first = sm.sampled_matmul(a, b, index)
    assert torch.equal(first, sm.sampled_matmul(a, b, index))


@pytest.mark.triton
@requires_triton
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_matches_dense_reference(device, dtype):
    for t, r, c, strided in [(5, 7, 3, False), (37, 19, 23, True), (70, 6, 130, False), (0, 3, 4, False), (1, 1, 1, False)]:
        a, b = _operands(t, r, c, dtype, device=device, seed=t, strided=strided)
        for k in {1, max(1, r * c // 5), r * c}:
            index = _index(r, c, k, seed=k, device=device, dtype=torch.int32 if k % 2 else torch.int64)
            _check(sm.sampled_matmul_triton(a, b, index), a, b, index)
    # transposed operands, as the op's CUDA kernel passes them
    a, b = _operands(45, 11, 13, dtype, device=device)
    index = _index(11, 13, 60, device=device)
    _check(sm.sampled_matmul_triton(a.t().contiguous().t(), b.t().contiguous().t(), index), a, b, index)


@pytest.mark.triton
@requires_triton
def test_triton_kernel_refuses_float64_and_bad_indices():
    a, b = _operands(4, 3, 2, torch.float64)
    with pytest.raises(ValueError, match="float64"):
        sm.sampled_matmul_triton(a, b, torch.tensor([0]))
    a, b = _operands(4, 3, 2, torch.float32, device=triton_devices()[0])
    with pytest.raises(RuntimeError, match="outside"):
        sm.sampled_matmul_triton(a, b, torch.tensor([6], device=a.device))


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_matmul_opcheck(device):
    for t, r, c in [(5, 7, 3), (0, 2, 2), (9, 1, 4)]:
        for dtype in (torch.float32, torch.float64):
            a, b = _operands(t, r, c, dtype, device=device)
            opcheck(sm.OP, (a, b, _index(r, c, max(1, r * c // 2), device=device)))


@pytest.mark.parametrize("kernel", ["op", "default"])
def test_sampled_matmul_errors_name_the_problem(kernel):
    f = sm.sampled_matmul if kernel == "op" else sm.sampled_matmul_default
    a, b = _operands(4, 3, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"index\[1\] = 6 is outside the 3 x 2 product"):
        f(a, b, torch.tensor([0, 6]))
    with pytest.raises(RuntimeError, match="outside"):
        f(a, b, torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="tokens"):
        f(a, b[:3], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="2-D"):
        f(a[0], b, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="a is .* but b is"):
        f(a, b.double(), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="int32 or int64"):
        f(a, b, torch.tensor([0.0]))
    with pytest.raises(RuntimeError, match="expected float32"):
        f(a.int(), b.int(), torch.tensor([0]))


# ---------------------------------------------------------------- embedding


def _embedding_case(v, d, t, k, dtype=torch.float64, seed=0, padding_idx=None):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (t,), generator=gen)
    if t > 3:
        ids[:3] = ids[3]  # repeated ids
        if padding_idx is not None:
            ids[-2:] = padding_idx
    grad = torch.randn(t, d, generator=gen, dtype=torch.float64).to(dtype)
    index = torch.randperm(v * d, generator=gen)[:k].sort().values
    return ids, grad, index


@pytest.mark.parametrize("padding_idx", [None, 0, 4])
@pytest.mark.parametrize("scale", [False, True])
def test_embedding_grad_matches_torch_backward(padding_idx, scale):
    for v, d, t, k in [(10, 3, 20, 7), (50, 8, 5, 400), (7, 1, 1, 1), (12, 5, 0, 9), (30, 4, 64, 120)]:
        ids, grad, index = _embedding_case(v, d, t, k, padding_idx=padding_idx, seed=v + t)
        got = se.sampled_embedding_grad(ids, grad, index, v, padding_idx, scale)
        want = se.sampled_embedding_grad_reference(ids, grad, index, v, padding_idx, scale)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-300)
        # entries of rows absent from the batch are exactly zero
        absent = ~torch.isin(torch.div(index, d, rounding_mode="floor"), ids)
        assert bool((got[absent] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_grad_low_precision_sums_in_fp32(dtype):
    ids, grad, index = _embedding_case(20, 6, 200, 60, dtype=dtype, seed=5)
    got = se.sampled_embedding_grad(ids, grad, index, 20)
    assert got.dtype == torch.float32
    want = se.sampled_embedding_grad_reference(ids, grad, index, 20)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_embedding_grad_int32_ids_and_index():
    ids, grad, index = _embedding_case(20, 6, 30, 60, seed=2)
    got = se.sampled_embedding_grad(ids.int(), grad, index.int(), 20)
    torch.testing.assert_close(got, se.sampled_embedding_grad_reference(ids, grad, index, 20), rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_opcheck(device):
    ids, grad, index = _embedding_case(10, 3, 20, 7)
    opcheck(se.OP, (ids.to(device), grad.to(device), index.to(device), 10, 2, True))
    opcheck(se.OP, (ids.to(device), grad.float().to(device), index.to(device), 10))


def test_embedding_errors_name_the_problem():
    ids, grad, index = _embedding_case(10, 3, 20, 7)
    with pytest.raises(RuntimeError, match="outside the 10 x 3 table"):
        se.sampled_embedding_grad(ids, grad, torch.tensor([30]), 10)
    with pytest.raises(RuntimeError, match=r"id is outside \[0, 5\)"):
        se.sampled_embedding_grad(ids, grad, index[:1], 5)
    with pytest.raises(RuntimeError, match="one row per id"):
        se.sampled_embedding_grad(ids, grad[:3], index, 10)
    with pytest.raises(RuntimeError, match="padding_idx"):
        se.sampled_embedding_grad(ids, grad, index, 10, 10)


def test_ops_are_declared():
    ops = library.defined_ops()
    assert "sampled_matmul" in ops and "sampled_embedding_grad" in ops
    assert library.has_kernel("sampled_matmul", "CUDA")
    assert sm.OP is library.op("sampled_matmul") and se.OP is library.op("sampled_embedding_grad")
