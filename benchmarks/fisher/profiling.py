"""A profile of one fishkern call: torch.profiler's top ops, then cProfile's top Python functions."""
from __future__ import annotations

import cProfile
import pstats
import time

import torch

from _common import cpu_snapshot, interference, synchronize

from .load import Quiet
from .methods import run_fishkern
from .workloads import Workload


def profile_fishkern(wl: Workload, args, device: torch.device, quiet: Quiet) -> dict[str, str]:
    out = {}
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    quiet.wait()
    synchronize(device)
    snap = cpu_snapshot()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        run_fishkern(wl, wl.n, args.fishkern_impl)
        synchronize(device)
    wall = time.perf_counter() - t0
    inter = interference(snap, cpu_snapshot())
    out["torch_profiler_interference"] = inter
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort, row_limit=10, max_name_column_width=60)
    except Exception:  # older profiler key name
        sort = "self_cuda_time_total" if device.type == "cuda" else sort
        table = prof.key_averages().table(sort_by=sort, row_limit=10, max_name_column_width=60)
    busy = f"; other processes used {inter['other_cpu_s']:.2f} CPU s meanwhile" if inter else ""
    out["torch_profiler"] = (f"torch.profiler of one estimate_fisher call ({wl.title}; wall {wall:.2f} s under the "
                             f"profiler{busy}), top 10 ops by {sort}:\n" + table)
    # Python level: where the time goes in fishkern's own code
    pr = cProfile.Profile()
    quiet.wait()
    snap = cpu_snapshot()
    t0 = time.perf_counter()
    pr.enable()
    run_fishkern(wl, wl.n, args.fishkern_impl)
    synchronize(device)
    pr.disable()
    wall = time.perf_counter() - t0
    inter = interference(snap, cpu_snapshot())
    busy = f"; other processes used {inter['other_cpu_s']:.2f} CPU s meanwhile" if inter else ""
    stats = pstats.Stats(pr).strip_dirs().stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
    lines = [f"cProfile of one estimate_fisher call (wall {wall:.2f} s under cProfile{busy}), top functions by own time",
             f"{'ncalls':>8} {'own s':>8} {'cum s':>8}  function"]
    for (file, line, func), (_cc, nc, tt, ct, _callers) in rows:
        where = f"{file}:{line}({func})" if line else func
        lines.append(f"{nc:>8} {tt:>8.3f} {ct:>8.3f}  {where}")
    out["cprofile"] = "\n".join(lines)
    return out
