"""One workload, every method, in the order the data flows: warm-up (finding the vmap chunk that
fits), CUDA memory, timed rounds with the methods interleaved, summaries, the check of the scores
against fishkern's, and the ratios."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import torch

from _common import fmt_bytes, free_memory, log, synchronize

from .load import Quiet, one_call, probe
from .methods import (CHECKED_METHODS, RATIOS, SLOW_METHODS, NotRun, is_oom, measured_n, method_call, prepare, rel_error,
                      run_fishkern, warm_n)
from .workloads import Workload



def bench_workload(wl: Workload, args, device: torch.device, methods: list[str], quiet: Quiet) -> dict[str, Any]:
    cpu = device.type == "cpu"
    out: dict[str, Any] = {
        "workload": wl.name, "title": wl.title, "description": wl.description, "synthetic": wl.synthetic,
        "n": wl.n, "batch_size": wl.batch_size, "data": wl.data_stats, "methods": {}, "checks": {},
    }
    res: dict[str, dict[str, Any]] = {m: {"method": m, "n_measured": measured_n(m, wl), "calls": [], "all_attempts": []} for m in methods}
    for m in methods:
        try:
            prepare(m, wl)  # built once, outside the timed calls (BackPACK's extended copy)
        except NotRun as e:
            res[m]["error"] = f"not run: {e}"
            log(f"  {wl.name} {m}: {res[m]['error']}")
            continue
        warm_up(res[m], m, wl, args, device)
    if not cpu and not args.skip_memory:
        for m in methods:
            cuda_memory(res[m], m, wl, args, device)
    kept_scores, extra = timed_rounds(res, methods, wl, args, device, quiet)
    for m in methods:
        res[m].update(extra.get(m, {}))
        summarize_calls(res[m], wl.n)
    out["checks"] = check_scores(res, kept_scores, wl, args, cpu)
    del kept_scores
    free_memory()
    out["ratios"] = ratios(res)
    out["methods"] = res
    return out


def warm_up(r: dict[str, Any], m: str, wl: Workload, args, device: torch.device) -> None:
    """One untimed call on a small N; for vmap, halve the chunk on OOM (up to --vmap-oom-retries
    times). Sets r["warmup_s"], r["warmup_n"] (r["chunk"] for vmap), or r["error"]."""
    chunk = wl.vmap_chunk
    wn = warm_n(m, wl, chunk)
    tries = [chunk] if m == "vmap" else [None]
    r["oom"] = []
    while True:
        c = tries[-1]
        t0 = time.perf_counter()
        failure = None
        try:
            method_call(m, wl, wn if m != "vmap" else min(wl.vmap_n, c), args, c)
            synchronize(device)
        except NotRun as e:
            failure = ("error", f"not run: {e}")
        except Exception as e:  # noqa: BLE001
            failure = ("oom" if is_oom(e) else "error", f"{type(e).__name__}: {e}")
        free_memory()  # outside the except block: the traceback no longer holds the tensors
        if failure is None:
            r["warmup_s"] = time.perf_counter() - t0
            r["warmup_n"] = wn if m != "vmap" else min(wl.vmap_n, c)
            log(f"  {wl.name} {m}: warm-up on {r['warmup_n']} samples {r['warmup_s']:.2f} s")
            break
        if m == "vmap" and failure[0] == "oom":
            r["oom"].append(c)
            log(f"  {wl.name} vmap: OOM with chunk {c}")
            if len(r["oom"]) <= args.vmap_oom_retries and c > 1:
                tries.append(max(1, c // 2))
                continue
            r["error"] = f"OOM (chunk {', '.join(map(str, r['oom']))})"
        else:
            r["error"] = failure[1][:2000]
            log(f"  {wl.name} {m}: FAILED {r['error']}")
        break
    if m == "vmap":
        r["chunk"] = tries[-1]


def cuda_memory(r: dict[str, Any], m: str, wl: Workload, args, device: torch.device) -> None:
    """One call: peak allocated above what was allocated before it, and what stays allocated after
    its result is dropped (nonzero: a leak). Sets r["memory"]."""
    if r.get("error"):
        return
    free_memory()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        scores, _ = method_call(m, wl, r["n_measured"], args, r.get("chunk"))
        torch.cuda.synchronize(device)
        r["memory"] = {"peak_allocated_growth_bytes": torch.cuda.max_memory_allocated(device) - base,
                       "allocated_before_bytes": base,
                       "max_reserved_bytes": torch.cuda.max_memory_reserved(device)}
        del scores
        gc.collect()
        torch.cuda.synchronize(device)
        r["memory"]["retained_after_return_bytes"] = torch.cuda.memory_allocated(device) - base
    except Exception as e:  # noqa: BLE001
        if is_oom(e):
            r["memory"] = {"error": f"OOM (chunk {r.get('chunk')})"} if m == "vmap" else {"error": "OOM"}
            if m == "vmap":
                r["error"] = f"OOM (chunk {', '.join(map(str, r['oom'] + [r.get('chunk')]))})"
        else:
            r["memory"] = {"error": f"{type(e).__name__}: {e}"}
    free_memory()
    log(f"  {wl.name} {m}: CUDA peak growth {fmt_bytes((r.get('memory') or {}).get('peak_allocated_growth_bytes'))}")


def timed_rounds(res: dict[str, dict[str, Any]], methods: list[str], wl: Workload, args, device: torch.device, quiet: Quiet):
    """--reps (fast methods) or --slow-reps (loop, vmap, backpack) timed calls, the methods interleaved round
    by round, probes of the machine around them. Returns (the last scores of fishkern, loop and
    vmap, on CPU; the last call's info per method)."""
    cpu = device.type == "cpu"
    reps = {m: (args.slow_reps if m in SLOW_METHODS else args.reps) for m in methods}
    kept_scores: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, dict[str, Any]] = {}
    for rnd in range(max(reps.values())):
        for m in methods:
            r = res[m]
            if rnd >= reps[m] or r.get("error"):
                continue
            if rnd == 0 or m in SLOW_METHODS:
                r.setdefault("probes", []).append({"when": f"before round {rnd}", **probe(cpu)})
            try:
                best, attempts, result = one_call(m, wl, r["n_measured"], args, r.get("chunk"), device,
                                                  f"{wl.name} {m} rep {rnd + 1}/{reps[m]}", quiet)
            except Exception as e:  # noqa: BLE001
                r["error"] = ("OOM (chunk %s)" % r.get("chunk")) if is_oom(e) else f"{type(e).__name__}: {e}"
                log(f"  {wl.name} {m}: FAILED {r['error']}")
                failed = True
            else:
                failed = False
            if failed:
                free_memory()
                continue
            r["calls"].append(best)
            r["all_attempts"].append(attempts)
            scores, info = result
            extra[m] = info
            if scores is not None and m in ("fishkern",) + CHECKED_METHODS:
                # keep the last call's scores (on CPU, so the GPU stays free for the next method)
                kept_scores[m] = {k: v.detach().to("cpu", copy=True) if not cpu else v for k, v in scores.items()}
            del result, scores
            if rnd == reps[m] - 1 or m in SLOW_METHODS:
                r["probes"].append({"when": f"after round {rnd}", **probe(cpu)})
    return kept_scores, extra


