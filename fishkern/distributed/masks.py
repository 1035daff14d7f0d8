"""Moving FishMasks between ranks: serialised to tensors, broadcast or all-gathered.

A mask travels as two tensors: a uint8 tensor holding UTF-8 JSON (parameter names and shapes in
model order, per selected parameter its number of indices, the forced parameters, the provenance
and the digest) and one int64 tensor with all selected indices concatenated in that order. The
receiver rebuilds the FishMask and checks its digest against the one sent, so a corrupted transfer
is an error, not a silently different mask. Masks travel only when they are set (once up front, or
when a mask is recomputed), never per exchange.

``broadcast_mask`` and ``all_gather_masks`` start with the same header all-gather as every
SparseAverager operation (``Comm.agree``), so a rank that calls another fishkern collective, or
passes another source rank, makes every rank raise instead of crashing; a mask that arrives damaged
on one rank is reported on every rank (one more tiny all-gather).
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import Tensor

from ..mask.fishmask import FishMask, new_mask
from ._comm import OP_ALL_GATHER_MASKS, OP_BROADCAST_MASK, Call, Comm, int_arg, require_initialized
from .errors import DistributedError

__all__ = ["mask_to_tensors", "mask_from_tensors", "broadcast_mask", "all_gather_masks"]

_FORMAT = "fishkern.mask.wire"


def _wire_checksum(meta: dict, idx: Tensor) -> str:
    """sha256 over the canonical JSON of every metadata field and the index bytes: a transfer that
    changes anything — forced parameters and provenance too, not only the selection — is refused."""
    h = hashlib.sha256(b"fishkern-mask-wire-v2")
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":"), default=str).encode())
    h.update(idx.numpy().tobytes())
    return h.hexdigest()


def mask_to_tensors(mask: FishMask) -> tuple[Tensor, Tensor]:
    """(uint8 JSON metadata, int64 concatenated indices) on the CPU."""
    if not isinstance(mask, FishMask):
        raise TypeError(f"expected a FishMask, got {type(mask).__name__}")
    names = [n for n in mask.shapes if n in mask.indices and mask.indices[n].numel()]
    meta = {
        "format": _FORMAT,
        "shapes": [[n, list(s)] for n, s in mask.shapes.items()],
        "counts": [[n, int(mask.indices[n].numel())] for n in names],
        "forced": list(mask.forced),
        "provenance": json.loads(json.dumps(mask.provenance, default=str)),  # as the receiver will parse it
        "digest": mask.digest,
    }
    if names:
        idx = torch.cat([mask.indices[n].detach().to("cpu", torch.int64) for n in names])
    else:
        idx = torch.empty(0, dtype=torch.int64)
    meta["checksum"] = _wire_checksum(meta, idx)
    raw = json.dumps(meta).encode()
    meta_t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
    return meta_t, idx


def mask_from_tensors(meta: Tensor | bytes, indices: Tensor) -> FishMask:
    """Rebuild a FishMask from ``mask_to_tensors``' output. Every field is validated (bounded JSON,
    shapes, counts, sorted in-range indices, forced names) and checked against the checksum over
    all of it; anything else is a ``DistributedError`` naming the field."""
    from ..diff._validate import int_in, load_json, shape_of
    from ..mask.fishmask import mask_from_parts

    def fail(field_name: str, message: str) -> DistributedError:
        return DistributedError(f"received mask is damaged: field {field_name!r} {message}")

    raw = meta if isinstance(meta, (bytes, bytearray)) else meta.detach().cpu().numpy().tobytes()
    m = load_json(bytes(raw), "metadata", fail)
    if not isinstance(m, dict) or m.get("format") != _FORMAT:
        raise fail("format", f"must be {_FORMAT!r}")
    pairs = m.get("shapes")
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
        raise fail("shapes", "must be a list of [name, shape] pairs")
    shapes = {n: shape_of(sh, f"shapes[{n!r}]", fail) for n, sh in pairs}
    if len(shapes) != len(pairs):
        raise fail("shapes", "names a parameter twice")
    counts = m.get("counts")
    if not isinstance(counts, list) or not all(isinstance(c, list) and len(c) == 2 and c[0] in shapes for c in counts):
        raise fail("counts", "must be a list of [parameter name, count] pairs naming parameters of 'shapes'")
    counts = [(n, int_in(c, f"counts[{n!r}]", fail)) for n, c in counts]
    indices = indices.detach().to("cpu", torch.int64)
    if indices.dim() != 1 or sum(c for _, c in counts) != indices.numel():
        raise fail("indices", f"holds {indices.numel()} indices for {sum(c for _, c in counts)} announced")
    checksum = m.pop("checksum", None)
    if not isinstance(checksum, str) or checksum != _wire_checksum(m, indices):
        raise DistributedError("received mask is damaged: it does not match the checksum it was sent with (corrupted in transfer?)")
    selected, start = {}, 0
    for n, c in counts:
        selected[n] = indices[start : start + c]
        start += c
    mask = mask_from_parts({n: list(sh) for n, sh in shapes.items()}, m.get("forced"), m.get("provenance"), selected, fail)
    mask = new_mask(mask.shapes, mask.indices, mask.forced, mask.provenance)  # canonical index dtypes
    if mask.digest != m.get("digest"):
        raise DistributedError("received mask does not match the digest it was sent with (corrupted in transfer?)")
    return mask


def _broadcast_mask(
    comm: Comm, mask: FishMask | None, src: int, what: str
) -> tuple[FishMask | None, int, DistributedError | None]:
    """(the mask of group rank ``src`` on every rank, bytes this rank sent, the error if it
    arrived damaged here). The caller has checked ``src`` and the ranks' agreement; a damaged mask
    is returned as an error, not raised, so that the caller can make it every rank's error."""
    header = torch.zeros(2, dtype=torch.int64)
    meta = idx = None
    if comm.rank == src:
        if mask is None:
            header[0] = -1  # tell the others there is nothing coming, so nobody waits for it
        else:
            meta, idx = mask_to_tensors(mask)
            header[0], header[1] = meta.numel(), idx.numel()
    header = header.to(comm.device)
    comm.broadcast(f"{what} (header)", header, src)
    n_meta, n_idx = (int(x) for x in header.tolist())
    if n_meta < 0:
        raise DistributedError(f"{what}: rank {src} has no mask to broadcast (it passed None)")
    if comm.rank != src:
        meta = torch.empty(n_meta, dtype=torch.uint8)
        idx = torch.empty(n_idx, dtype=torch.int64)
    meta_d, idx_d = meta.to(comm.device), idx.to(comm.device)
    comm.broadcast(f"{what} (metadata)", meta_d, src)
    comm.broadcast(f"{what} (indices)", idx_d, src)
    if comm.rank == src:
        return mask, 16 + n_meta + 8 * n_idx, None
    try:
        return mask_from_tensors(meta_d.cpu(), idx_d.cpu()), 0, None
    except DistributedError as e:
        return None, 0, e


