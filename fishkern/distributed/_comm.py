"""Collectives with a timeout and fishkern errors that name the operation.

Every collective fishkern.distributed issues goes through ``Comm.run``: it is issued with
``async_op=True`` and waited on here, so that a failure or a timeout becomes a
``CollectiveTimeoutError`` / ``CollectiveError`` naming what was being done (and by which rank),
never an endless hang.

How the timeout is enforced:

* gloo: the collective's own gloo timeout is set to the requested one for the duration of the call
  (``Backend.set_timeout``) and put back afterwards. The gloo operation itself then fails after the
  timeout, so the process can still exit afterwards. (Waiting with ``Work.wait(timeout)`` alone
  raises in time too, but leaves gloo's worker thread blocked until the process group's own timeout
  — the interpreter would hang at exit for up to 30 minutes.) Without a timeout of its own, the
  process group's timeout applies: ``init_process_group(..., timeout=timedelta(seconds=...))``.
  Known torch behaviour (2.13, CPU): after a timed-out gloo collective, the interpreter's exit
  occasionally ends in "terminate called without an active exception" (SIGABRT) while the hung
  peer is still connected; it happens after the error was raised and reported, not instead of it.
* NCCL: ``Work.wait(timeout)`` (blocks the host until the collective completes or times out);
  without a timeout, the process group's timeout and NCCL's watchdog apply.

The header (``Comm.agree``): every collective entry point of fishkern.distributed first
all-gathers one fixed-size row of ``HEADER_WIDTH`` int64 — which operation, on which averager, its
sequence numbers, arguments, whether this rank can go ahead, payload size and digests — and
compares the rows. Ranks that entered different operations (which would otherwise pair collectives
of different sizes: gloo aborts the process, or a rank silently reads the wrong data) or that must
refuse locally all raise the same decision, before any payload travels, and the group stays usable.
"""
from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import (
    CollectiveError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    DistributedError,
    ModelChangedError,
)

_TIMEOUT_RE = re.compile(r"timed?\s*out|timeout|monitoredbarrier|deadline", re.IGNORECASE)
_PEER_GONE_RE = re.compile(r"connection (closed|reset|refused)|broken pipe|(closed|reset) by peer", re.IGNORECASE)


def as_timedelta(timeout) -> datetime.timedelta | None:
    """None, seconds (int/float) or a timedelta -> timedelta (or None)."""
    if timeout is None or isinstance(timeout, datetime.timedelta):
        if isinstance(timeout, datetime.timedelta) and timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or a timedelta, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def require_initialized(what: str) -> None:
    if not dist.is_available():
        raise DistributedError(f"{what} needs torch.distributed, which this torch build does not have")
    if not dist.is_initialized():
        raise DistributedError(
            f"{what} needs an initialised process group: call fishkern.distributed.init_from_env() (under "
            "torchrun) or torch.distributed.init_process_group(backend, timeout=...) first"
        )


# ---------------------------------------------------------------------- the header
HEADER_MAGIC = 0x46534B48_0001  # "FSKH", version 1: a row that does not start with it is not ours
HEADER_WIDTH = 14
(_MAGIC, _OPCODE, _INSTANCE, _SEQ, _NUMBER, _STATUS, _ARG0, _ARG1) = range(8)
(_PAYLOAD, _CHUNK, _D_MASK, _D_SETTINGS, _D_EXTRA) = range(8, 13)
_PROPOSAL = 13  # not compared: a value the ranks pick a common one of (an averager's number)
_IDENTITY = (_OPCODE, _INSTANCE, _SEQ, _NUMBER)  # compared before the status: never depend on local failures
_DETAILS = {  # compared once every rank can go ahead
    _ARG0: "argument",
    _ARG1: "argument",
    _PAYLOAD: "payload size (values per rank)",
    _CHUNK: "dense_chunk_numel",
    _D_MASK: "mask digest",
    _D_SETTINGS: "settings (mode, op, reduction, comm_dtype, parameters)",
    _D_EXTRA: "floating-point buffers (names, shapes, dtypes)",
}

