"""The Fisher pass split across data-parallel ranks: one mask for all, computed once.

Every rank estimates the Fisher scores of its own share of the N samples (its shard of the
training data, as its DistributedSampler / accelerate loader yields it), the per-parameter scores
are summed over the ranks (an all-reduce in chunks: the Fisher information of N samples is the
sum over samples, so the split changes nothing but the order of the additions), and rank 0 alone
selects the top k and broadcasts the mask. Every rank then holds the same mask — by construction,
not by trusting that the ranks' floating-point sums and tie-breaks agree — at 1/W of the Fisher
cost per rank.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from ..fisher import estimate_fisher
from ..mask import FishMask
from ..mask.builders import check_selection, from_scores
from ._comm import Comm, require_initialized
from .masks import broadcast_mask

__all__ = ["fisher_mask_distributed", "samples_of_rank"]

CHUNK_BYTES = 64 << 20  # scores are reduced in flat chunks of at most this size (a model copy would not fit twice)


def samples_of_rank(num_samples: int, rank: int, world: int) -> int:
    """This rank's share of N samples: N // W, one more on the first N % W ranks."""
    return num_samples // world + (1 if rank < num_samples % world else 0)


def _all_reduce_scores(comm: Comm, scores: list[torch.Tensor]) -> None:
    """Sum the score tensors over the ranks, in place, a few flat chunks at a time."""
    i = 0
    while i < len(scores):
        j, size = i, 0
        while j < len(scores) and (j == i or size + scores[j].numel() * 4 <= CHUNK_BYTES):
            size += scores[j].numel() * 4
            j += 1
        flat = torch.cat([s.reshape(-1) for s in scores[i:j]]).to(comm.device)
        comm.all_reduce_sum("fisher_mask_distributed: sum of the Fisher scores", flat)
        off = 0
        for s in scores[i:j]:
            s.copy_(flat[off : off + s.numel()].view_as(s))
            off += s.numel()
        i = j


def fisher_mask_distributed(
    model: nn.Module,
    local_data: Iterable,
    density: float | None = None,
    num_samples: int = 1024,
    *,
    k: int | None = None,
    force: Sequence[str] | str = (),
    exclude: Sequence[str] | str = (),
    group=None,
    timeout=None,
    **fisher_kwargs,
) -> FishMask:
    """``fishkern.fisher_mask`` over N samples split across the ranks of ``group``: each rank reads
    its share (``samples_of_rank``) from ``local_data`` — its own part of the data — the scores are
    summed over the ranks, rank 0 selects the mask and broadcasts it. Call it on every rank.

    Which N samples: the first ``samples_of_rank(N, r, W)`` that ``local_data`` yields on rank r.
    They are the first N samples of one process's stream when each rank's ``local_data`` is
    ``FisherSamples(global_batches, N, r, W)`` (what ``fishkern.finetune`` passes), or when N is a
    multiple of the global batch and each rank reads its rows of every batch (a DistributedSampler,
    accelerate's loaders). A refusal or failure on any rank (bad arguments, data that runs out
    empty, NaN scores) is raised on every rank. The provenance records N and the world size."""
    require_initialized("fisher_mask_distributed")
    comm = Comm(group, timeout)
    names = [n for n, _ in model.named_parameters()]
    error, result = None, None
    try:  # everything that can fail on one rank only, before the first collective
        if num_samples < comm.world_size:
            raise ValueError(f"num_samples={num_samples} is smaller than the {comm.world_size} ranks: every rank needs a sample")
        named = list(model.named_parameters())
        check_selection({n: tuple(p.shape) for n, p in named}, density, k, force, exclude,
                        frozen=[n for n, p in named if not p.requires_grad])
        result = estimate_fisher(model, local_data, samples_of_rank(num_samples, comm.rank, comm.world_size), **fisher_kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised on this rank, reported on the others
        error = e
    comm.agree_ok("fisher_mask_distributed: the Fisher pass", error)
    trained = [n for n in names if n in result.scores]
    scores = [result.scores[n].float() for n in trained]
    _all_reduce_scores(comm, scores)
    seen = torch.tensor([result.num_samples], dtype=torch.float32)
    _all_reduce_scores(comm, [seen])
    mask, error = None, None
    if comm.rank == 0:
        try:
            reduced = dict(zip(trained, scores))
            params = dict(model.named_parameters())
            frozen = [n for n in names if n not in reduced]
            for n in frozen:
                reduced[n] = torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device)
            excluded = ([exclude] if isinstance(exclude, str) else list(exclude)) + frozen
            provenance = {
                "fisher_kind": result.kind,
                "fisher_samples": int(seen.item()),
                "fisher_world_size": comm.world_size,
                "fisher_implementation": result.implementation,
                "fisher_seconds": round(result.seconds, 3),
            }
            mask = from_scores({n: reduced[n] for n in names}, density, k=k, force=force, exclude=excluded,
                               provenance=provenance)
        except (ValueError, TypeError) as e:  # e.g. NaN scores from any rank
            error = e
    comm.agree_ok("fisher_mask_distributed: the mask selection on rank 0", error)
    return broadcast_mask(mask, src=0, group=group, timeout=timeout)
