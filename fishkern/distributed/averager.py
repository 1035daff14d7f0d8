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
from ..optim._layout import _is_dense_layout, flat_memory_view, memory_offsets
from ._comm import Comm, rank_list, require_initialized
from .errors import ConfigMismatchError, DistributedError, MaskMismatchError
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
class _EntrySet:
    """Entries of the model laid out flat: parameter j owns [starts[j], starts[j+1])."""

    idx: list[Tensor]  # row-major sorted flat indices (int64, parameter's device)
    mem: list[Tensor]  # the same as memory offsets (differ for channels_last parameters)
    starts: list[int]

    @property
    def total(self) -> int:
        return self.starts[-1]


def _entry_set(params: list[Tensor], idx: list[Tensor]) -> _EntrySet:
    starts, mem, out = [0], [], []
    for p, i in zip(params, idx):
        i = i.to(device=p.device, dtype=torch.int64)
        out.append(i)
        mem.append(memory_offsets(i, p).to(torch.int64) if i.numel() else i)
        starts.append(starts[-1] + i.numel())
    return _EntrySet(out, mem, starts)


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
            if not _is_dense_layout(p.shape, p.stride()):
                raise ValueError(f"parameter {name!r} does not cover its memory densely (strides {p.stride()})")
        require_initialized("SparseAverager")
        self.model = model
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.op, self.mode, self.reduction = op, mode, reduction
        self.comm_dtype = comm_dtype or _default_comm_dtype({p.dtype for p in self.params})
        self.acc_dtype = torch.float64 if self.comm_dtype == torch.float64 else torch.float32
        self.optimizers = list(optimizers)
        self.dense_chunk_numel = dense_chunk_numel
        self._comm = Comm(group, timeout, self.params[0].device)
        self.group = group
        self.rank, self.world_size = self._comm.rank, self._comm.world_size
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
        return _mask_key(self._mask, self._masks)

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
        if mask is not None and not isinstance(mask, FishMask):
            raise TypeError(f"mask must be a FishMask or None, got {type(mask).__name__}")
        if optimizers is not None:
            self.optimizers = list(optimizers)
        if broadcast_from is not None:
            if self.mode != "shared":
                raise ValueError("disjoint mode: each rank sets its own mask; pass broadcast_from=None")
            if isinstance(broadcast_from, bool) or not isinstance(broadcast_from, int):
                raise TypeError(f"broadcast_from must be a rank (int) or None, got {broadcast_from!r}")
            mask, sent = _broadcast_mask(self._comm, mask, broadcast_from, f"set_mask: broadcast from rank {broadcast_from}")
            self.mask_bytes_sent += sent
        self._install(mask, "set_mask")
        return self._mask

    def _install(self, mask: FishMask | None, what: str) -> None:
        """Lay out a mask (disjoint: all-gather every rank's mask first), verify across ranks, and
        only then switch to it. A local set-up error is held back until every rank has reported,
        so that every rank raises and none is left waiting in a collective."""
        masks = None
        if self.mode == "disjoint":  # every rank takes part, also one passing None (then all fail)
            gathered, sent = _all_gather_masks(self._comm, mask, f"{what}: all_gather of the per-rank masks")
            self.mask_bytes_sent += sent
            absent = [r for r, m in enumerate(gathered) if m is None]
            if absent and len(absent) < len(gathered):  # every rank sees the same list: all raise
                raise DistributedError(
                    f"{what}: disjoint mode: {rank_list(absent)} passed no mask while the others passed theirs"
                )
            masks = gathered if mask is not None else None
        error, state = None, (None, None, None)
        try:
            if mask is not None:
                state = self._layout(mask, masks)
        except Exception as e:  # reported on every rank by _verify
            error = e
        key = None if error is not None else _mask_key(mask, masks)
        self._verify(what, error, key, 0 if mask is None or error is not None else mask.k)
        self._mask, self._masks = mask, masks
        self._set, self._own, self._pos = state
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
            "parameters": [[n, list(p.shape), str(p.dtype), list(p.stride())] for n, p in zip(self.names, self.params)],
            "buffers": [[n, list(b.shape), str(b.dtype)] for n, b in self._float_buffers()],
        }

    def verify(self) -> None:
        """Check (a collective) that every rank holds the same mask — FishMask.digest() compared
        through an all-gather of a fixed-size byte tensor — and the same settings and model
        shapes. Raises ``MaskMismatchError`` / ``ConfigMismatchError`` naming the ranks, on every
        rank. Runs at construction and in ``set_mask``; call it again whenever you like. On gloo
        it starts with a ``monitored_barrier``, whose timeout error names the missing ranks."""
        self._verify("verify", None, self.mask_key, self.k)

    def _verify(self, what: str, error: Exception | None, key: str | None, k: int) -> None:
        self._comm.barrier(f"{what}: monitored_barrier")
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
                shown["parameters"] = f"{len(c['parameters'])} parameters (names, shapes, dtypes, strides: {digest})"
            if "buffers" in diff:
                shown["buffers"] = f"{len(c['buffers'])} floating-point buffers"
            parts.append(f"{rank_list(ranks)}: {shown}")
        raise ConfigMismatchError(
            f"{what}: the ranks built their SparseAverager differently — {'; '.join(parts)}. Every rank needs the same "
            "mode, op, reduction, comm_dtype and the same model (parameter names, shapes, dtypes and memory layout)"
        )

    def assert_in_sync(self, *, buffers: bool = False) -> None:
        """Check (a collective) that every rank holds bit-identical parameters (and floating-point
        buffers); raises ``DistributedError`` naming the ranks that differ. Costs one hash of the
        model per rank and an all-gather of 32 bytes."""
        h = hashlib.sha256()
        tensors = self.params + ([b for _, b in self._float_buffers()] if buffers else [])
        for t in tensors:
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        row = torch.tensor(list(h.digest()), dtype=torch.uint8).to(self._comm.device)
        rows = self._comm.all_gather("assert_in_sync: all_gather of parameter hashes", row).cpu()
        groups: dict[bytes, list[int]] = {}
        for r in range(self.world_size):
            groups.setdefault(bytes(rows[r].tolist()), []).append(r)
        if len(groups) > 1:
            parts = [f"{rank_list(rs)}: {d.hex()[:12]}" for d, rs in groups.items()]
            raise DistributedError(f"the ranks hold different parameters — {'; '.join(parts)}")

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

    def _read(self, es: _EntrySet, links) -> Tensor:
        """The entries' current values (masters where there are), widened to A, flat, on the
        communication device."""
        out = torch.empty(es.total, dtype=self.acc_dtype, device=self._comm.device)
        for j, p in enumerate(self.params):
            s, e = es.starts[j], es.starts[j + 1]
            if s == e:
                continue
            vals = flat_memory_view(p.detach()).index_select(0, es.mem[j]).to(self.acc_dtype)
            for master, midx, _ in links.get(id(p), ()):
                at = torch.searchsorted(midx, es.idx[j]).clamp_(max=midx.numel() - 1)
                hit = midx[at] == es.idx[j]
                vals[hit] = master[at[hit]].to(self.acc_dtype)
            out[s:e] = vals.to(out.device)
        return out

    def _write(self, es: _EntrySet, values: Tensor, links) -> None:
        """Write A-dtype values into the entries (rounded to each parameter's dtype) and, unrounded,
        into the master copies of the same entries."""
        for j, p in enumerate(self.params):
            s, e = es.starts[j], es.starts[j + 1]
            if s == e:
                continue
            vals = values[s:e].to(p.device)
            flat_memory_view(p).index_copy_(0, es.mem[j], vals.to(p.dtype))
            for master, midx, _ in links.get(id(p), ()):
                at = torch.searchsorted(es.idx[j], midx).clamp_(max=e - s - 1)
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
        4·k in fp32 for a shared mask)."""
        self._require_mask("exchange")
        n = self.exchanges + 1
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
                if not _is_dense_layout(b.shape, b.stride()):
                    raise ValueError(f"buffer {name!r} does not cover its memory densely")
                out.append(b)
        return out

    def _chunks(self, tensors: list[Tensor]):
        """Chunks of at most dense_chunk_numel entries over the tensors' memory, concatenated:
        lists of (tensor position, start, end) pieces."""
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
        Values travel in ``dense_chunk_numel`` chunks, one collective each. Returns the bytes
        this rank sent (4·|θ| in fp32)."""
        n = self.dense_exchanges + 1
        tensors = self._dense_tensors(buffers)
        ids = {id(p) for p in self.params}
        links = self._master_links()
        a, c, m = self.acc_dtype, self.comm_dtype, self.world_size
        sent = 0
        for chunk in self._chunks(tensors):
            size = sum(e - s for _, s, e in chunk)
            send = torch.empty(size, dtype=a, device=self._comm.device)
            at = 0
            for t_i, s, e in chunk:
                t = tensors[t_i]
                vals = flat_memory_view(t.detach())[s:e].to(a)
                if id(t) in ids:
                    for master, _, mmem in links.get(id(t), ()):
                        sel = (mmem >= s) & (mmem < e)
                        vals[mmem[sel] - s] = master[sel].to(a)
                send[at : at + e - s] = vals.to(send.device)
                at += e - s
            what = f"dense_exchange #{n} ({self.reduction} of {size:,} values)"
            if self.reduction == "gather":
                g = self._comm.all_gather(what, send.to(c))
                new = g[0].to(a, copy=True)
                for r in range(1, m):
                    new += g[r].to(a)
                new = new / m
            else:
                buf = send.to(c)  # send is a fresh buffer: reduce in place
                self._comm.all_reduce_sum(what, buf)
                new = buf.to(a) / m
            sent += size * self._esize
            at = 0
            for t_i, s, e in chunk:
                t = tensors[t_i]
                vals = new[at : at + e - s].to(t.device)
                flat_memory_view(t)[s:e].copy_(vals.to(t.dtype))
                if id(t) in ids:
                    for master, _, mmem in links.get(id(t), ()):
                        sel = (mmem >= s) & (mmem < e)
                        master[sel] = vals[mmem[sel] - s].to(master.dtype)
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
        independently. Master copies of registered optimizers restart from the parameters."""
        if not 0 <= src < self.world_size:
            raise ValueError(f"src rank {src} is not in this group of {self.world_size} ranks")
        for i, t in enumerate(self._dense_tensors(buffers)):
            flat = flat_memory_view(t)
            buf = flat.detach().to(self._comm.device, copy=flat.device != self._comm.device)
            if not buf.is_contiguous():
                buf = buf.contiguous()
            self._comm.broadcast(f"sync_parameters from rank {src} (tensor {i}, {t.numel():,} values)", buf, src)
            if buf.data_ptr() != flat.data_ptr():
                flat.copy_(buf.to(flat.device))
        links = self._master_links()
        for p in self.params:
            for master, _, mmem in links.get(id(p), ()):
                master.copy_(flat_memory_view(p.detach()).index_select(0, mmem).to(master.dtype))
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
