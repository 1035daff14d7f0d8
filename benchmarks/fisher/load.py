"""The load of the machine around the timed calls: a fixed reference workload and the load
average (probes), waiting for other processes to leave the CPU, and re-running a call they disturbed."""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

from _common import cpu_snapshot, free_memory, interference, log, synchronize, wait_for_quiet

from .methods import method_call
from .workloads import Workload

DISTURBED_FRACTION = 0.1  # of one core: a call during which other processes used more is re-run

_REF: dict[str, torch.Tensor] = {}


def reference_workload() -> dict[str, float]:
    """A fixed CPU workload (1024x1024 fp32 matmul, torch's threads), 5 timed calls: its slowdown
    tells how much CPU other processes took at that moment."""
    if "a" not in _REF:
        g = torch.Generator().manual_seed(0)
        _REF["a"] = torch.randn(1024, 1024, generator=g)
        _REF["out"] = torch.empty(1024, 1024)
        torch.mm(_REF["a"], _REF["a"], out=_REF["out"])
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(_REF["a"], _REF["a"], out=_REF["out"])
        ts.append(time.perf_counter() - t0)
    return {"min_ms": min(ts) * 1e3, "median_ms": statistics.median(ts) * 1e3}


def probe(cpu: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if cpu:
        out["reference"] = reference_workload()
    return out


class Quiet:
    """Before a call, wait up to ``wait_s`` for other processes to leave the CPU, within a budget of
    ``budget_s`` for the whole run; ``retries``: re-runs of a call they still disturbed."""

    def __init__(self, wait_s: float = 60.0, budget_s: float = 900.0, retries: int = 2):
        self.wait_s, self.budget_s, self.retries = max(0.0, wait_s), max(0.0, budget_s), max(0, retries)
        self.waited_s = 0.0

    def wait(self) -> None:
        left = min(self.wait_s, self.budget_s - self.waited_s)
        if left <= 0 or cpu_snapshot() is None:
            return
        waited = wait_for_quiet(left)
        self.waited_s += waited
        if waited > 0.5:
            log(f"    (waited {waited:.0f} s for other processes to quieten down; {self.waited_s:.0f} s in all)")


def one_call(method: str, wl: Workload, n: int, args, chunk: int | None, device: torch.device, tag: str, quiet: Quiet):
    """One timed call, re-run (up to quiet.retries times) while other processes disturb it.
    Returns (the kept attempt, every attempt, the kept call's result)."""
    attempts = []
    result = None
    for attempt in range(1 + quiet.retries):
        quiet.wait()
        free_memory()
        synchronize(device)
        snap = cpu_snapshot()
        t0 = time.perf_counter()
        result = method_call(method, wl, n, args, chunk)
        synchronize(device)
        dt = time.perf_counter() - t0
        inter = interference(snap, cpu_snapshot())
        disturbed = bool(inter and (inter["other_cpu_s"] + inter["steal_s"]) > max(0.05, DISTURBED_FRACTION * inter["wall_s"]))
        attempts.append({"seconds": dt, "interference": inter, "disturbed": disturbed})
        note = f", other processes {inter['other_cpu_s']:.2f} CPU s, steal {inter['steal_s']:.2f} s" if inter else ""
        log(f"  {tag}: {dt:.3f} s ({n} samples{note})" + ("  ** DISTURBED **" if disturbed else ""))
        if not disturbed:
            break
        if attempt < quiet.retries:
            result = None
            free_memory()
            time.sleep(2)
    best = min(attempts, key=lambda a: (a["disturbed"], a["seconds"] if not a["disturbed"] else
                                         (a["interference"] or {}).get("other_cpu_s", 0.0)))
    return best, attempts, result
