"""CPU memory of each method, one fresh process per (workload, method): peak RSS growth over one
call, tensors still alive after it, and (for the fast methods) RSS and live tensors over repeated
calls, which tells a leak from memory the allocator merely keeps."""
from __future__ import annotations

import argparse
import gc
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from _common import fmt_bytes, log, proc_status_kib, reset_peak_rss, run_child

from .methods import NotRun, is_oom, measured_n, method_call, prepare, run_floor
from .workloads import Workload, build_workload, quiet_transformers

REPEAT_METHODS = ("fishkern", "fishkern-nocheck", "floor")  # the loop and vmap are too slow to repeat
CHILD_ARGS = ("fishkern_impl", "vmap_attn", "vmap_chunk", "loop_samples", "vmap_samples", "backpack_samples")  # what a child needs of the CLI
ENTRY = Path(__file__).resolve().parent.parent / "bench_fisher.py"  # the children run the benchmark's own script


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of all tensors the Python garbage collector can see."""
    seen: dict[tuple[str, int], int] = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            try:
                st = o.untyped_storage()
                seen[(str(st.device), st.data_ptr())] = st.nbytes()
            except Exception:  # noqa: BLE001  meta / sparse / odd subclasses
                pass
    return sum(seen.values())


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In the fresh process: build the workload, a common 2-sample forward + backward warm-up, then
    one measured call."""
    quiet_transformers()
    warnings.filterwarnings("ignore")
    device = torch.device("cpu")
    args = argparse.Namespace(**spec["args"])
    rss_start = proc_status_kib("VmRSS")
    wl = build_workload(spec["workload"], spec["n"], spec["quick"], device, args)
    method = spec["method"]
    # common warm-up for every method: a 2-sample forward + backward pages in the code paths
    run_floor(wl, 2)
    try:
        prepare(method, wl)  # BackPACK's extended copy: built before the measured call
    except NotRun as e:
        return {"workload": wl.name, "method": method, "error": f"not run: {e}"}
    gc.collect()
    rss_build = proc_status_kib("VmRSS")
    hwm_build = proc_status_kib("VmHWM")
    ok = reset_peak_rss()
    n = measured_n(method, wl)
    live_before = live_tensor_bytes()
    t0 = time.perf_counter()
    err = None
    try:
        scores, info = method_call(method, wl, n, args, spec.get("chunk"))
    except Exception as e:  # noqa: BLE001
        scores, info, err = None, {}, ("OOM" if is_oom(e) else f"{type(e).__name__}: {e}")
    wall = time.perf_counter() - t0
    hwm = proc_status_kib("VmHWM")
    rss_after = proc_status_kib("VmRSS")
    scores_bytes = sum(v.numel() * v.element_size() for v in scores.values()) if scores else 0
    scores = None
    gc.collect()
    retained = live_tensor_bytes() - live_before  # tensors still alive after the call, its result dropped
    out = {
        "workload": wl.name, "method": method, "n": n, "error": err,
        "rss_start_kib": rss_start, "rss_before_kib": rss_build, "peak_rss_build_kib": hwm_build,
        "peak_rss_reset_ok": ok, "peak_rss_call_kib": hwm if ok else None, "rss_after_kib": rss_after,
        "peak_growth_bytes": (hwm - rss_build) * 1024 if ok and hwm is not None and rss_build is not None else None,
        "scores_bytes": scores_bytes, "cold_call_s": wall, "info": info,
        "retained_after_return_bytes": retained,
    }
    if err is None and spec.get("repeats", 0) > 0 and method in REPEAT_METHODS:
        out["repeats"] = repeated_calls(method, wl, n, args, spec.get("chunk"), spec["repeats"], rss_build, live_before)
    return out


def _malloc_trim() -> bool:
    """glibc's malloc_trim(0): return the heap's free memory to the OS (False where there is no glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def repeated_calls(method: str, wl: Workload, n: int, args, chunk, repeats: int, rss_build_kib: int,
                   live_before: int) -> dict[str, Any]:
    """The call again `repeats` times; after the first one (already made) and after each repeat, with
    the result dropped and gc.collect() run: VmRSS, VmRSS after malloc_trim(0), live tensor bytes,
    each minus its value before the first call. Linear growth in all three: a leak; growth in the
    first only: memory the allocator keeps for reuse."""
    rows = []

    def record(i: int) -> None:
        gc.collect()
        rss = proc_status_kib("VmRSS")
        trimmed = _malloc_trim()
        rss_trim = proc_status_kib("VmRSS") if trimmed else None
        rows.append({"call": i, "rss_growth_bytes": (rss - rss_build_kib) * 1024,
                     "rss_growth_after_trim_bytes": None if rss_trim is None else (rss_trim - rss_build_kib) * 1024,
                     "live_tensor_growth_bytes": live_tensor_bytes() - live_before})

    record(1)
    for i in range(2, repeats + 2):
        method_call(method, wl, n, args, chunk)
        record(i)
    trim = [r["rss_growth_after_trim_bytes"] for r in rows]
    out: dict[str, Any] = {"calls": rows}
    if len(rows) > 1 and None not in trim:
        # from the second call on: what each further call adds (the first one also pages in code)
        out["per_call_growth_after_trim_bytes"] = (trim[-1] - trim[0]) / (len(rows) - 1)
    out["per_call_live_tensor_growth_bytes"] = (rows[-1]["live_tensor_growth_bytes"] - rows[0]["live_tensor_growth_bytes"]) / max(1, len(rows) - 1)
    return out


def run_memory_cpu(args, workloads: list[str], methods: list[str]) -> list[dict[str, Any]]:
    """The parent side: one child process per (workload, method), in turn."""
    results = []
    child_args = {k: getattr(args, k) for k in CHILD_ARGS}
    for name in workloads:
        for m in methods:
            spec = {"workload": name, "method": m, "n": args.n, "quick": args.quick, "args": child_args,
                    "repeats": args.memory_repeats}
            t0 = time.perf_counter()
            r, proc = run_child(ENTRY, spec)
            if r is None:
                log(f"  memory {name} {m}: child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
                results.append({"workload": name, "method": m, "error": f"child failed (rc {proc.returncode}): {proc.stderr[-1500:]}"})
                continue
            r["child_wall_s"] = time.perf_counter() - t0
            if "rss_before_kib" not in r:  # the method did not run (e.g. BackPACK not installed)
                log(f"  memory {name} {m}: {r.get('error', 'no measurement')}")
                results.append(r)
                continue
            log(f"  memory {name} {m}: RSS before the call {fmt_bytes(r['rss_before_kib'] * 1024)}, peak growth "
                f"{fmt_bytes(r['peak_growth_bytes'])} (cold call {r['cold_call_s']:.1f} s; child {r['child_wall_s']:.0f} s)")
            results.append(r)
    return results
