"""SparseAverager: local SGD / federated averaging of the k masked entries over torch.distributed.

M workers (ranks) train with a FISH mask for H local steps each, then call ``exchange()``
together: the k selected values of every parameter are packed, in model order, into ONE flat
buffer and exchanged in ONE collective; the indices are known to every rank and never travel.
``dense_exchange()`` averages every entry (dense warm-up, dense baseline). Works with gloo (CPU) and
NCCL (GPU) under ``torchrun``; see ``fishkern.distributed`` for the overview and an example.

Exact arithmetic (A = float64 when the communication dtype C is float64, else float32; every
value is rounded to C to travel and widened to A on arrival; sums run over ranks 0, 1, ..., M-1
in that order; the result is rounded to each parameter's dtype when written):

* shared mask, ``op="mean"``:  θ ← (v_0 + v_1 + … + v_{M-1}) / M
* shared mask, ``op="sum"``:   θ ← b + ((0 + (v_0 − b)) + (v_1 − b) + …)
  where b is the value the entry had after the previous synchronisation (the same on every rank),
  i.e. the workers' local updates since then are added up (FedAvg with server learning rate M).
* disjoint masks (each rank r trains its own mask m_r; masks may overlap), over the union of the
  masks, where rank r's contribution to an entry outside m_r is b (it did not train it):
  ``op="mean"``: θ ← (c_0 + … + c_{M-1}) / M, c_r = v_r on m_r, b elsewhere — the average of the M
  full models (what the paper's simulation code computes; an update of one worker is scaled by 1/M);
  ``op="sum"``:  θ ← b + Σ_r (v_r − b) over the ranks whose mask holds the entry — the merge: each
  worker's own update is applied in full, overlapping updates add up.

With ``reduction="gather"`` (default) the values are exchanged with one all-gather and reduced
locally in rank order, so the result is bit-identical on every rank and reproducible by a
single-process computation, for any M and any backend. ``reduction="allreduce"`` uses one
all-reduce (sum) instead: less traffic for large M, but the summation order is the backend's
(gloo's ring adds in a different order than rank order for M ≥ 3, so results differ from the
rank-order sum in the last bit; gloo and NCCL still return the same bits to every rank).

Agreement: every collective method (construction, ``exchange``, ``dense_exchange``, ``set_mask``,
``verify``, ``sync_parameters``, ``assert_in_sync``) starts with one small header all-gather
(``_comm.Comm.agree``: operation, averager, counters, arguments, payload size, digests). Ranks that
called different methods, or the same one with different arguments, raise
``CollectiveMismatchError`` on every rank before any payload travels; a rank that must refuse
(its model changed, a bad argument) raises its error there and every other rank raises naming it.

The model may change its memory layout after construction (``model.to(memory_format=
torch.channels_last)``, also on some ranks only): indices are row-major and translated to the
current strides, so results are bit-identical to contiguous parameters. Changes of shape, dtype
or device, and parameters replaced by other tensor objects, are refused (``ModelChangedError``):
build the averager after moving or converting the model. Values are always read from and written
to each parameter's current storage (``p.data = ...`` of the same shape, dtype and device is
followed).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..mask.fishmask import FishMask
from ..optim.ddp_support import mark_locally_reduced
from ..mask.indices import flat_memory_view, is_dense_layout, memory_offsets
from ..ops.masked_copy import gather_masked, scatter_masked_
from ._comm import (
    OP_ASSERT_IN_SYNC,
    OP_CONSTRUCT,
    OP_DENSE_EXCHANGE,
    OP_EXCHANGE,
    OP_SET_MASK,
    OP_SYNC,
    OP_VERIFY,
    Call,
    Comm,
    as_timedelta,
    digest64,
    int_arg,
    rank_list,
    require_initialized,
)
from .errors import ConfigMismatchError, DistributedError, MaskMismatchError, ModelChangedError
from .masks import _all_gather_masks, _broadcast_mask

__all__ = ["SparseAverager"]

OPS = ("mean", "sum")
MODES = ("shared", "disjoint")
REDUCTIONS = ("gather", "allreduce")
COMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
STATE_FORMAT = "fishkern.sparse_averager"
STATE_VERSION = 1
_DEFAULT = object()


@dataclass
class _Group:
    """The parameters with entries on one device: one multi-tensor gather / scatter call
    (fishkern.ops.masked_copy) reads or writes all of them, whatever their dtypes."""

    device: torch.device
    members: list[int]  # parameter positions, in model order
    index: Tensor  # their memory offsets, concatenated (int64, on `device`)
    begins: list[int]  # member m's offsets are index[begins[m]:ends[m]]
    ends: list[int]
    spans_all: bool  # the only group: its buffer has the entry set's flat layout


@dataclass
class _EntrySet:
    """Entries of the model laid out flat: parameter j owns [starts[j], starts[j+1])."""

    idx: list[Tensor]  # row-major sorted flat indices (int64, parameter's device)
    mem: list[Tensor]  # the same as memory offsets for the strides in `strides` (views into a group's index)
    starts: list[int]
    strides: list[tuple[int, ...]]
    groups: list[_Group]

    @property
    def total(self) -> int:
        return self.starts[-1]

    def mem_for(self, j: int, p: Tensor) -> Tensor:
        """Parameter j's memory offsets for its current strides (recomputed after a layout change,
        e.g. model.to(memory_format=torch.channels_last); the layout is checked to be dense first).
        Written in place, so that the group's concatenated index follows."""
        st = p.stride()
        if st != self.strides[j]:
            self.mem[j].copy_(memory_offsets(self.idx[j], p))
            self.strides[j] = st
        return self.mem[j]


def _entry_set(params: list[Tensor], idx: list[Tensor]) -> _EntrySet:
    starts, out, strides = [0], [], []
    for p, i in zip(params, idx):
        i = i.to(device=p.device, dtype=torch.int64)
        out.append(i)
        strides.append(p.stride())
        starts.append(starts[-1] + i.numel())
    by_device: dict[torch.device, list[int]] = {}
    for j, p in enumerate(params):
        if out[j].numel():
            by_device.setdefault(p.device, []).append(j)
    mem = list(out)  # parameters without entries keep their empty index
    groups = []
    for device, members in by_device.items():
        index = torch.empty(sum(out[j].numel() for j in members), dtype=torch.int64, device=device)
        begins, ends, at = [], [], 0
        for j in members:
            n = out[j].numel()
            index[at : at + n] = memory_offsets(out[j], params[j])
            mem[j] = index[at : at + n]
            begins.append(at)
            ends.append(at + n)
            at += n
        groups.append(_Group(device, members, index, begins, ends, spans_all=len(by_device) == 1))
    return _EntrySet(out, mem, starts, strides, groups)