OP_CONSTRUCT, OP_SET_MASK, OP_VERIFY, OP_EXCHANGE, OP_DENSE_EXCHANGE, OP_SYNC, OP_ASSERT_IN_SYNC = range(1, 8)
OP_BROADCAST_MASK, OP_ALL_GATHER_MASKS = 8, 9
# opcode -> (name, name of argument 0, name of argument 1)
OPERATIONS: dict[int, tuple[str, str | None, str | None]] = {
    OP_CONSTRUCT: ("SparseAverager(...) construction", None, None),
    OP_SET_MASK: ("set_mask", "broadcast_from", None),
    OP_VERIFY: ("verify", None, None),
    OP_EXCHANGE: ("exchange", None, None),
    OP_DENSE_EXCHANGE: ("dense_exchange", "buffers", None),
    OP_SYNC: ("sync_parameters", "src", "buffers"),
    OP_ASSERT_IN_SYNC: ("assert_in_sync", "buffers", None),
    OP_BROADCAST_MASK: ("broadcast_mask", "src", None),
    OP_ALL_GATHER_MASKS: ("all_gather_masks", None, None),
}
NO_ARG = -1  # an argument that is None
BAD_ARG = -2  # an argument that is not an int (the rank refuses it locally)


def digest64(data: bytes | str | None) -> int:
    """A signed int64 digest of bytes (or the first 8 bytes of a hex digest); 0 for None."""
    if data is None:
        return 0
    if isinstance(data, str):
        raw = bytes.fromhex(data)[:8]
    else:
        raw = hashlib.sha256(data).digest()[:8]
    return int.from_bytes(raw, "little", signed=True)


def int_arg(value) -> int:
    """An argument as it travels in the header."""
    if value is None:
        return NO_ARG
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, int) and value >= 0 else BAD_ARG


@dataclass
class Call:
    """What one rank is about to do, as compared across ranks by ``Comm.agree``."""

    opcode: int
    name: str  # for messages and the collectives' names, e.g. "exchange #3"
    instance: int = -1  # which SparseAverager of this process group (-1: a module-level function)
    seq: int = 0  # the averager's count of collective calls so far
    number: int = 0  # the operation's own counter (exchange #n, dense_exchange #n), 0 if none
    args: tuple[int, int] = (0, 0)
    payload: int = 0
    chunk: int = 0
    digests: tuple[int, int, int] = (0, 0, 0)  # mask, settings, buffers
    proposal: int = 0

    def row(self, failed: bool) -> list[int]:
        if failed:  # what a failing rank would send next is unknown: only its identity counts
            return [HEADER_MAGIC, self.opcode, self.instance, self.seq, self.number, 1] + [0] * 8
        return [
            HEADER_MAGIC, self.opcode, self.instance, self.seq, self.number, 0,
            *self.args, self.payload, self.chunk, *self.digests, self.proposal,
        ]  # fmt: skip


def _describe(row: list[int]) -> str:
    name = OPERATIONS.get(row[_OPCODE], (f"unknown operation {row[_OPCODE]}",))[0]
    text = name + (f" #{row[_NUMBER]}" if row[_NUMBER] else "")
    if row[_INSTANCE] >= 0:
        text += f" of SparseAverager #{row[_INSTANCE]} (its collective call {row[_SEQ] + 1})"
    return text


def _field_text(row: list[int], field: int) -> str:
    v = row[field]
    if field in (_ARG0, _ARG1):
        return "None" if v == NO_ARG else "not an int" if v == BAD_ARG else str(v)
    return str(v) if field in (_PAYLOAD, _CHUNK) else f"{v & (2**64 - 1):016x}"  # digests in hex


def _group_ranks(rows: list[list[int]], key) -> dict:
    groups: dict = {}
    for r, row in enumerate(rows):
        groups.setdefault(key(row), []).append(r)
    return groups


def _all_gather_single(out: Tensor, inp: Tensor, group, async_op: bool):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