def summarize_calls(r: dict[str, Any], n: int) -> None:
    """Median of the undisturbed calls (of all when every call was disturbed), minimum, and the
    time for all n samples (a subset's time extrapolated linearly)."""
    times = [c["seconds"] for c in r["calls"]]
    if not times:
        return
    clean = [c["seconds"] for c in r["calls"] if not c["disturbed"]]
    r["median_s"] = statistics.median(clean or times)
    r["min_s"] = min(times)
    r["median_all_s"] = statistics.median(times)
    r["disturbed_calls"] = sum(c["disturbed"] for c in r["calls"])
    r["samples_per_s"] = r["n_measured"] / r["median_s"]
    scale = n / r["n_measured"]
    r["extrapolated"] = scale != 1
    r["time_for_n_s"] = r["median_s"] * scale
    r["min_for_n_s"] = r["min_s"] * scale


def check_scores(res, kept_scores, wl: Workload, args, cpu: bool) -> dict[str, Any]:
    """vmap's and the loop's scores against fishkern's on the same samples (fishkern re-run on a
    subset where they were measured on one)."""
    checks: dict[str, Any] = {}
    if "fishkern" not in kept_scores:
        return checks
    ref_by_n = {wl.n: kept_scores["fishkern"]}
    for m in CHECKED_METHODS:
        if m not in kept_scores:
            continue
        nm = res[m]["n_measured"]
        if nm not in ref_by_n:
            s, _ = run_fishkern(wl, nm, args.fishkern_impl)
            ref_by_n[nm] = {k: v.detach().to("cpu", copy=True) if not cpu else v for k, v in s.items()}
            del s
        checks[m] = rel_error(kept_scores[m], ref_by_n[nm])
        checks[m]["n"] = nm
        log(f"  {wl.name} {m} vs fishkern ({nm} samples): max rel. error {checks[m]['max_rel_error']:.2e} "
            f"({checks[m]['worst_param']})")
    return checks


def ratios(res: dict[str, dict[str, Any]]) -> dict[str, float]:
    """On the times for N (the loop's and vmap's subset times extrapolated), median- and min-based."""
    def t(m, key="time_for_n_s"):
        return res.get(m, {}).get(key)

    out = {}
    for a, b, key in RATIOS:
        if t(a) and t(b):
            out[key] = t(a) / t(b)
            out[key + " (min)"] = t(a, "min_for_n_s") / t(b, "min_for_n_s")
    return out
