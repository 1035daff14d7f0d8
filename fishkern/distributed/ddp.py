"""Synchronous data-parallel FISH training on torch's DistributedDataParallel: only the k masked
gradient entries travel.

DDP all-reduces every dense gradient, 4·|θ| bytes a step (1.34 GB for BERT-large), although a FISH
mask trains only k entries. The mask is fixed and identical on every rank, so the indices never
need to travel: ``masked_allreduce_hook`` gathers the masked entries of each DDP bucket into one
k-sized buffer, all-reduces it (4·k bytes, or 2·k with ``dtype=torch.bfloat16``), and writes the
result back into the bucket with zeros everywhere else — so ``.grad`` after backward holds the
averaged gradient on the trained entries and 0 on the others, on every rank. A bucket with no
masked entry sends nothing.

    model = build_model()                     # same initial weights on every rank
    opt = fishkern.MaskedAdamW(model.named_parameters(), mask, free_dense_grads=True)
    ddp = fishkern.distributed.masked_ddp(model, mask)   # freezes k=0 parameters, checks the mask on
                                                         # every rank, wraps in DDP, registers the hook
    for x, y in loader:                       # a DistributedSampler shard per rank
        loss_fn(ddp(x), y).backward()
        opt.step(); opt.zero_grad()

For a DDP module someone else built (``accelerate``, the HF Trainer) use
``register_masked_comm_hook(ddp, mask)``. Arithmetic per entry is DDP's own (divide by the world
size, then sum), so the trained entries are bit-identical to DDP's default all-reduce wherever the
backend's sum is (always with 2 ranks). The masked optimizers need nothing else: in a process group
they gather a plain parameter's gradient at ``step()``, after DDP has reduced it (see
``fishkern/optim/ddp_support.py``), with or without this hook.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..mask.indices import indices_digest
from ..mask.fishmask import FishMask
from ..mask.indices import check_mask_indices, memory_offsets
from ._comm import Comm, rank_list, require_initialized
from .errors import CollectiveError, MaskMismatchError

OPS = ("mean", "sum")
COMM_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


@dataclass
class _BucketPlan:
    signature: tuple[int, ...]  # ids of the bucket's parameters (DDP rebuilds buckets once)
    index: Tensor  # int64 offsets of the masked entries in the bucket's flat buffer
    frozen: int  # parameters in the bucket that have no masked entry


@dataclass
class MaskedCommState:
    """What ``masked_allreduce_hook`` needs: the masked flat indices of each parameter, the reduction,
    and counters (``bytes_sent``: bytes handed to ``torch.distributed.all_reduce`` by this rank)."""

    indices: Any  # WeakIdKeyDictionary: parameter -> sorted row-major flat indices (int64, CPU)
    process_group: Any = None
    op: str = "mean"
    dtype: torch.dtype | None = None
    world_size: int = 1
    digest: str = ""
    bytes_sent: int = 0
    dense_bytes: int = 0  # what DDP's default all-reduce would have sent for the same buckets
    collectives: int = 0
    buckets_skipped: int = 0
    _plans: dict[int, _BucketPlan] = field(default_factory=dict)
    _warned_frozen: bool = False

    def stats(self) -> dict[str, Any]:
        return {
            "bytes_sent": self.bytes_sent,
            "dense_bytes": self.dense_bytes,
            "collectives": self.collectives,
            "buckets_skipped": self.buckets_skipped,
            "op": self.op,
            "dtype": str(self.dtype or "bucket dtype"),
            "world_size": self.world_size,
            "mask_digest": self.digest,
        }

    def reset_stats(self) -> None:
        self.bytes_sent = self.dense_bytes = self.collectives = self.buckets_skipped = 0

    def plan(self, bucket) -> _BucketPlan:
        params = bucket.parameters()
        sig = tuple(id(p) for p in params)
        cached = self._plans.get(bucket.index())
        if cached is not None and cached.signature == sig:
            return cached
        buf = bucket.buffer()
        pieces, frozen = [], 0
        base = buf.data_ptr()
        for p, g in zip(params, bucket.gradients()):
            idx = self.indices.get(p)
            if idx is None:
                raise ValueError(
                    f"masked_allreduce_hook: a parameter of shape {tuple(p.shape)} in DDP bucket {bucket.index()} "
                    "is not covered by the mask this hook was registered with"
                )
            if idx.numel() == 0:
                frozen += 1
                continue
            start, _ = divmod(g.data_ptr() - base, buf.element_size())
            if g.data_ptr() < base or start + g.numel() > buf.numel():
                raise RuntimeError("masked_allreduce_hook: a gradient is not a view of its DDP bucket")
            # The bucket holds the gradient in the parameter's memory order (DDP's gradient layout
            # contract); bucket.gradients() views it with row-major strides, so use the parameter's.
            pieces.append(memory_offsets(idx, p).to(torch.int64) + start)
        index = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
        plan = _BucketPlan(sig, index.to(buf.device), frozen)
        self._plans[bucket.index()] = plan
        if frozen and not self._warned_frozen:
            self._warned_frozen = True
            warnings.warn(
                f"DDP bucket {bucket.index()} holds {frozen} parameter(s) with no masked entry: DDP computes and "
                "buckets their dense gradients for nothing. Freeze them before wrapping the model "
                "(fishkern.distributed.masked_ddp does, and so does a masked optimizer with free_dense_grads=True "
                "built before DistributedDataParallel)",
                stacklevel=2,
            )
        return plan


def masked_allreduce_hook(state: MaskedCommState, bucket):  # no annotations: DDP checks them literally
    """A DDP communication hook (``ddp.register_comm_hook(state, masked_allreduce_hook)``) that
    all-reduces only the masked entries of each bucket and zeroes the others."""
    buf = bucket.buffer()
    plan = state.plan(bucket)
    state.dense_bytes += buf.numel() * buf.element_size()
    if plan.index.numel() == 0:
        buf.zero_()
        state.buckets_skipped += 1
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(buf)
        return fut
    values = buf.index_select(0, plan.index)
    if state.dtype is not None and state.dtype != values.dtype:
        values = values.to(state.dtype)
    if state.op == "mean":
        values.div_(state.world_size)  # before the sum, as DDP does (no overflow in low precision)
    state.bytes_sent += values.numel() * values.element_size()
    state.collectives += 1
    work = dist.all_reduce(values, group=state.process_group, async_op=True)

    def write_back(fut: torch.futures.Future) -> Tensor:
        try:
            reduced = fut.value()[0]
        except Exception as e:
            raise CollectiveError(
                f"masked_allreduce_hook: the all-reduce of DDP bucket {bucket.index()} ({plan.index.numel()} masked "
                f"entries) failed on this rank: a rank died, hung past the process group's timeout, or took "
                f"another code path. [backend: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}]",
                "masked_allreduce_hook",
            ) from e
        buf.zero_()
        buf.index_copy_(0, plan.index, reduced.to(buf.dtype))
        return buf

    return work.get_future().then(write_back)


def masked_bf16_compress_hook(state: MaskedCommState, bucket):
    """``masked_allreduce_hook`` with the k values sent in bfloat16 (2·k bytes), whatever ``state.dtype``
    says — the masked counterpart of torch's ``bf16_compress_hook``."""
    if state.dtype != torch.bfloat16:
        state.dtype = torch.bfloat16
    return masked_allreduce_hook(state, bucket)


