"""Errors raised by fishkern.distributed. All derive from ``DistributedError`` (a RuntimeError)."""
from __future__ import annotations


class DistributedError(RuntimeError):
    """A collective failed, or the ranks disagree about something they must share."""


class CollectiveTimeoutError(DistributedError, TimeoutError):
    """A collective did not complete within the timeout: some rank did not join it (it hangs,
    is slower than the timeout, died without closing its connections, or took another code path).

    ``operation`` names the collective (e.g. ``"exchange #12 (all_gather of 1,680 values)"``),
    ``timeout_s`` the limit in seconds (None when it is unknown). The process group cannot be used
    after this error: destroy it and restart the job (or the failed ranks, with torchrun's elastic
    restarts)."""

    def __init__(self, message: str, operation: str = "", timeout_s: float | None = None):
        super().__init__(message)
        self.operation = operation
        self.timeout_s = timeout_s


class CollectiveError(DistributedError):
    """A collective failed for another reason than a timeout, typically because a peer process
    crashed or closed its process group (gloo: "Connection closed by peer")."""

    def __init__(self, message: str, operation: str = ""):
        super().__init__(message)
        self.operation = operation


class MaskMismatchError(DistributedError):
    """The ranks do not hold the same FishMask (shared mode) or the same table of per-worker
    masks (disjoint mode). ``groups`` maps each digest seen to the ranks holding it."""

    def __init__(self, message: str, groups: dict | None = None):
        super().__init__(message)
        self.groups = dict(groups or {})


class ConfigMismatchError(DistributedError):
    """The ranks built their SparseAverager with different settings or different models."""


class CollectiveMismatchError(DistributedError):
    """The ranks entered different fishkern collectives (e.g. rank 0 ``exchange()`` while rank 1
    calls ``dense_exchange()``), or the same one with different arguments, counters, masks or sizes.

    Every collective entry point first all-gathers a small header (which operation, on which
    averager, its sequence numbers, arguments, payload size and digests) and compares it, so this is
    raised on every rank before any payload travels; the process group stays usable.
    ``operations`` maps each rank to a description of what it called."""

    def __init__(self, message: str, operations: dict | None = None):
        super().__init__(message)
        self.operations = dict(operations or {})


class ModelChangedError(DistributedError):
    """A parameter changed its shape, dtype or device, stopped covering its memory densely, or was
    replaced by another tensor object (``load_state_dict(assign=True)``, a new submodule) after the
    SparseAverager was built. Raised on every rank (on the others naming the rank it happened on).
    Build the SparseAverager after moving or converting the model. A change of memory layout alone
    (``model.to(memory_format=torch.channels_last)``) is handled and not an error."""
