"""The plain-PyTorch global top-k (fishkern/topk/fallback.py) gives the native op's answer exactly:
same indices, same tie rule (lowest global flat index), -0.0 == 0.0, ±inf as numbers, NaN refused."""
from __future__ import annotations

import pytest
import torch

from fishkern._native import native_available
from fishkern.topk import global_topk, global_topk_reference
from fishkern.topk.fallback import _keys, global_topk_torch


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_keys_preserve_the_order_of_floats():
    specials = torch.tensor([-float("inf"), -3.4e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 1.0, 3.4e38, float("inf")])
    keys = _keys(specials)
    assert keys.dtype == torch.int64 and int(keys.min()) >= 0 and int(keys.max()) < 2**32
    assert torch.equal(keys[4], keys[5])  # -0.0 ranks as +0.0
    order = torch.cat([keys[:4], keys[5:]])
    assert bool((order[1:] > order[:-1]).all())
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.argsort(_keys(x), stable=True), torch.argsort(x, stable=True))


def _random_case(g, kind):
    n = int(torch.randint(1, 6, (1,), generator=g))
    out = []
    for _ in range(n):
        shape = [int(torch.randint(0, 9, (1,), generator=g)) for _ in range(int(torch.randint(1, 3, (1,), generator=g)))]
        if kind == "normal":
            x = torch.randn(shape, generator=g)
        elif kind == "ties":
            x = torch.randint(-2, 3, shape, generator=g).float()
        elif kind == "specials":
            pool = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.0, -1.0, 1e-45])
            x = pool[torch.randint(0, pool.numel(), shape, generator=g)]
        else:  # subnormals and huge values: the low 16 bits decide
            x = torch.randn(shape, generator=g) * (1e-42 if kind == "tiny" else 1e37)
        if x.dim() == 2 and x.shape[0] > 1 and kind == "normal":
            x = x.t()  # non-contiguous
        out.append(x)
    total = sum(x.numel() for x in out)
    return out, int(torch.randint(0, total + 1, (1,), generator=g))


@pytest.mark.parametrize("kind", ["normal", "ties", "specials", "tiny", "huge"])
def test_matches_the_reference_on_random_inputs(kind):
    g = torch.Generator().manual_seed(hash(kind) % 2**31)
    for _ in range(60):
        scores, k = _random_case(g, kind)
        got = global_topk(scores, k, backend="torch")
        assert _same(got, global_topk_reference(scores, k)), (scores, k)
        assert sum(t.numel() for t in got) == k
        assert all(t.dtype == torch.int64 for t in got)


def test_ties_go_to_the_lowest_global_index_across_tensors():
    scores = [torch.tensor([5.0, 1.0, 1.0]), torch.tensor([1.0, 9.0]), torch.tensor([1.0])]
    got = global_topk(scores, 4, backend="torch")
    assert [t.tolist() for t in got] == [[0, 1, 2], [1], []]
    got = global_topk(scores, 5, backend="torch")
    assert [t.tolist() for t in got] == [[0, 1, 2], [0, 1], []]


def test_a_threshold_inside_one_16_bit_bucket():
    # values whose keys share the high 16 bits, so the second (low-digit) pass decides
    base = torch.tensor(1.0).view(torch.int32)
    x = (base + torch.arange(0, 4000, dtype=torch.int32)).view(torch.float32)
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(3))]
    for k in (1, 7, 1999, 3999, 4000):
        assert _same(global_topk([x], k, backend="torch"), global_topk_reference([x], k))


def test_edge_cases():
    assert [t.tolist() for t in global_topk_torch([torch.randn(4), torch.empty(0)], 0)] == [[], []]
    x = torch.randn(3, 4)
    assert global_topk([x], 12, backend="torch")[0].tolist() == list(range(12))
    with pytest.raises(ValueError, match="score tensor 1 contains NaN"):
        global_topk([torch.randn(3), torch.tensor([1.0, float("nan")])], 2, backend="torch")
    half = torch.randn(50, dtype=torch.bfloat16)
    assert _same(global_topk([half], 10, backend="torch"), global_topk_reference([half.float()], 10))


@pytest.mark.skipif(not native_available(), reason="compares with the native op, which this installation lacks")
def test_matches_the_native_op_at_a_larger_size():
    g = torch.Generator().manual_seed(11)
    scores = [torch.randn(300_000, generator=g), torch.randint(0, 50, (70_000,), generator=g).float(), torch.zeros(1000)]
    for k in (0, 1, 5_000, 123_457, 371_000):
        assert _same(global_topk(scores, k, backend="torch"), global_topk(scores, k, backend="native"))