# ---------------------------------------------------------------------- building the state
def _per_parameter_indices(module: torch.nn.Module, mask) -> list[tuple[str, Tensor, Tensor]]:
    """(name, parameter, sorted flat indices on CPU) for every parameter of ``module``.

    mask: a FishMask (matched by name), a masked optimizer (its masks), or one index tensor per
    ``module.parameters()``."""
    named = list(module.named_parameters())
    if isinstance(mask, FishMask):
        lists = mask.mask_indices(module, device="cpu")
    elif hasattr(mask, "_layouts") and hasattr(mask, "mask_digests"):  # a fishkern masked optimizer
        by_param = {}
        for lay in mask._layouts:
            if any(sh is not None for sh in lay.shards):
                raise ValueError("masked DDP hooks do not apply to sharded (FSDP2) parameters; FSDP2 reduces its own gradients")
            for p, idx in zip(lay.owners, lay.indices):
                by_param[id(p)] = idx
        missing = [n for n, p in named if id(p) not in by_param and p.requires_grad]
        if missing:
            raise ValueError(
                f"the optimizer does not hold {len(missing)} trainable parameter(s) of the model (e.g. {missing[:3]}); "
                "pass the FishMask instead, or put every parameter in the optimizer"
            )
        lists = [by_param.get(id(p), torch.empty(0, dtype=torch.int64)) for _, p in named]
    elif isinstance(mask, Sequence) and not isinstance(mask, (str, bytes)):
        lists = list(mask)
        if len(lists) != len(named):
            raise ValueError(f"mask_indices holds {len(lists)} tensors for a model of {len(named)} parameters")
    else:
        raise TypeError(
            f"mask must be a FishMask, a fishkern masked optimizer or a list of index tensors, got {type(mask).__name__}"
        )
    out = []
    for (name, p), idx in zip(named, lists):
        shape_only = torch.empty((), device="cpu").expand(p.shape)  # numel/shape for the checks, no copy
        checked = check_mask_indices(shape_only, torch.as_tensor(idx).cpu(), f"parameter {name!r}")
        out.append((name, p, checked.to(torch.int64)))
    return out