def _row_major(t: Tensor) -> Tensor:
    """A 1-D tensor of t's entries in row-major order: a view if t is contiguous, else a copy
    (dense operations then write it back with t.copy_): the order every rank agrees on, whatever
    each rank's memory layout."""
    return t.detach().view(-1) if t.is_contiguous() else t.detach().reshape(-1)


def _ownership(model: torch.nn.Module):
    """(parent module, attribute, child, name) for every submodule and (module, attribute,
    parameter, name) for every parameter: cheap to re-check (dict lookups) before each collective,
    to notice parameters or submodules replaced by other objects."""
    edges, owners = [], []
    for qual, mod in model.named_modules():
        for name, child in mod._modules.items():
            edges.append((mod, name, child, f"{qual}.{name}" if qual else name))
        for name, p in mod._parameters.items():
            if p is not None:
                owners.append((mod, name, p, f"{qual}.{name}" if qual else name))
    return edges, owners


def _mask_key(mask: FishMask | None, masks: list[FishMask] | None) -> str | None:
    if mask is None:
        return None
    if masks is None:
        return mask.digest
    h = hashlib.sha256(b"fishkern-mask-table-v1")
    for m in masks:
        h.update(bytes.fromhex(m.digest))
    return h.hexdigest()


def _default_comm_dtype(dtypes: set) -> torch.dtype:
    if len(dtypes) == 1:
        return next(iter(dtypes))
    return torch.float64 if torch.float64 in dtypes else torch.float32


