"""ShardedBatches and FisherSamples (fishkern.distributed.loop): W ranks see exactly one process's data."""
import pytest
import torch

from fishkern.distributed import FisherSamples, ShardedBatches, samples_of_rank


def _stream(sizes):
    start = 0
    out = []
    for n in sizes:
        out.append({"x": torch.arange(start, start + n), "labels": torch.arange(start, start + n) % 2, "meta": "m"})
        start += n
    return out


@pytest.mark.parametrize("sizes,world", [([8, 8, 5], 2), ([8, 8, 5], 3), ([16, 7], 3), ([4, 2, 1], 2)])
def test_sharded_batches_cover_each_global_batch(sizes, world):
    batches = _stream(sizes)
    per_rank = [list(ShardedBatches(batches, r, world)) for r in range(world)]
    kept = [b for b in batches if b["x"].numel() >= world]  # fewer rows than ranks: skipped everywhere
    for j, b in enumerate(kept):
        parts = [per_rank[r][j] for r in range(world)]
        assert torch.equal(torch.cat([p["x"] for p in parts]), b["x"])
        assert all(p["meta"] == "m" for p in parts)
        # DDP's mean of (local mean loss x scale) is the global mean loss
        assert abs(sum(p.loss_scale for p in parts) / world - 1.0) < 1e-12
        for p in parts:
            assert p.loss_scale == pytest.approx(world * p["x"].numel() / b["x"].numel())


@pytest.mark.parametrize("n,sizes,world", [(12, [8, 8, 8], 2), (16, [8, 8], 2), (7, [3, 3, 3], 3), (5, [16], 4)])
def test_fisher_samples_are_the_first_n(n, sizes, world):
    batches = _stream(sizes)
    got = []
    for r in range(world):
        xs = [b["x"] for b in FisherSamples(batches, n, r, world)]
        ids = torch.cat(xs) if xs else torch.empty(0, dtype=torch.int64)
        assert ids.numel() == samples_of_rank(n, r, world)
        got.append(ids)
    assert torch.equal(torch.cat(got), torch.arange(n))  # rank order = sample order, no gap, no overlap


def test_samples_of_rank_splits_exactly():
    for n in range(1, 40):
        for w in range(1, 6):
            shares = [samples_of_rank(n, r, w) for r in range(w)]
            assert sum(shares) == n and max(shares) - min(shares) <= 1