class Comm:
    """The collectives of one process group, on one device, with one timeout."""

    def __init__(self, group=None, timeout=None, param_device: torch.device | None = None):
        self.group = group
        self.timeout = as_timedelta(timeout)
        self.backend = str(dist.get_backend(group)).lower()
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        nccl = "nccl" in self.backend
        if nccl and param_device is not None and param_device.type == "cuda":
            self.device = param_device
        elif nccl and "gloo" not in self.backend:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self._gloo = None  # the gloo backend object, when it lets us scope its timeout
        if self.device.type == "cpu" and "gloo" in self.backend:
            try:
                pg = group if group is not None else dist.distributed_c10d._get_default_group()
                be = pg._get_backend(torch.device("cpu"))
                if hasattr(be, "set_timeout") and hasattr(be.options, "_timeout"):
                    self._gloo = be
            except Exception:  # private API: fall back to Work.wait(timeout)
                self._gloo = None

    # ------------------------------------------------------------------ timeouts
    def effective_timeout_s(self) -> float | None:
        if self.timeout is not None:
            return self.timeout.total_seconds()
        if self._gloo is not None:
            try:
                return self._gloo.options._timeout.total_seconds()
            except Exception:
                return None
        return None

    @contextmanager
    def _scoped_gloo_timeout(self):
        if self._gloo is None or self.timeout is None:
            yield False
            return
        old = self._gloo.options._timeout
        self._gloo.set_timeout(self.timeout)
        try:
            yield True
        finally:
            self._gloo.set_timeout(old)

    # ------------------------------------------------------------------ running one collective
    def run(self, operation: str, issue: Callable[[], object]) -> None:
        """Issue a collective (``issue`` calls a torch.distributed op with async_op=True) and wait."""
        with self._scoped_gloo_timeout() as scoped:
            try:
                work = issue()
                if work is not None:
                    if self.timeout is not None and not scoped:
                        work.wait(self.timeout)
                    else:
                        work.wait()
            except DistributedError:
                raise
            except Exception as e:  # DistBackendError, RuntimeError from gloo / NCCL
                raise self._wrap(operation, e) from e

    def _wrap(self, operation: str, e: Exception) -> DistributedError:
        where = f"rank {self.rank} of {self.world_size} ({self.backend})"
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _TIMEOUT_RE.search(str(e)) and not _PEER_GONE_RE.search(str(e)):
            t = self.effective_timeout_s()
            limit = f"{t:g} s" if t is not None else "the process group's timeout"
            return CollectiveTimeoutError(
                f"{operation} timed out on {where} after {limit}: at least one rank did not join it (it hangs, is "
                "slower than the timeout, died, or took another code path). Raise the limit with "
                "SparseAverager(timeout=...) or init_process_group(timeout=datetime.timedelta(...)). The process "
                f"group cannot be used after this error. [backend: {text}]",
                operation,
                t,
            )
        return CollectiveError(
            f"{operation} failed on {where}: a peer process probably crashed or closed its process group; "
            f"check the other ranks' logs. [backend: {text}]",
            operation,
        )

    # ------------------------------------------------------------------ the header
    def propose_instance(self) -> int:
        """This process's proposal for the number of the next SparseAverager on this group."""
        return _INSTANCES.get(_group_key(self.group), 0)

    def take_instance(self, rows: list[list[int]]) -> int:
        """The number every rank takes for a new averager: the largest proposal of the
        construction header, so the ranks' counters meet again even if they ever drifted."""
        n = max(r[_PROPOSAL] for r in rows)
        _INSTANCES[_group_key(self.group)] = n + 1
        return n

    def agree(self, call: Call, error: BaseException | None = None) -> list[list[int]]:
        """All-gather ``call``'s header row (one small collective) and compare: raise on every rank,
        the same decision, if the ranks entered different operations (``CollectiveMismatchError``),
        if any rank refused locally (``error``: raised as it is on its own rank, as a
        ``DistributedError`` naming that rank and its message on the others), or if arguments,
        sizes or digests differ (``CollectiveMismatchError``). Returns every rank's row when all
        agree."""
        row = call.row(error is not None)
        t = torch.tensor(row, dtype=torch.int64).to(self.device)
        rows = self.all_gather(f"{call.name} (header)", t).cpu().tolist()
        first = rows[0]
        if first[_STATUS] == 0 and all(r == first for r in rows):
            return rows
        where = f"{call.name} on rank {self.rank}"
        alien = [r for r, x in enumerate(rows) if x[_MAGIC] != HEADER_MAGIC]
        if alien:
            raise CollectiveMismatchError(
                f"{where}: {rank_list(alien)} entered a collective that is not a fishkern.distributed operation while "
                "this rank was starting one; every rank must call the same collectives in the same order",
                {r: ("another collective" if r in alien else _describe(rows[r])) for r in range(len(rows))},
            )
        ops = {r: _describe(x) for r, x in enumerate(rows)}
        groups = _group_ranks(rows, lambda x: tuple(x[f] for f in _IDENTITY))
        if len(groups) > 1:
            parts = "; ".join(f"{rank_list(rs)}: {ops[rs[0]]}" for rs in groups.values())
            raise CollectiveMismatchError(
                f"{where}: the ranks called different collectives — {parts}. Every rank must call the same "
                "SparseAverager operations, on the same averagers, in the same order; nothing was exchanged",
                ops,
            )
        failed = [r for r, x in enumerate(rows) if x[_STATUS]]
        if failed:
            self._raise_refusals(call.name, failed, error)
        bad = [f for f in _DETAILS if len({x[f] for x in rows}) > 1]
        if not bad:  # only the proposals differ
            return rows
        name, a0, a1 = OPERATIONS.get(call.opcode, ("", None, None))
        parts = []
        for f in bad:
            label = {_ARG0: a0, _ARG1: a1}.get(f) or _DETAILS[f]
            by_value = _group_ranks(rows, lambda x: x[f]).values()
            vals = "; ".join(f"{rank_list(rs)}: {_field_text(rows[rs[0]], f)}" for rs in by_value)
            parts.append(f"{label} differs — {vals}")
        raise CollectiveMismatchError(
            f"{where}: the ranks disagree about {name or call.name}: {'; '.join(parts)}. Every rank must call it with "
            "the same arguments, the same mask and the same model; nothing was exchanged",
            ops,
        )

    def agree_ok(self, what: str, error: BaseException | None = None) -> None:
        """Inside one operation (after ``agree``): make a local failure every rank's error."""
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64).to(self.device)
        flags = [int(x) for x in self.all_gather(f"{what} (status)", flag).view(-1).tolist()]
        failed = [r for r, x in enumerate(flags) if x]
        if failed:
            self._raise_refusals(what, failed, error)

    def _raise_refusals(self, what: str, failed: list[int], error: BaseException | None) -> None:
        """Some ranks refused: every rank learns why (two small collectives), then raises."""
        text = None if error is None else f"{type(error).__name__}\n{error}"
        texts = self.all_gather_bytes(f"{what} (reasons)", None if text is None else text.encode())
        if error is not None:
            raise error
        reasons, kinds = [], set()
        for r in failed:
            kind, _, msg = (texts[r] or b"").decode(errors="replace").partition("\n")
            kinds.add(kind)
            reasons.append(f"rank {r}: {kind}: {msg}")
        cls = ModelChangedError if kinds == {"ModelChangedError"} else DistributedError
        raise cls(
            f"{what}: {rank_list(failed)} refused it, so no rank went ahead (this is rank {self.rank}) — "
            + "; ".join(reasons)
        )

    # ------------------------------------------------------------------ the collectives used
    def all_gather(self, operation: str, t: Tensor) -> Tensor:
        """[world_size, n]: every rank's ``t`` (1-D, same size everywhere), in rank order."""
        t = t.contiguous()
        out = torch.empty(self.world_size * t.numel(), dtype=t.dtype, device=t.device)
        if t.numel():
            self.run(operation, lambda: _all_gather_single(out, t, self.group, True))
        return out.view(self.world_size, t.numel())

    def all_reduce_sum(self, operation: str, t: Tensor) -> None:
        if t.numel():
            self.run(operation, lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True))

    def broadcast(self, operation: str, t: Tensor, src: int) -> None:
        """Broadcast ``t`` from group rank ``src``."""
        if not t.numel():
            return
        gsrc = src if self.group is None else dist.get_global_rank(self.group, src)
        self.run(operation, lambda: dist.broadcast(t, gsrc, group=self.group, async_op=True))

    def barrier(self, operation: str) -> None:
        """gloo: ``monitored_barrier`` (its error names the ranks that did not arrive); other
        backends: nothing (the next collective synchronises anyway)."""
        if self.device.type != "cpu" or "gloo" not in self.backend or self.world_size == 1:
            return
        kwargs = {"wait_all_ranks": True}
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        with self._scoped_gloo_timeout():
            try:
                dist.monitored_barrier(self.group, **kwargs)
            except Exception as e:
                raise self._wrap(operation, e) from e

    def all_gather_bytes(self, operation: str, payload: bytes | None) -> list[bytes | None]:
        """Every rank's byte string (None travels as 'absent'), in rank order: two collectives."""
        n = -1 if payload is None else len(payload)
        sizes = self.all_gather(f"{operation} (sizes)", torch.tensor([n], dtype=torch.int64, device=self.device))
        sizes = [int(s) for s in sizes.view(-1).tolist()]
        width = max(max(sizes), 0)
        buf = torch.zeros(width, dtype=torch.uint8)
        if payload:
            buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        rows = self.all_gather(operation, buf.to(self.device)).cpu()
        return [None if s < 0 else bytes(rows[r, :s].numpy().tobytes()) for r, s in enumerate(sizes)]


_INSTANCES: dict = {}  # process group -> SparseAverager instances built on it in this process


def _group_key(group):
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        return ("name", pg.group_name)
    except Exception:  # private API or an old torch: the object's identity
        return ("id", id(group))


def rank_list(ranks) -> str:
    ranks = list(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)