class SparseAverager:
    """Average (or sum) the FISH-masked entries of a model across the ranks of a process group.

    Construction is a collective (like ``DistributedDataParallel``): every rank builds its
    averager with the same settings; it checks that the ranks agree (settings, model shapes and
    dtypes, and the mask digests) and raises on every rank if they do not.

    Args:
        model: the ``nn.Module`` every rank trains (same architecture on every rank). Its
            parameters, in ``named_parameters()`` order, define the packing order.
        mask: the ``FishMask`` (or None until a mask exists, e.g. during dense warm-up; then
            ``set_mask`` later). ``mode="shared"``: every rank must pass the same mask (the digests
            are compared) — or use ``set_mask(mask, broadcast_from=0)``. ``mode="disjoint"``: each
            rank passes its own mask; the masks are all-gathered once here (not per exchange).
        group: the process group (default: the world).
        op: ``"mean"`` or ``"sum"`` (see the module docstring for the exact arithmetic).
        mode: ``"shared"`` (one mask for all workers, the paper's best variant) or ``"disjoint"``
            (each worker its own mask; the exchange merges them over their union).
        reduction: ``"gather"`` (one all-gather + a local sum in rank order: deterministic and
            bit-reproducible; default) or ``"allreduce"`` (one all-reduce; the backend's order).
        comm_dtype: the dtype values travel in. Default: the parameters' dtype (float32 when they
            mix dtypes, float64 if any is float64). ``torch.float32`` for bf16/fp16 models with fp32
            master weights keeps the masters' precision.
        timeout: seconds or a ``timedelta`` for each collective of this averager (default: the
            process group's, set with ``init_process_group(timeout=...)``). A rank that does not
            join within it gives a ``CollectiveTimeoutError`` naming the operation on the others.
        optimizers: masked optimizers created with ``master_weights=True``: their fp32 master copies
            are read (sent instead of the rounded bf16/fp16 values) and overwritten with the
            exchanged values, so the next step continues from the average instead of undoing it.
            Not needed otherwise: MaskedAdamW / MaskedSGD read the parameters at each step.
            Moment / momentum buffers stay per worker (as in local SGD and FedAvg).
        dense_chunk_numel: entries per collective in ``dense_exchange`` / ``sync_parameters``
            (bounds the extra memory: M × chunk with ``reduction="gather"``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mask: FishMask | None = None,
        *,
        group=None,
        op: str = "mean",
        mode: str = "shared",
        reduction: str = "gather",
        comm_dtype: torch.dtype | None = None,
        timeout=None,
        optimizers: Iterable[torch.optim.Optimizer] = (),
        dense_chunk_numel: int = 1 << 24,
    ):
        # Argument errors are held back until every rank has joined the header below, so that a
        # rank refusing its arguments does not leave the others waiting in a collective.
        error, named, tmo, opts = None, [], None, []
        try:
            if op not in OPS:
                raise ValueError(f"op must be one of {OPS}, got {op!r}")
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
            if reduction not in REDUCTIONS:
                raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
            if comm_dtype is not None and comm_dtype not in COMM_DTYPES:
                raise ValueError(f"comm_dtype must be one of {COMM_DTYPES} or None, got {comm_dtype!r}")
            if mask is not None and not isinstance(mask, FishMask):
                raise TypeError(f"mask must be a FishMask or None, got {type(mask).__name__}")
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            if isinstance(dense_chunk_numel, bool) or not isinstance(dense_chunk_numel, int) or dense_chunk_numel < 1:
                raise ValueError(f"dense_chunk_numel must be a positive integer, got {dense_chunk_numel!r}")
            named = list(model.named_parameters())
            if not named:
                raise ValueError("the model has no parameters")
            for name, p in named:
                if p.dtype not in COMM_DTYPES:
                    raise TypeError(f"parameter {name!r} has dtype {p.dtype}; use float32, bfloat16, float16 or float64")
                if not is_dense_layout(p.shape, p.stride()):
                    raise ValueError(f"parameter {name!r} does not cover its memory densely (strides {p.stride()})")
            tmo = as_timedelta(timeout)
            opts = list(optimizers)
            # local SGD: every rank trains on its own gradient, so masked optimizers may gather it
            # during backward (under DDP they wait for DDP's reduction instead; optim/ddp_support.py)
            mark_locally_reduced(p for _, p in named)
        except (ValueError, TypeError) as e:
            error = e
        if error is not None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise error  # no process group: nobody to tell
        require_initialized("SparseAverager")
        self._comm = Comm(group, tmo, named[0][1].device if named else None)
        self.group = group
        self.rank, self.world_size = self._comm.rank, self._comm.world_size
        self._instance = -1  # its number among the averagers of this group, agreed on just below
        self._calls = 0  # collective calls of this averager so far (the header's sequence number)
        rows = self._agree(OP_CONSTRUCT, "SparseAverager construction", error, proposal=self._comm.propose_instance())
        self._instance = self._comm.take_instance(rows)
        self.model = model
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.op, self.mode, self.reduction = op, mode, reduction
        self.comm_dtype = comm_dtype or _default_comm_dtype({p.dtype for p in self.params})
        self.acc_dtype = torch.float64 if self.comm_dtype == torch.float64 else torch.float32
        self.optimizers = opts
        self.dense_chunk_numel = dense_chunk_numel
        # what the model looked like at construction: checked before every collective
        self._sig = [(p.shape, p.dtype, p.device) for p in self.params]
        self._strides = [p.stride() for p in self.params]  # last strides seen (checked dense)
        self._edges, self._owners = _ownership(model)
        described = [[n, list(s), str(d)] for n, (s, d, _) in zip(self.names, self._sig)]
        self._params_digest = digest64(json.dumps(described).encode())
        self._key: str | None = None  # mask_key of the installed mask(s)
        self._touched: list[int] = []  # positions of the parameters an exchange reads or writes
        # counters (all per rank; what this rank handed to the collectives)
        self.exchanges = 0
        self.dense_exchanges = 0
        self.sparse_bytes_sent = 0
        self.dense_bytes_sent = 0
        self.mask_bytes_sent = 0
        self.last_exchange_bytes = 0
        # mask state
        self._mask: FishMask | None = None  # shared: the mask; disjoint: this rank's own mask
        self._masks: list[FishMask] | None = None  # disjoint: every rank's mask
        self._set: _EntrySet | None = None  # the entries an exchange writes (shared: mask; disjoint: union)
        self._own: _EntrySet | None = None  # disjoint: this rank's entries (what it sends)
        self._pos: list[Tensor] | None = None  # disjoint: rank r's entries as positions in _set's flat order
        self._base: Tensor | None = None  # values at the last synchronisation (sum op, disjoint mode)
        self._install(mask, "SparseAverager construction")

    # ------------------------------------------------------------------ properties
    @property
    def mask(self) -> FishMask | None:
        """The mask this rank trains (shared: everyone's; disjoint: this rank's own)."""
        return self._mask

    @property
    def masks(self) -> list[FishMask] | None:
        """Every rank's mask in rank order (disjoint mode; shared mode: the one mask M times)."""
        if self._mask is None:
            return None
        return list(self._masks) if self._masks is not None else [self._mask] * self.world_size

    @property
    def mask_key(self) -> str | None:
        """What the ranks must agree on: the mask digest (shared) or a digest over the table of
        per-rank mask digests (disjoint)."""
        return self._key

    @property
    def k(self) -> int:
        """Entries this rank trains."""
        return 0 if self._mask is None else self._mask.k

    @property
    def k_exchanged(self) -> int:
        """Entries an exchange writes on every rank (shared: k; disjoint: the union's size)."""
        return 0 if self._set is None else self._set.total

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def _esize(self) -> int:
        return torch.empty(0, dtype=self.comm_dtype).element_size()

    @property
    def bytes_per_exchange(self) -> int:
        """Payload one rank hands to the collective of one ``exchange()``: k·4 bytes in fp32 for a
        shared mask (disjoint: max_r k_r values with "gather", the union with "allreduce")."""
        if self._set is None:
            return 0
        if self.mode == "shared":
            return self._set.total * self._esize
        if self.reduction == "gather":
            return max(m.k for m in self._masks) * self._esize
        return self._set.total * self._esize

    @property
    def dense_bytes_per_exchange(self) -> int:
        """Payload of one ``dense_exchange()`` of the parameters: |θ|·4 bytes in fp32."""
        return self.numel * self._esize

    @property
    def bytes_sent(self) -> int:
        """Everything this rank handed to collectives for exchanges (sparse + dense)."""
        return self.sparse_bytes_sent + self.dense_bytes_sent

    def stats(self) -> dict[str, Any]:
        """Counters and sizes, for logs. ``*_wire_estimate``: bytes a rank actually puts on the
        network with ring algorithms ((M−1)·payload for an all-gather, 2(M−1)/M·payload for an
        all-reduce), an estimate — the backend picks its algorithm."""
        m = self.world_size
        factor = (m - 1) if self.reduction == "gather" else 2 * (m - 1) / m
        per = self.bytes_per_exchange
        return {
            "world_size": m,
            "mode": self.mode,
            "op": self.op,
            "reduction": self.reduction,
            "comm_dtype": str(self.comm_dtype).replace("torch.", ""),
            "k": self.k,
            "k_exchanged": self.k_exchanged,
            "numel": self.numel,
            "exchanges": self.exchanges,
            "dense_exchanges": self.dense_exchanges,
            "bytes_per_exchange": per,
            "dense_bytes_per_exchange": self.dense_bytes_per_exchange,
            "reduction_vs_dense": (self.dense_bytes_per_exchange / per) if per else None,
            "sparse_bytes_sent": self.sparse_bytes_sent,
            "dense_bytes_sent": self.dense_bytes_sent,
            "mask_bytes_sent": self.mask_bytes_sent,
            "bytes_sent": self.bytes_sent,
            "bytes_per_exchange_wire_estimate": int(per * factor),
        }

    # ------------------------------------------------------------------ masks
    def set_mask(self, mask: FishMask | None, broadcast_from=_DEFAULT, *, optimizers=None) -> FishMask:
        """Switch to a new mask (e.g. recomputed every R exchanges). A collective.

        shared mode: by default rank ``broadcast_from=0`` serialises its mask to tensors and
        broadcasts it; the other ranks may pass None and receive it. ``broadcast_from=None``: every
        rank passes its own mask and the digests are compared. disjoint mode: every rank passes its
        own new mask (``broadcast_from`` must be None or left out) and the masks are all-gathered.

        The entries' current values become the new synchronisation point (call it right after an
        exchange, when the ranks agree). ``set_mask(None, broadcast_from=None)`` on every rank
        removes the mask (back to dense exchanges only); a rank passing None while the others pass
        a mask makes every rank raise. Returns the mask now in effect on this rank: rebuild the
        optimizer with it (``MaskedAdamW(model.named_parameters(), mask, ...)``) and pass the new
        optimizer in ``optimizers`` if it keeps master weights. Counters are kept.
        """
        if broadcast_from is _DEFAULT:
            broadcast_from = 0 if self.mode == "shared" else None
        error, opts = None, None
        try:
            if mask is not None and not isinstance(mask, FishMask):
                raise TypeError(f"mask must be a FishMask or None, got {type(mask).__name__}")
            if optimizers is not None:
                opts = list(optimizers)
            if broadcast_from is not None:
                if self.mode != "shared":
                    raise ValueError("disjoint mode: each rank sets its own mask; pass broadcast_from=None")
                if isinstance(broadcast_from, bool) or not isinstance(broadcast_from, int):
                    raise TypeError(f"broadcast_from must be a rank (int) or None, got {broadcast_from!r}")
                if not 0 <= broadcast_from < self.world_size:
                    raise ValueError(
                        f"broadcast source rank {broadcast_from} is not in this group of {self.world_size} ranks"
                    )
            error = self._model_error("set_mask", True)
        except (ValueError, TypeError) as e:
            error = e
        self._agree(OP_SET_MASK, "set_mask", error, args=(int_arg(broadcast_from), 0))
        if opts is not None:
            self.optimizers = opts
        received = None
        if broadcast_from is not None:
            mask, sent, received = _broadcast_mask(
                self._comm, mask, broadcast_from, f"set_mask: broadcast from rank {broadcast_from}"
            )
            self.mask_bytes_sent += sent
        self._install(mask, "set_mask", received)
        return self._mask

    def _install(self, mask: FishMask | None, what: str, error: Exception | None = None) -> None:
        """Lay out a mask (disjoint: all-gather every rank's mask first), verify across ranks, and
        only then switch to it. A local set-up error (or ``error``, e.g. a mask that arrived damaged)
        is held back until every rank has reported, so that every rank raises and none is left
        waiting in a collective."""
        masks = None
        if self.mode == "disjoint":  # every rank takes part, also one passing None (then all fail)
            gathered, sent, damaged, absent = _all_gather_masks(
                self._comm, mask, f"{what}: all_gather of the per-rank masks"
            )
            self.mask_bytes_sent += sent
            error = error or damaged  # raised through _verify, on every rank
            if absent and len(absent) < len(gathered):  # every rank sees the same list: all raise
                raise DistributedError(
                    f"{what}: disjoint mode: {rank_list(absent)} passed no mask while the others passed theirs"
                )
            masks = gathered if mask is not None else None
        state = (None, None, None)
        try:
            if mask is not None and error is None:
                state = self._layout(mask, masks)
        except Exception as e:  # reported on every rank by _verify
            error = e
        key = None if error is not None else _mask_key(mask, masks)
        self._verify(what, error, key, 0 if mask is None or error is not None else mask.k)
        self._mask, self._masks, self._key = mask, masks, key
        self._set, self._own, self._pos = state
        es = self._set
        self._touched = [] if es is None else [j for j in range(len(self.params)) if es.starts[j + 1] > es.starts[j]]
        self._capture_base()

    def _layout(self, mask: FishMask, masks: list[FishMask | None] | None):
        own = mask.mask_indices(self.model)
        if masks is None:
            return _entry_set(self.params, own), None, None
        missing = [r for r, m in enumerate(masks) if m is None]
        if missing:
            raise DistributedError(f"disjoint mode: {rank_list(missing)} passed no mask")
        per_rank = [m.mask_indices(self.model) for m in masks]
        union = []
        for j, p in enumerate(self.params):
            parts = [pr[j].to(torch.int64) for pr in per_rank if pr[j].numel()]
            union.append(torch.unique(torch.cat(parts)) if parts else torch.empty(0, dtype=torch.int64, device=p.device))
        uset = _entry_set(self.params, union)
        pos = []
        for pr in per_rank:
            pieces = [
                torch.searchsorted(uset.idx[j], pr[j].to(torch.int64)) + uset.starts[j]
                for j in range(len(self.params))
                if pr[j].numel()
            ]
            p_r = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
            pos.append(p_r.to(self._comm.device))
        return uset, _entry_set(self.params, own), pos

    # ------------------------------------------------------------------ verification
    def _config(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "op": self.op,
            "reduction": self.reduction,
            "comm_dtype": str(self.comm_dtype),
            "world_size": self.world_size,
            # no strides: every operation is independent of each rank's memory layout
            "parameters": [[n, list(p.shape), str(p.dtype)] for n, p in zip(self.names, self.params)],
            "buffers": [[n, list(b.shape), str(b.dtype)] for n, b in self._float_buffers()],
        }

    def verify(self) -> None:
        """Check (a collective) that every rank holds the same mask — FishMask.digest() compared
        through an all-gather of a fixed-size byte tensor — and the same settings and model
        shapes. Raises ``MaskMismatchError`` / ``ConfigMismatchError`` naming the ranks, on every
        rank (``ModelChangedError`` if a rank's model changed since construction). Runs at
        construction and in ``set_mask``; call it again whenever you like."""
        self._agree(OP_VERIFY, "verify", self._model_error("verify", True))
        self._verify("verify", None, self.mask_key, self.k)

    def _verify(self, what: str, error: Exception | None, key: str | None, k: int) -> None:
        # (no barrier first: the header all-gather that starts every operation already showed
        # that every rank is here, in the same operation)
        row = torch.zeros(73, dtype=torch.uint8)
        row[0] = 1 if error is not None else 0
        if key is not None:
            row[1:33] = torch.tensor(list(bytes.fromhex(key)), dtype=torch.uint8)
        config_digest = hashlib.sha256(json.dumps(self._config(), sort_keys=True).encode()).digest()
        row[33:65] = torch.tensor(list(config_digest), dtype=torch.uint8)
        row[65:73] = torch.tensor(list(int(k).to_bytes(8, "little")), dtype=torch.uint8)
        rows = self._comm.all_gather(f"{what}: all_gather of mask digests", row.to(self._comm.device)).cpu()
        failed = [r for r in range(self.world_size) if int(rows[r, 0])]
        if error is not None:
            raise error
        if failed:
            raise DistributedError(
                f"{what}: {rank_list(failed)} could not set up the mask (see the error raised there); "
                f"this is rank {self.rank}"
            )
        configs = [bytes(rows[r, 33:65].tolist()) for r in range(self.world_size)]
        if len(set(configs)) > 1:
            self._raise_config_mismatch(what, configs)
        keys = [bytes(rows[r, 1:33].tolist()).hex() for r in range(self.world_size)]
        ks = [int.from_bytes(bytes(rows[r, 65:73].tolist()), "little") for r in range(self.world_size)]
        groups: dict[str, list[int]] = {}
        for r, key_r in enumerate(keys):
            groups.setdefault(key_r, []).append(r)
        if len(groups) > 1:
            none = "0" * 64
            parts = []
            for key_r, ranks in sorted(groups.items(), key=lambda kv: kv[1][0]):
                label = "no mask" if key_r == none else f"digest {key_r[:12]} (k={ks[ranks[0]]:,})"
                parts.append(f"{rank_list(ranks)}: {label}")
            if self.mode == "shared":
                hint = (
                    "every rank must train with the same mask in mode='shared': build it identically (same scores, "
                    "same seed) or let rank 0 send it with averager.set_mask(mask, broadcast_from=0)"
                )
                subject = "FishMask digests differ across ranks"
            else:
                hint = "every rank must set its own mask at the same time (set_mask on all ranks)"
                subject = "the ranks disagree about the table of per-worker masks"
            raise MaskMismatchError(f"{what}: {subject} — {'; '.join(parts)}; {hint}", groups)

    def _raise_config_mismatch(self, what: str, digests: list[bytes]) -> None:
        mine = self._config()
        texts = self._comm.all_gather_bytes(f"{what}: all_gather of settings", json.dumps(mine).encode())
        groups: dict[bytes, list[int]] = {}
        for r, d in enumerate(digests):
            groups.setdefault(d, []).append(r)
        cfgs = [json.loads(t) for t in texts]
        parts = []
        for ranks in groups.values():
            c = cfgs[ranks[0]]
            diff = [key for key in mine if any(cfgs[o].get(key) != c.get(key) for o in range(self.world_size))]
            shown = {key: c[key] for key in diff if key not in ("parameters", "buffers")}
            if "parameters" in diff:
                digest = hashlib.sha256(json.dumps(c["parameters"]).encode()).hexdigest()[:12]
                shown["parameters"] = f"{len(c['parameters'])} parameters (names, shapes, dtypes: {digest})"
            if "buffers" in diff:
                shown["buffers"] = f"{len(c['buffers'])} floating-point buffers"
            parts.append(f"{rank_list(ranks)}: {shown}")
        raise ConfigMismatchError(
            f"{what}: the ranks built their SparseAverager differently — {'; '.join(parts)}. Every rank needs the same "
            "mode, op, reduction, comm_dtype and the same model (parameter names, shapes and dtypes)"
        )

    def assert_in_sync(self, *, buffers: bool = False) -> None:
        """Check (a collective) that every rank holds bit-identical parameters (and floating-point
        buffers); raises ``DistributedError`` naming the ranks that differ. Costs one hash of the
        model per rank and an all-gather of 32 bytes (after the header). Values are hashed in
        row-major order, so ranks with different memory layouts compare equal when in sync."""
        h = hashlib.sha256()
        error = self._model_error("assert_in_sync", True)
        if error is None:  # hashed before the header: a failure here is every rank's error
            try:
                tensors = self.params + ([b for _, b in self._float_buffers()] if buffers else [])
                for t in tensors:
                    # reshape(-1), not contiguous(): a "contiguous" (N, C, 1, 1) channels_last weight
                    # keeps a last stride != 1, and then cannot be viewed as bytes
                    h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            except (RuntimeError, TypeError) as e:
                error = DistributedError(f"assert_in_sync: could not hash the parameters on rank {self.rank}: {e}")
        self._agree(OP_ASSERT_IN_SYNC, "assert_in_sync", error, args=(int(bool(buffers)), 0))
        row = torch.tensor(list(h.digest()), dtype=torch.uint8).to(self._comm.device)
        rows = self._comm.all_gather("assert_in_sync: all_gather of parameter hashes", row).cpu()
        groups: dict[bytes, list[int]] = {}
        for r in range(self.world_size):
            groups.setdefault(bytes(rows[r].tolist()), []).append(r)
        if len(groups) > 1:
            parts = [f"{rank_list(rs)}: {d.hex()[:12]}" for d, rs in groups.items()]
            raise DistributedError(f"the ranks hold different parameters — {'; '.join(parts)}")

    # ------------------------------------------------------------------ agreement and local checks
    def _settings_digest(self) -> int:
        """Digest of what every rank must share for any operation (live attributes, cheap)."""
        text = f"{self.mode}|{self.op}|{self.reduction}|{self.comm_dtype}|{self.world_size}|{self._params_digest}"
        return digest64(text.encode())

    def _agree(self, opcode: int, name: str, error: BaseException | None, **fields) -> list[list[int]]:
        """The header of one collective method: see ``Comm.agree``. Counted on every rank, also
        when it raises, so that the ranks stay in step after an error they all raised."""
        call = Call(opcode, name, instance=self._instance, seq=self._calls, **fields)
        self._calls += 1
        return self._comm.agree(call, error)

    def _model_error(self, what: str, all_params: bool) -> ModelChangedError | None:
        """Whether the model still is what this averager was built for (identity of every
        parameter and submodule; shape, dtype and device of the parameters that the operation
        touches; a dense memory layout). A layout change alone is fine: offsets follow it."""
        for parent, name, child, qual in self._edges:
            if parent._modules.get(name) is not child:
                return ModelChangedError(
                    f"{what}: submodule {qual!r} was replaced after the SparseAverager was built; its parameters are "
                    "no longer the ones the averager holds. Build the SparseAverager after changing the model"
                )
        for module, name, p, qual in self._owners:
            if module._parameters.get(name) is not p:
                return ModelChangedError(
                    f"{what}: parameter {qual!r} was replaced by another tensor object after the SparseAverager was "
                    "built (load_state_dict(assign=True), a new nn.Parameter, or torch.__future__."
                    "set_overwrite_module_params_on_conversion); build the SparseAverager after changing the model"
                )
        for j in range(len(self.params)) if all_params else self._touched:
            p = self.params[j]
            sig = (p.shape, p.dtype, p.device)
            if sig != self._sig[j]:
                was = self._sig[j]
                pairs = (("shape", tuple(was[0]), tuple(sig[0])), ("dtype", was[1], sig[1]), ("device", was[2], sig[2]))
                changes = [f"{label} {a} -> {b}" for label, a, b in pairs if a != b]
                return ModelChangedError(
                    f"{what}: parameter {self.names[j]!r} changed its {', '.join(changes)} after the SparseAverager was "
                    "built (e.g. model.to(...) or a replaced .data); build the SparseAverager (and the optimizer) after "
                    "moving or converting the model"
                )
            st = p.stride()
            if st != self._strides[j]:
                if not is_dense_layout(p.shape, st):
                    return ModelChangedError(
                        f"{what}: parameter {self.names[j]!r} no longer covers its memory densely (strides {st}); "
                        "an expanded or sliced view cannot be averaged"
                    )
                self._strides[j] = st
        return None

    # ------------------------------------------------------------------ reading and writing entries
    def _master_links(self) -> dict[int, list[tuple[Tensor, Tensor, Tensor]]]:
        """id(parameter) -> [(fp32 master slice, its row-major indices, its memory offsets)] for the
        registered optimizers' initialised master copies."""
        links: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
        for opt in self.optimizers:
            layouts, runtimes = getattr(opt, "_layouts", None), getattr(opt, "_runtime", None)
            if not layouts or not runtimes:
                continue
            for lay, rt in zip(layouts, runtimes):
                master = rt.buffers.get("master")
                if master is None:
                    continue
                for i, p in enumerate(lay.params):
                    if lay.k(i) and p.dtype != lay.state_dtype and rt.steps[i] > 0:
                        links.setdefault(id(p), []).append(
                            (master[lay.slice(i)], lay.indices[i].to(torch.int64), lay.mem_indices[i].to(torch.int64))
                        )
        return links

    def _group_tensors(self, es: _EntrySet, g: _Group) -> list[Tensor]:
        tensors = [self.params[j].detach() for j in g.members]
        for j, t in zip(g.members, tensors):
            es.mem_for(j, t)  # follow a layout change (checked dense by _model_error)
        return tensors

    def _read(self, es: _EntrySet, links) -> Tensor:
        """The entries' current values (masters where there are), widened to A, flat, on the
        communication device: one gather_masked call per device holding parameters."""
        out = torch.empty(es.total, dtype=self.acc_dtype, device=self._comm.device)
        for g in es.groups:
            tensors = self._group_tensors(es, g)
            direct = g.spans_all and g.device == out.device
            buf = out if direct else torch.empty(g.index.numel(), dtype=self.acc_dtype, device=g.device)
            gather_masked(tensors, g.index, g.begins, g.ends, buf)
            for m, j in enumerate(g.members):
                vals = buf[g.begins[m] : g.ends[m]]
                for master, midx, _ in links.get(id(self.params[j]), ()):
                    at = torch.searchsorted(midx, es.idx[j]).clamp_(max=midx.numel() - 1)
                    hit = midx[at] == es.idx[j]
                    vals[hit] = master[at[hit]].to(self.acc_dtype)
                if not direct:
                    out[es.starts[j] : es.starts[j + 1]] = vals.to(out.device)
        return out

    def _write(self, es: _EntrySet, values: Tensor, links) -> None:
        """Write A-dtype values into the entries (rounded to each parameter's dtype, as Tensor.to
        does) and, unrounded, into the master copies of the same entries: one scatter_masked_ call
        per device holding parameters."""
        values = values.contiguous()
        for g in es.groups:
            tensors = self._group_tensors(es, g)
            if g.spans_all and g.device == values.device:
                buf = values
            else:
                buf = torch.cat([values[es.starts[j] : es.starts[j + 1]] for j in g.members]).to(g.device)
            scatter_masked_(tensors, g.index, g.begins, g.ends, buf)
            for m, j in enumerate(g.members):
                vals = buf[g.begins[m] : g.ends[m]]
                for master, midx, _ in links.get(id(self.params[j]), ()):
                    at = torch.searchsorted(es.idx[j], midx).clamp_(max=vals.numel() - 1)
                    hit = es.idx[j][at] == midx
                    master[hit] = vals[at[hit]].to(master.dtype)

    def _capture_base(self) -> None:
        """Remember the exchanged entries' values at this synchronisation point (needed by
        op='sum', and by disjoint mode for the entries a rank does not train)."""
        if self._set is not None and (self.op == "sum" or self.mode == "disjoint"):
            with torch.no_grad():
                self._base = self._read(self._set, self._master_links())
        else:
            self._base = None

    def _require_mask(self, what: str) -> None:
        if self._mask is None:
            raise DistributedError(f"{what}: no mask is set; pass one to SparseAverager(...) or call set_mask(mask)")

    # ------------------------------------------------------------------ the exchanges
    @torch.no_grad()
    def exchange(self) -> int:
        """Exchange the masked entries (a collective; every rank calls it after its H local
        steps) and write the mean / sum into the model on every rank. Entries outside the mask(s)
        are never read or written. Returns the bytes this rank sent (payload of the one collective:
        4·k in fp32 for a shared mask). Starts with the header (see the module docstring)."""
        n = self.exchanges + 1
        try:
            self._require_mask("exchange")
            error = self._model_error(f"exchange #{n}", False)
        except DistributedError as e:
            error = e
        self._agree(
            OP_EXCHANGE,
            f"exchange #{n}",
            error,
            number=n,
            payload=0 if error is not None else self._exchange_payload(),
            digests=(digest64(self._key), self._settings_digest(), 0),
        )
        links = self._master_links()
        m = self.world_size
        a = self.acc_dtype
        if self.mode == "shared":
            v = self._read(self._set, links)
            base = self._base
            what = f"exchange #{n} ({self.reduction} of {v.numel():,} values)"
            if self.reduction == "gather":
                g = self._comm.all_gather(what, v.to(self.comm_dtype))
                new = self._ordered_sum(g, base)
            else:
                buf = (v if self.op == "mean" else v - base).to(self.comm_dtype)  # v is a fresh buffer
                self._comm.all_reduce_sum(what, buf)
                new = buf.to(a) / m if self.op == "mean" else base + buf.to(a)
            sent = v.numel() * self._esize
        else:
            v = self._read(self._own, links)
            base, pos = self._base, self._pos
            mine = pos[self.rank]
            if self.reduction == "gather":
                width = max(mm.k for mm in self._masks)
                send = torch.zeros(width, dtype=self.comm_dtype, device=self._comm.device)
                send[: v.numel()] = v.to(self.comm_dtype)
                g = self._comm.all_gather(f"exchange #{n} (gather of {width:,} values per rank)", send)
                new = self._ordered_sum_disjoint(g, base, pos)
                sent = width * self._esize
            else:
                if self.op == "mean":
                    buf = base.clone()
                    buf[mine] = v
                else:
                    buf = torch.zeros_like(base)
                    buf[mine] = v - base[mine]
                buf = buf.to(self.comm_dtype)
                self._comm.all_reduce_sum(f"exchange #{n} (allreduce of {buf.numel():,} values)", buf)
                new = buf.to(a) / m if self.op == "mean" else base + buf.to(a)
                sent = buf.numel() * self._esize
        self._write(self._set, new, links)
        self._capture_base()
        self.exchanges = n
        self.sparse_bytes_sent += sent
        self.last_exchange_bytes = sent
        return sent

    def _exchange_payload(self) -> int:
        """Values this rank hands to the exchange's collective."""
        if self.mode == "disjoint" and self.reduction == "gather":
            return max(m.k for m in self._masks)
        return self._set.total

    def _ordered_sum(self, g: Tensor, base: Tensor | None) -> Tensor:
        """Shared mask, gathered [M, K] values -> the new values (rank order)."""
        a = self.acc_dtype
        if self.op == "mean":
            acc = g[0].to(a, copy=True)
            for r in range(1, g.shape[0]):
                acc += g[r].to(a)
            return acc / g.shape[0]
        s = torch.zeros_like(base)
        for r in range(g.shape[0]):
            s += g[r].to(a) - base
        return base + s

    def _ordered_sum_disjoint(self, g: Tensor, base: Tensor, pos: list[Tensor]) -> Tensor:
        """Disjoint masks, gathered [M, max k] values -> the new values over the union."""
        a = self.acc_dtype
        if self.op == "mean":
            acc = None
            for r in range(g.shape[0]):
                c = base.clone()
                c[pos[r]] = g[r, : pos[r].numel()].to(a)
                acc = c if acc is None else acc.add_(c)
            return acc / g.shape[0]
        s = torch.zeros_like(base)
        for r in range(g.shape[0]):
            p = pos[r]
            s[p] = s[p] + (g[r, : p.numel()].to(a) - base[p])
        return base + s

    def _float_buffers(self) -> list[tuple[str, Tensor]]:
        return [(n, b) for n, b in self.model.named_buffers() if b.is_floating_point()]

    def _dense_tensors(self, buffers: bool) -> list[Tensor]:
        out = list(self.params)
        if buffers:
            for name, b in self._float_buffers():
                if not is_dense_layout(b.shape, b.stride()):
                    raise ValueError(f"buffer {name!r} does not cover its memory densely")
                out.append(b)
        return out

    def _dense_call(self, what: str, buffers: bool) -> tuple[list[Tensor], BaseException | None, dict]:
        """Local checks and the header fields of a dense operation (dense_exchange, sync_parameters)."""
        tensors, error = [], None
        try:
            error = self._model_error(what, True)
            c = self.dense_chunk_numel
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"dense_chunk_numel must be a positive integer, got {c!r}")
            if error is None:
                tensors = self._dense_tensors(buffers)
        except (ValueError, TypeError) as e:
            error = e
        extra = 0
        if buffers and error is None:
            extra = digest64(json.dumps([[n, list(b.shape), str(b.dtype)] for n, b in self._float_buffers()]).encode())
        fields = {
            "payload": sum(t.numel() for t in tensors),
            "chunk": self.dense_chunk_numel if error is None else 0,
            "digests": (0, self._settings_digest(), extra),
        }
        return tensors, error, fields

    def _chunks(self, tensors: list[Tensor]):
        """Chunks of at most dense_chunk_numel entries over the tensors' row-major entries,
        concatenated: lists of (tensor position, start, end) pieces."""
        chunk, room = [], self.dense_chunk_numel
        for t_i, t in enumerate(tensors):
            start = 0
            while start < t.numel():
                take = min(room, t.numel() - start)
                chunk.append((t_i, start, start + take))
                start += take
                room -= take
                if room == 0:
                    yield chunk
                    chunk, room = [], self.dense_chunk_numel
        if chunk:
            yield chunk

    @torch.no_grad()
    def dense_exchange(self, *, buffers: bool = False) -> int:
        """Average every parameter entry across the ranks (a collective): the dense warm-up before
        a mask exists, and the dense-distributed baseline. Always a mean — θ ← (θ_0 + … + θ_{M-1})/M
        with the same arithmetic and ``reduction`` as ``exchange`` — whatever ``op`` is. With
        ``buffers=True`` floating-point buffers (BatchNorm running statistics) are averaged too.
        Values travel in row-major order in ``dense_chunk_numel`` chunks, one collective each
        (after the header), so ranks may hold different memory layouts. Returns the bytes this
        rank sent (4·|θ| in fp32)."""
        n = self.dense_exchanges + 1
        what = f"dense_exchange #{n}"
        tensors, error, fields = self._dense_call(what, buffers)
        self._agree(OP_DENSE_EXCHANGE, what, error, number=n, args=(int(bool(buffers)), 0), **fields)
        ids = {id(p) for p in self.params}
        links = self._master_links()
        a, c, m = self.acc_dtype, self.comm_dtype, self.world_size
        sent = 0
        rows: dict[int, Tensor] = {}  # tensor position -> its row-major entries (a copy if not contiguous)
        for chunk in self._chunks(tensors):
            size = sum(e - s for _, s, e in chunk)
            send = torch.empty(size, dtype=a, device=self._comm.device)
            at = 0
            for t_i, s, e in chunk:
                t = tensors[t_i]
                if t_i not in rows:
                    rows[t_i] = _row_major(t)
                vals = rows[t_i][s:e].to(a)
                if id(t) in ids:
                    for master, midx, _ in links.get(id(t), ()):
                        sel = (midx >= s) & (midx < e)
                        vals[midx[sel] - s] = master[sel].to(a)
                send[at : at + e - s] = vals.to(send.device)
                at += e - s
            what_c = f"{what} ({self.reduction} of {size:,} values)"
            if self.reduction == "gather":
                g = self._comm.all_gather(what_c, send.to(c))
                new = g[0].to(a, copy=True)
                for r in range(1, m):
                    new += g[r].to(a)
                new = new / m
            else:
                buf = send.to(c)  # send is a fresh buffer: reduce in place
                self._comm.all_reduce_sum(what_c, buf)
                new = buf.to(a) / m
            sent += size * self._esize
            at = 0
            for t_i, s, e in chunk:
                t = tensors[t_i]
                vals = new[at : at + e - s].to(t.device)
                rows[t_i][s:e].copy_(vals.to(t.dtype))
                if e == t.numel():  # the tensor's last piece: done with it
                    row = rows.pop(t_i)
                    if not t.is_contiguous():
                        t.copy_(row.view(t.shape))
                if id(t) in ids:
                    for master, midx, _ in links.get(id(t), ()):
                        sel = (midx >= s) & (midx < e)
                        master[sel] = vals[midx[sel] - s].to(master.dtype)
                at += e - s
        self._capture_base()
        self.dense_exchanges = n
        self.dense_bytes_sent += sent
        self.last_exchange_bytes = sent
        return sent

    @torch.no_grad()
    def sync_parameters(self, src: int = 0, *, buffers: bool = True) -> None:
        """Copy rank ``src``'s parameters (and floating-point buffers) to every rank, bit for bit (a
        collective): call it once before training when the ranks initialised their models
        independently. Master copies of registered optimizers restart from the parameters.
        Values travel in row-major order, so ranks may hold different memory layouts."""
        what = f"sync_parameters from rank {src}"
        tensors, error, fields = self._dense_call(what, buffers)
        if error is None:
            try:
                if isinstance(src, bool) or not isinstance(src, int):
                    raise TypeError(f"src must be a rank (int), got {src!r}")
                if not 0 <= src < self.world_size:
                    raise ValueError(f"src rank {src} is not in this group of {self.world_size} ranks")
            except (ValueError, TypeError) as e:
                error = e
        self._agree(OP_SYNC, what, error, args=(int_arg(src), int(bool(buffers))), **fields)
        for i, t in enumerate(tensors):
            flat = _row_major(t)
            buf = flat.to(self._comm.device, copy=flat.device != self._comm.device)
            self._comm.broadcast(f"{what} (tensor {i}, {t.numel():,} values)", buf, src)
            if buf is not flat:
                flat.copy_(buf.to(flat.device))
            if not t.is_contiguous():
                t.copy_(flat.view(t.shape))
        links = self._master_links()
        for p in self.params:
            for master, midx, _ in links.get(id(p), ()):
                master.copy_(flat_memory_view(p.detach()).index_select(0, memory_offsets(midx, p)).to(master.dtype))
        self._capture_base()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counters, settings, the mask digest (table digest in disjoint mode) and the values at the
        last synchronisation (k_exchanged entries, kept only for op='sum' and disjoint mode).
        Save it with the model and the optimizer; rank 0's is enough (all ranks hold the same)."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "mode": self.mode,
            "op": self.op,
            "reduction": self.reduction,
            "comm_dtype": str(self.comm_dtype),
            "world_size": self.world_size,
            "mask_digest": self.mask_key,
            "k_exchanged": self.k_exchanged,
            "exchanges": self.exchanges,
            "dense_exchanges": self.dense_exchanges,
            "sparse_bytes_sent": self.sparse_bytes_sent,
            "dense_bytes_sent": self.dense_bytes_sent,
            "mask_bytes_sent": self.mask_bytes_sent,
            "base": None if self._base is None else self._base.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``. Not a collective; the averager must already hold the same
        mask (digest compared) and settings. Everything is checked before anything changes."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a SparseAverager state dict (no 'format': 'fishkern.sparse_averager')")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported SparseAverager state version {state.get('version')!r}")
        for key in ("mode", "op", "reduction"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"the state was saved with {key}={state.get(key)!r}, this averager has {getattr(self, key)!r}")
        if state.get("comm_dtype") != str(self.comm_dtype):
            raise ValueError(f"the state was saved with comm_dtype={state.get('comm_dtype')}, this averager has {self.comm_dtype}")
        if self.mode == "disjoint" and state.get("world_size") != self.world_size:
            raise ValueError(
                f"the state was saved by {state.get('world_size')} ranks with per-worker masks; this group has {self.world_size}"
            )
        if state.get("mask_digest") != self.mask_key:
            raise ValueError(
                f"the state was saved with mask digest {str(state.get('mask_digest'))[:12]}, this averager holds "
                f"{str(self.mask_key)[:12]}; set the same mask (set_mask) before loading"
            )
        base = state.get("base")
        if self._base is not None:
            if not isinstance(base, Tensor) or base.numel() != self._base.numel():
                raise ValueError("the state lacks the values at the last synchronisation, or they do not fit the mask")
        for key in ("exchanges", "dense_exchanges", "sparse_bytes_sent", "dense_bytes_sent", "mask_bytes_sent"):
            if isinstance(state.get(key), bool) or not isinstance(state.get(key), int) or state[key] < 0:
                raise ValueError(f"bad {key!r} in the state: {state.get(key)!r}")
        for key in ("exchanges", "dense_exchanges", "sparse_bytes_sent", "dense_bytes_sent", "mask_bytes_sent"):
            setattr(self, key, state[key])
        if self._base is not None:
            self._base = base.to(self._base.device, self._base.dtype).clone()

    def __repr__(self) -> str:
        return (
            f"SparseAverager(rank={self.rank}/{self.world_size}, mode={self.mode}, op={self.op}, "
            f"reduction={self.reduction}, comm_dtype={self.comm_dtype}, k={self.k:,}, k_exchanged={self.k_exchanged:,}, "
            f"exchanges={self.exchanges}, bytes_sent={self.bytes_sent:,})"
        )
