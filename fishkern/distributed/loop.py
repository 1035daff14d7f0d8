"""Data-parallel pieces of a training loop: every rank takes its share of each global batch.

``ShardedBatches`` wraps the batches one process would see (the same loader, the same seed on every
rank) and gives rank r the rows ``[r·n/W, (r+1)·n/W)`` of each batch, so W processes see exactly
the global batches of one process. Each local batch carries ``loss_scale = W · local rows / global
rows``: multiplying the local mean loss by it makes DDP's average of the ranks' gradients the
gradient of the global mean, also when the rows do not split evenly. A batch with fewer rows than
ranks is skipped on every rank (a rank with no rows would stall DDP).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from torch import Tensor


class LocalBatch(dict):
    """One rank's rows of a batch (a dict, usable as ``model(**batch)``) and its loss scale."""

    loss_scale: float = 1.0


def _rows(batch: Mapping) -> int:
    for v in batch.values():
        if isinstance(v, Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ValueError("a batch must hold at least one tensor with a batch dimension")


class ShardedBatches:
    """Rank ``rank`` of ``world``'s rows of every batch of ``batches`` (dicts of tensors, batch-first)."""

    def __init__(self, batches: Iterable, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[LocalBatch]:
        for batch in self.batches:
            if not isinstance(batch, Mapping):
                raise TypeError(f"ShardedBatches needs dict batches, got {type(batch).__name__}")
            n = _rows(batch)
            if n < self.world:
                continue  # the same decision on every rank: they all see the same global batch
            lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
            local = LocalBatch({k: v[lo:hi] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v
                                for k, v in batch.items()})
            local.loss_scale = self.world * (hi - lo) / n
            yield local


class FisherSamples:
    """Rank ``rank``'s block of the first ``num_samples`` samples of ``batches`` (the global stream,
    the same on every rank): global samples ``[lo, hi)`` with the blocks sized by
    ``fisher.samples_of_rank``. Passed to ``fisher_mask_distributed``, the ranks together score
    exactly the N samples one process would, whatever the batch size."""

    def __init__(self, batches: Iterable, num_samples: int, rank: int, world: int):
        from .fisher import samples_of_rank

        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.batches = batches
        self.lo = sum(samples_of_rank(num_samples, r, world) for r in range(rank))
        self.hi = self.lo + samples_of_rank(num_samples, rank, world)

    def __iter__(self) -> Iterator[dict]:
        start = 0
        for batch in self.batches:
            if start >= self.hi:
                return
            if not isinstance(batch, Mapping):
                raise TypeError(f"FisherSamples needs dict batches, got {type(batch).__name__}")
            n = _rows(batch)
            lo, hi = max(self.lo - start, 0), min(self.hi - start, n)
            if lo < hi:
                yield {k: v[lo:hi] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v
                       for k, v in batch.items()}
            start += n
