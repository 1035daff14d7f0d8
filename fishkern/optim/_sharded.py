"""Masks over sharded (DTensor) parameters, as FSDP2's ``fully_shard`` makes them.

A FISH mask holds row-major flat indices of the whole (global) parameter. FSDP2 shards every
parameter on dim 0 in ``torch.chunk`` pieces, so each rank's shard is one contiguous range of the
global flat index space: ``[row0 * row_numel, row1 * row_numel)``. The rank's part of the mask is
the indices in that range, shifted to start at 0 — the optimizer then works on the local tensor
(``DTensor._local_tensor``) exactly as on a plain parameter, holding the state of its own shard's
entries only.

Supported placements: ``Shard(0)`` on one mesh dimension, ``Replicate()`` on any others (FSDP2,
HSDP). Anything else (``Shard(d)`` for d > 0 as in tensor parallelism, ``Partial``, uneven
custom shardings) is refused at construction with a message that says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ShardInfo:
    """Where one rank's local shard sits in the global parameter."""

    global_shape: tuple[int, ...]
    row_begin: int  # first global row (dim 0) of the local shard
    row_end: int
    flat_begin: int  # its global flat index range [flat_begin, flat_end)
    flat_end: int
    mesh_dim: int | None  # the mesh dimension that shards dim 0 (None: replicated everywhere)
    group: object  # process group of that mesh dimension (for norms), None when replicated

    def localize(self, global_indices: Tensor) -> Tensor:
        """The sorted global flat indices that fall in this shard, as local flat indices."""
        keep = (global_indices >= self.flat_begin) & (global_indices < self.flat_end)
        return global_indices[keep] - self.flat_begin


def is_dtensor(t) -> bool:
    cls = type(t)
    # cheap test first: plain tensors and parameters are never DTensors (no torch.distributed import)
    if cls is Tensor or cls is torch.nn.Parameter:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor as a plain tensor sharing its storage (identity-stable)."""
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t.to_local()


def shard_info(p: Tensor, where: str) -> ShardInfo:
    """Validate a DTensor parameter's placements and locate its local shard."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    shape = tuple(p.shape)
    shard_dims = [d for d, pl in enumerate(placements) if isinstance(pl, Shard)]
    others = [pl for pl in placements if not isinstance(pl, (Shard, Replicate))]
    if others or len(shard_dims) > 1 or any(placements[d].dim != 0 for d in shard_dims):
        raise ValueError(
            f"{where}: DTensor parameter with placements {placements} is not supported; masked optimizers "
            "support parameters sharded on dim 0 over one mesh dimension (FSDP2 fully_shard, HSDP) and "
            "replicated ones"
        )
    local = local_tensor(p)
    rows = shape[0] if shape else 1
    row_numel = 1
    for s in shape[1:]:
        row_numel *= s
    if not shard_dims:
        return ShardInfo(shape, 0, rows, 0, p.numel(), None, None)
    md = shard_dims[0]
    n, r = mesh.size(md), mesh.get_local_rank(md)
    chunk = -(-rows // n)  # torch.chunk: ceil-sized pieces, the last ones shorter or empty
    begin, end = min(r * chunk, rows), min((r + 1) * chunk, rows)
    expected = (end - begin,) + shape[1:]
    if tuple(local.shape) != expected:
        raise ValueError(
            f"{where}: the local shard has shape {tuple(local.shape)} but an even dim-0 chunking of the global "
            f"shape {shape} over {n} ranks gives {expected} on rank {r}; this sharding is not supported"
        )
    return ShardInfo(shape, begin, end, begin * row_numel, end * row_numel, md, mesh.get_group(md))
