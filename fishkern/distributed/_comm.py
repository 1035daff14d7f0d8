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
"""
from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import CollectiveError, CollectiveTimeoutError, DistributedError

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


def rank_list(ranks) -> str:
    ranks = list(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)