def _digest(entries: list[tuple[str, Tensor, Tensor]], settings: str) -> str:
    h = hashlib.sha256(b"fishkern-ddp-mask-v1")
    h.update(settings.encode())
    for name, p, idx in entries:
        h.update(name.encode())
        h.update(indices_digest(idx, p.numel()).encode())
    return h.hexdigest()[:32]


def _check_same_mask(comm: Comm, digest: str, what: str) -> None:
    digests = comm.all_gather_bytes(f"{what}: mask check", digest.encode())
    if len(set(digests)) > 1:
        groups: dict[str, list[int]] = {}
        for r, d in enumerate(digests):
            groups.setdefault((d or b"").decode(), []).append(r)
        desc = "; ".join(f"{rank_list(rs)}: mask {d}" for d, rs in groups.items())
        raise MaskMismatchError(
            f"{what}: the ranks hold different masks or hook settings ({desc}); every rank must train the "
            "same entries with the same op and dtype (compute the mask on one rank and broadcast it: "
            "fishkern.distributed.broadcast_mask)",
            groups,
        )


def _make_state(module, mask, op, dtype, process_group, timeout, what) -> tuple[MaskedCommState, list]:
    require_initialized(what)
    comm = Comm(process_group, timeout)
    entries, error = [], None
    try:  # a refusal on one rank must reach every rank, not leave the others in the mask check
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if dtype not in COMM_DTYPES:
            raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
        entries = _per_parameter_indices(module, mask)
    except (ValueError, TypeError) as e:
        error = e
    comm.agree_ok(f"{what}: arguments", error)
    from torch.utils.weak import WeakIdKeyDictionary

    table = WeakIdKeyDictionary()
    for _, p, idx in entries:
        table[p] = idx
    # the settings are part of what must agree: ranks with another op or dtype would pair
    # all-reduces of different meaning or size
    digest = _digest(entries, f"{op}/{dtype}")
    _check_same_mask(comm, digest, what)
    state = MaskedCommState(table, process_group, op, dtype, comm.world_size, digest)
    return state, entries


def register_masked_comm_hook(
    ddp: torch.nn.parallel.DistributedDataParallel,
    mask,
    *,
    op: str = "mean",
    dtype: torch.dtype | None = None,
    process_group=None,
    timeout=None,
) -> MaskedCommState:
    """Register ``masked_allreduce_hook`` on an existing DDP module (e.g. from ``accelerate`` or the
    HF Trainer). Checks first that every rank holds the same mask (one small all-gather; a mismatch
    raises ``MaskMismatchError`` naming the ranks). Returns the hook's state (byte counters)."""
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_masked_comm_hook needs a DistributedDataParallel module, got {type(ddp).__name__}")
    group = process_group if process_group is not None else getattr(ddp, "process_group", None)
    state, _ = _make_state(ddp.module, mask, op, dtype, group, timeout, "register_masked_comm_hook")
    ddp.register_comm_hook(state, masked_bf16_compress_hook if dtype == torch.bfloat16 else masked_allreduce_hook)
    ddp._fishkern_comm_state = state
    return state


def masked_ddp(
    model: torch.nn.Module,
    mask,
    *,
    op: str = "mean",
    dtype: torch.dtype | None = None,
    process_group=None,
    timeout=None,
    **ddp_kwargs,
) -> torch.nn.parallel.DistributedDataParallel:
    """Wrap ``model`` in DistributedDataParallel for FISH training: parameters with no masked entry
    are frozen first (``requires_grad=False``: DDP never buckets them and autograd computes no
    gradient for them), every rank's mask is checked to be the same, and ``masked_allreduce_hook``
    is registered. ``ddp_kwargs`` go to DistributedDataParallel (``gradient_as_bucket_view``
    defaults to True here: the gradients are views of DDP's buckets, so there is no second dense
    gradient copy). The hook state is ``ddp._fishkern_comm_state`` (``.stats()``). The frozen
    parameters stay frozen (``requires_grad=False``) afterwards."""
    state, entries = _make_state(model, mask, op, dtype, process_group, timeout, "masked_ddp")
    for _, p, idx in entries:
        if idx.numel() == 0 and p.requires_grad:
            p.requires_grad_(False)
    if process_group is not None:
        ddp_kwargs.setdefault("process_group", process_group)
    # .grad as views of DDP's buckets: no second dense gradient copy and one copy fewer per step
    ddp_kwargs.setdefault("gradient_as_bucket_view", True)
    ddp = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    ddp.register_comm_hook(state, masked_bf16_compress_hook if dtype == torch.bfloat16 else masked_allreduce_hook)
    ddp._fishkern_comm_state = state
    return ddp


def comm_stats(ddp) -> dict[str, Any]:
    """The masked hook's counters of a DDP module set up by ``masked_ddp`` / ``register_masked_comm_hook``."""
    state = getattr(ddp, "_fishkern_comm_state", None)
    if state is None:
        raise ValueError("this DDP module has no fishkern masked comm hook")
    return state.stats()
