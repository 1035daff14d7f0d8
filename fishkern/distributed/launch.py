"""Starting and stopping the process group under torchrun.

    torchrun --nproc-per-node 2 train.py

    # train.py
    from fishkern.distributed import init_from_env, shutdown
    info = init_from_env(timeout=300)          # gloo on CPU, NCCL with CUDA
    ...
    shutdown()

The timeout is the process group's: a collective that some rank does not join fails after it
with an error on the others instead of hanging (torch's default is 30 minutes). Set it here, or
with ``FISHKERN_DIST_TIMEOUT`` (seconds) in the environment, or pass
``timeout=datetime.timedelta(...)`` to ``torch.distributed.init_process_group`` yourself.
``SparseAverager(timeout=...)`` can tighten it for the averager's own collectives.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._comm import as_timedelta
from .errors import DistributedError

__all__ = ["DistInfo", "init_from_env", "shutdown"]

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise DistributedError(
                f"environment variable {name} is not set: launch with torchrun (it sets RANK, WORLD_SIZE, "
                "LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or call torch.distributed.init_process_group yourself"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def init_from_env(
    backend: str | None = None,
    *,
    timeout=None,
    init_method: str | None = None,
    set_device: bool = True,
) -> DistInfo:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK; MASTER_ADDR/MASTER_PORT unless ``init_method`` is given, e.g. ``"file:///tmp/x"``).

    backend: ``"gloo"``, ``"nccl"``, ... Default: NCCL when CUDA is available, else gloo.
    timeout: seconds or a timedelta for every collective of the group; default
        ``FISHKERN_DIST_TIMEOUT`` (seconds) or 600 s.
    set_device: with NCCL, make ``cuda:LOCAL_RANK`` the current device.

    Returns rank, world size, local rank, backend and the device to put the model on. If a
    process group already exists it is left as it is and described.
    """
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_initialized():
        be = str(dist.get_backend()).lower()
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in be else torch.device("cpu")
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, be, device)
    if timeout is None:
        env = os.environ.get("FISHKERN_DIST_TIMEOUT")
        try:
            timeout = float(env) if env else DEFAULT_TIMEOUT_S
        except ValueError:
            raise DistributedError(f"FISHKERN_DIST_TIMEOUT={env!r} is not a number of seconds") from None
    td: datetime.timedelta = as_timedelta(timeout)
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    device = torch.device("cpu")
    if "nccl" in backend:
        device = torch.device("cuda", local_rank)
        if set_device:
            torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init_method or "env://", rank=rank, world_size=world_size, timeout=td
    )
    return DistInfo(rank, world_size, local_rank, str(dist.get_backend()).lower(), device)


def shutdown() -> None:
    """Destroy the default process group if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
