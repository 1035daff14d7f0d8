"""The native global top-k against the float64 reference: exact equality of the selected sets
(opcheck and the default kernel: tests/ops/test_ops_topk.py)."""
import pytest
import torch

from fishkern._native import native_available
from fishkern.topk import global_topk, global_topk_reference

pytestmark = pytest.mark.skipif(not native_available(), reason="fishkern's native extension is not built")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _assert_same(scores, k, device):
    got = global_topk([s.to(device) for s in scores], k)
    want = global_topk_reference(scores, k)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == torch.int64 and g.device.type == torch.device(device).type
        assert torch.equal(g.cpu(), w)
    assert sum(g.numel() for g in got) == k


def _ks(n):
    return sorted({0, 1, n // 7, n // 2, max(n - 1, 0), n} & set(range(n + 1)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_random_scores_of_odd_sizes(device, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [0, 1, 7, 1000, 4097, 1, 33]
    scores = [torch.randn(s, generator=g) * (10 ** (seed - 3)) for s in sizes]
    n = sum(sizes)
    for k in _ks(n):
        _assert_same(scores, k, device)


@pytest.mark.parametrize("device", DEVICES)
def test_heavy_ties_go_to_lowest_global_index(device):
    g = torch.Generator().manual_seed(1)
    scores = [torch.randint(-2, 3, (s,), generator=g).float() for s in (50, 3, 200, 0, 77)]
    n = sum(s.numel() for s in scores)
    for k in range(0, n + 1, 3):
        _assert_same(scores, k, device)


@pytest.mark.parametrize("device", DEVICES)
def test_all_equal_scores_take_the_degenerate_path(device):
    # one bucket holds everything: the memory-bounded rescan path
    scores = [torch.full((3000,), 0.25), torch.full((5000,), 0.25), torch.full((10,), 0.25)]
    for k in (0, 1, 2999, 3000, 3001, 7000, 8010):
        _assert_same(scores, k, device)
    scores[1][4000] = 1.0
    scores[2][3] = -1.0
    for k in (1, 2, 100, 8009, 8010):
        _assert_same(scores, k, device)


@pytest.mark.parametrize("device", DEVICES)
def test_negative_zero_and_infinities(device):
    scores = [
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), -0.0, 1e-45, -1e-45]),
        torch.tensor([float("inf"), 0.0, -float("inf"), 3.4e38, -3.4e38, -0.0]),
    ]
    for k in range(14):
        _assert_same(scores, k, device)


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors(device):
    g = torch.Generator().manual_seed(3)
    scores = [torch.rand(int(s), generator=g) for s in torch.randint(0, 40, (1000,), generator=g)]
    n = sum(s.numel() for s in scores)
    for k in (0, 1, n // 3, n - 1, n):
        _assert_same(scores, k, device)
    _assert_same(scores[:1], scores[0].numel() // 2, device)


@pytest.mark.parametrize("device", DEVICES)
def test_multichunk_tensor_with_ties_across_chunks(device):
    # tensors larger than the 1M-entry work chunk, with threshold ties spread over chunks
    g = torch.Generator().manual_seed(4)
    big = (torch.randint(0, 50, (2_500_000,), generator=g).float() / 7).to(torch.float32)
    scores = [big, torch.randn(300_000, generator=g)]
    for k in (1, 12_345, 1_400_000, 2_799_999):
        _assert_same(scores, k, device)


def test_shapes_dtypes_and_noncontiguous_inputs():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(13, 17, generator=g)
    b = torch.randn(9, 4, generator=g).t()  # non-contiguous: indices are row-major over (4, 9)
    c = torch.randn(6, generator=g).to(torch.bfloat16)
    got = global_topk([a, b, c], 40)
    want = global_topk_reference([a, b.contiguous(), c.float()], 40)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_bad_inputs():
    with pytest.raises(RuntimeError, match="score tensor 1 contains NaN"):
        global_topk([torch.rand(5), torch.tensor([0.0, float("nan")])], 2)
    with pytest.raises(ValueError, match=r"k = 11 must lie in \[0, 10\]"):
        global_topk([torch.rand(10)], 11)
    with pytest.raises(ValueError, match="must lie in"):
        global_topk([torch.rand(10)], -1)
    with pytest.raises(TypeError, match="float32"):
        global_topk([torch.rand(3, dtype=torch.float64)], 1)
    with pytest.raises(TypeError, match="list or tuple"):
        global_topk(torch.rand(3), 1)
    with pytest.raises(ValueError, match="one device"):
        global_topk([torch.rand(3), torch.rand(3, device="meta")], 1)
    with pytest.raises(ValueError, match="meta tensors"):
        global_topk([torch.rand(3, device="meta")], 1)
    assert global_topk([], 0) == []


def test_total_above_2_pow_31_entries():
    """64-bit offsets: 33 views of one 2**26-entry tensor make 2.2e9 scores (256 MiB of memory)."""
    n = 2**26
    t = torch.zeros(n)
    pos = torch.tensor([5, n - 1, 123_456, 40_000_000])
    t[pos] = torch.tensor([1000.0, 999.0, 998.0, 997.0])
    copies = 33
    assert copies * n > 2**31
    k = copies * 3 + 2  # three top values everywhere; the 4th goes to the first two copies (lowest index)
    got = global_topk([t] * copies, k)
    top3 = pos[:3].sort().values
    top4 = pos.sort().values
    for i, idx in enumerate(got):
        assert torch.equal(idx, top4 if i < 2 else top3), i