def _all_gather_masks(
    comm: Comm, mask: FishMask | None, what: str
) -> tuple[list[FishMask | None], int, DistributedError | None, list[int]]:
    """(every rank's mask, in rank order, bytes this rank sent, the error if one arrived damaged
    here, the ranks that passed None — the same list on every rank). A rank's None stays None; a
    mask that arrived damaged is None here too (and the error says so)."""
    if mask is None:
        meta, idx = None, torch.empty(0, dtype=torch.int64)
    else:
        meta, idx = mask_to_tensors(mask)
    metas = comm.all_gather_bytes(f"{what} (metadata)", None if meta is None else meta.numpy().tobytes())
    counts = comm.all_gather(f"{what} (sizes)", torch.tensor([idx.numel()], dtype=torch.int64, device=comm.device))
    counts = [int(c) for c in counts.view(-1).tolist()]
    width = max(counts)
    buf = torch.zeros(width, dtype=torch.int64)
    buf[: idx.numel()] = idx
    rows = comm.all_gather(f"{what} (indices)", buf.to(comm.device)).cpu()
    out, error = [], None
    for r, (m, c) in enumerate(zip(metas, counts)):
        if r == comm.rank:
            out.append(mask)
        elif m is None:
            out.append(None)
        else:
            try:
                out.append(mask_from_tensors(m, rows[r, :c]))
            except DistributedError as e:
                out.append(None)
                error = error or DistributedError(f"{what}: the mask of rank {r} arrived damaged: {e}")
    sent = 16 + (0 if meta is None else meta.numel()) + 8 * width
    return out, sent, error, [r for r, m in enumerate(metas) if m is None]


def broadcast_mask(mask: FishMask | None, src: int = 0, *, group=None, timeout=None) -> FishMask:
    """Rank ``src``'s FishMask on every rank of ``group`` (a collective: every rank calls it; the
    others may pass None). Rank ``src`` serialises its mask into two tensors (JSON metadata and
    the concatenated int64 indices) and broadcasts them; the others rebuild it and check its digest.
    ``src`` is a rank of ``group``. ``timeout``: seconds or timedelta (default: the group's)."""
    require_initialized("broadcast_mask")
    error = None
    try:
        if mask is not None and not isinstance(mask, FishMask):
            raise TypeError(f"mask must be a FishMask or None, got {type(mask).__name__}")
        if isinstance(src, bool) or not isinstance(src, int):
            raise TypeError(f"src must be a rank (int), got {src!r}")
    except TypeError as e:
        error = e
    device = None
    if error is None and mask is not None and mask.indices:
        device = next(iter(mask.indices.values())).device
    comm = Comm(group, timeout, device)
    what = f"broadcast_mask from rank {src}"
    if error is None and not 0 <= src < comm.world_size:
        error = ValueError(f"broadcast source rank {src} is not in this group of {comm.world_size} ranks")
    comm.agree(Call(OP_BROADCAST_MASK, what, args=(int_arg(src), 0)), error)
    out, _, damaged = _broadcast_mask(comm, mask, src, what)
    comm.agree_ok(what, damaged)
    return out


def all_gather_masks(mask: FishMask, *, group=None, timeout=None) -> list[FishMask]:
    """Every rank's FishMask, in rank order (a collective: every rank calls it with its own mask)."""
    require_initialized("all_gather_masks")
    comm = Comm(group, timeout)
    error = None
    if mask is not None and not isinstance(mask, FishMask):
        error = TypeError(f"mask must be a FishMask, got {type(mask).__name__}")
    comm.agree(Call(OP_ALL_GATHER_MASKS, "all_gather_masks"), error)
    out, _, damaged, missing = _all_gather_masks(comm, mask, "all_gather_masks")
    comm.agree_ok("all_gather_masks", damaged)
    if missing:
        raise DistributedError(f"all_gather_masks: rank(s) {missing} passed no mask")
    return out
