"""The processes of `fishkern cifar`: under torchrun (one per GPU) or spawned here (gloo on CPU, NCCL
on GPU, rendezvous through a FileStore in a temporary directory); errors of a worker come back
with their type and message."""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...reporting import fmt_bytes, write_json_atomic
from .config import CifarConfig, RunSpec
from .worker import Worker

if TYPE_CHECKING:
    import torch


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def device_for(cfg: CifarConfig, local_rank: int) -> torch.device:
    import torch

    name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return dev


def _set_threads(cfg: CifarConfig, world: int) -> None:
    import torch

    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))


def _work(cfg: CifarConfig, data, rank: int, world: int, device, specs, artifacts, log) -> list[dict] | None:
    worker = Worker(cfg, data, rank, world, device, artifacts)
    results = []
    for i, spec in enumerate(specs):
        res = worker.run(spec)
        if rank == 0:
            results.append(res)
            if log:
                extra = "" if spec.method == "standard" else (f", {res['exchanges']} exchanges, "
                                                             f"{fmt_bytes(res['bytes_per_worker'])}/worker")
                print(f"[{i + 1}/{len(specs)}] {spec.name}: accuracy {100 * res['accuracy']:.1f}%{extra}, "
                      f"{res['seconds']:.1f} s", file=sys.stderr, flush=True)
    return results if rank == 0 else None


def _spawn_entry(rank: int, world: int, tmp: str, cfg: CifarConfig, specs: list[RunSpec], artifacts: str | None) -> None:
    """Entry point of a spawned worker: gloo (CPU) / NCCL (CUDA) through a FileStore in ``tmp``."""
    import torch

    import torch.distributed as dist

    try:
        _set_threads(cfg, world)
        device = device_for(cfg, rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.timeout))
        data = torch.load(Path(tmp) / "data.pt", mmap=True, weights_only=True)
        results = _work(cfg, data, rank, world, device, specs, Path(artifacts) if artifacts else None,
                        log=cfg.progress and rank == 0)
        if rank == 0:
            write_json_atomic(Path(tmp) / "results.json", results)
        _close_group()
    except BaseException as e:
        write_json_atomic(Path(tmp) / f"error_rank{rank}.json",
                          {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()})
        raise


def _close_group() -> None:
    """Tear the process group down on every rank together. Objects of finished runs (averagers,
    which hold the gloo backend) are collected first: one left to die at interpreter exit made
    about 1 spawned worker in 10 abort ("terminate called without an active exception")."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


_MAPPED = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError, "FileNotFoundError": FileNotFoundError,
           "FileExistsError": FileExistsError}


def execute(cfg: CifarConfig, data: dict[str, Any], specs: list[RunSpec], artifacts: Path | None) -> list[dict] | None:
    """Run the specs on M workers: the current torchrun group (every rank calls this; rank 0 gets
    the results, the others None), or ``cfg.workers`` processes spawned here (default 2; 1 runs in
    this process). A worker's error is raised here with its type (ValueError, ...) and message."""
    import torch

    import torch.distributed as dist

    if under_torchrun():
        from ...distributed import init_from_env

        device = device_for(cfg, int(os.environ["LOCAL_RANK"]))
        ours = not dist.is_initialized()
        info = init_from_env("nccl" if device.type == "cuda" else "gloo", timeout=cfg.timeout)
        if cfg.workers is not None and cfg.workers != info.world_size:
            raise ValueError(f"--workers {cfg.workers} under torchrun, which started {info.world_size} processes")
        results = _work(cfg, data, info.rank, info.world_size, device, specs, artifacts, log=cfg.progress and info.rank == 0)
        if ours:
            _close_group()
        return results
    world = 1 if all(s.method == "standard" for s in specs) else (cfg.workers or 2)
    with tempfile.TemporaryDirectory(prefix="fishkern-cifar-") as tmp:
        torch.save(data, Path(tmp) / "data.pt")
        args = (world, tmp, cfg, specs, str(artifacts) if artifacts else None)
        if world == 1:
            if dist.is_initialized():
                raise RuntimeError("a torch.distributed process group already exists in this process")
            threads = torch.get_num_threads()
            try:
                _spawn_entry(0, *args)
            finally:
                torch.set_num_threads(threads)
                if dist.is_initialized():
                    dist.destroy_process_group()
        else:
            import torch.multiprocessing as mp

            try:
                mp.start_processes(_spawn_entry, args=args, nprocs=world, join=True, start_method="spawn")
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                errors = sorted(Path(tmp).glob("error_rank*.json"))
                if not errors:
                    raise RuntimeError(f"a worker failed: {e}") from None
                info = json.loads(errors[0].read_text())
                raise _MAPPED.get(info["type"], RuntimeError)(
                    f"worker {errors[0].stem.split('rank')[-1]}: {info['message']}") from None
        return json.loads((Path(tmp) / "results.json").read_text())
