"""The command line of benchmarks/bench_fisher.py: options, then the run — CPU memory children
first (while this process is still small), then each workload's timings, the report."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from _common import (
    BENCH_DIR,
    command_line,
    cpu_snapshot,
    environment,
    free_memory,
    git_revision,
    interference,
    log,
    print_child_result,
    source_digest,
    write_json,
    write_text,
)

from .goals import derived_ratios, evaluate
from .load import Quiet, probe
from .memory import memory_child, run_memory_cpu
from .methods import DEFAULT_METHODS, METHODS, has_self_check
from .profiling import profile_fishkern
from .render import render
from .timing import bench_workload
from .workloads import ALL_WORKLOADS, CPU_WORKLOADS, CUDA_WORKLOADS, build_workload, quiet_transformers

DESCRIPTION = ("Fisher-estimation benchmark: time and peak memory of five ways to compute the diagonal empirical\n"
               "Fisher F = sum_n (d loss_n / d theta)^2 over the same N samples, side by side in one run.")
SETTINGS = ("quick", "workloads", "methods", "n", "reps", "slow_reps", "loop_samples", "vmap_samples", "backpack_samples",
            "vmap_chunk",
            "vmap_oom_retries", "vmap_attn", "fishkern_impl", "skip_memory", "memory_repeats", "retries", "quiet_wait",
            "quiet_budget")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    ap.add_argument("--workloads", nargs="+", default=None, choices=ALL_WORKLOADS,
                    help=f"default: {' '.join(CPU_WORKLOADS)} on CPU, {' '.join(CUDA_WORKLOADS)} on CUDA")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                    help="fishkern-nocheck: estimate_fisher(self_check=False), where this fishkern has the option")
    ap.add_argument("--n", type=int, default=None, help="samples per workload (default: per workload, see the docstring)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls of fishkern and the floor (default 5, quick 2)")
    ap.add_argument("--slow-reps", type=int, default=None, help="timed calls of the loop, vmap and BackPACK (default 2, quick 1)")
    ap.add_argument("--loop-samples", type=int, default=None,
                    help="run the loop on the first this-many samples and extrapolate its time to N "
                    "(default: the workload's subset, configs.py; 128 on CUDA)")
    ap.add_argument("--vmap-samples", type=int, default=None, help="the same for vmap (default: the workload's subset)")
    ap.add_argument("--backpack-samples", type=int, default=None,
                    help="the same for BackPACK's SumGradSquared (default: the workload's subset, else all)")
    ap.add_argument("--vmap-chunk", type=int, default=None, help="samples per vmap call (default: 8 for MiniLM on CPU, 32 for BERT-large on CUDA, 128 for ResNet on CUDA)")
    ap.add_argument("--vmap-oom-retries", type=int, default=2, help="on OOM, halve the vmap chunk up to this many times")
    ap.add_argument("--vmap-attn", default="eager", help="attention implementation of HF models under vmap (eager or sdpa)")
    ap.add_argument("--fishkern-impl", default="auto", choices=("auto", "torch", "triton"), help="estimate_fisher implementation")
    ap.add_argument("--skip-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--memory-repeats", type=int, default=4,
                    help="in the CPU memory processes, call fishkern and the floor this many more times and record the RSS "
                         "and live tensors after each call (leak vs allocator retention; 0: skip)")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profile of one fishkern call")
    ap.add_argument("--quick", action="store_true", help="each workload's quick_n samples (configs.py), fewer calls, no memory subprocesses")
    ap.add_argument("--retries", type=int, default=None, help="re-run a call disturbed by other processes up to this many times "
                    "(default 2, quick 0)")
    ap.add_argument("--quiet-wait", type=float, default=None, help="before each call, wait up to this many seconds for other "
                    "processes to leave the CPU (default 90 on CPU, 0 on CUDA or with --quick)")
    ap.add_argument("--quiet-budget", type=float, default=1500.0, help="at most this many seconds of such waiting in all")
    ap.add_argument("--out-dir", "--out", dest="out_dir", default=str(BENCH_DIR / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.workloads is None:
        args.workloads = list(CUDA_WORKLOADS if cuda else CPU_WORKLOADS)
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    if args.slow_reps is None:
        args.slow_reps = 1 if args.quick else 2
    if args.loop_samples is None and cuda:
        args.loop_samples = 128 if not args.quick else 32
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if (cuda or args.quick) else 90.0
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    if args.quick and not cuda:
        args.skip_memory = True
    if args.memory_repeats < 0:
        ap.error("--memory-repeats must be >= 0")
    for k in ("n", "reps", "slow_reps", "loop_samples", "vmap_samples", "backpack_samples", "vmap_chunk"):
        v = getattr(args, k)
        if v is not None and v < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print_child_result(memory_child(json.loads(args.child)))
        return 0
    quiet = Quiet(args.quiet_wait, args.quiet_budget, args.retries)
    if "fishkern-nocheck" in args.methods and not has_self_check():
        args.methods = [m for m in args.methods if m != "fishkern-nocheck"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented the batching rule.*")
    quiet_transformers()
    t_start = time.perf_counter()
    env = environment(device)
    command = command_line(argv)
    cpu = device.type == "cpu"
    report: dict[str, Any] = {
        "benchmark": "fisher",
        "device": device.type,
        "environment": env,
        "git": git_revision(),
        "fishkern_source_sha256": source_digest(),
        "command": command,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "timing_method": ("torch.cuda.synchronize() + time.perf_counter around each call" if not cpu
                          else "time.perf_counter around each call"),
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "workloads": [],
    }
    log(f"device: {env['device_description']}; command: {command}")
    report["reference_start"] = probe(cpu)
    if cpu and not args.skip_memory:
        log("memory: one fresh process per (workload, method)")
        report["memory_cpu"] = run_memory_cpu(args, args.workloads, args.methods)
    snap = cpu_snapshot()
    for name in args.workloads:
        log(f"workload {name}: building")
        wl = build_workload(name, args.n, args.quick, device, args)
        log(f"workload {wl.title}: {wl.data_stats['params']:,} parameters")
        w = bench_workload(wl, args, device, args.methods, quiet)
        w["ratios"].update(derived_ratios(w, report.get("memory_cpu", [])))
        w["goals"] = evaluate(wl.config.goals, w["ratios"], wl.n) if wl.config else []
        for verdict in w["goals"]:
            log(f"  goal {verdict['label']}: {verdict['verdict']} ({verdict['value']})")
        if args.profile and "fishkern" in args.methods and (name == args.workloads[0]):
            log("profiling one fishkern call")
            try:
                report["profile"] = profile_fishkern(wl, args, device, quiet)
            except Exception as e:  # noqa: BLE001  the profile is a bonus
                report["profile"] = {"torch_profiler": f"(failed: {e!r})", "cprofile": ""}
        report["workloads"].append(w)
        del wl
        free_memory()
    report["timing_interference"] = interference(snap, cpu_snapshot()) or {"other_cpu_s": 0.0, "wall_s": 0.0, "steal_s": 0.0}
    report["reference_end"] = probe(cpu)
    report["quiet_waited_s"] = quiet.waited_s
    report["total_wall_s"] = time.perf_counter() - t_start
    md = render(report)
    print(md)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"fisher_{device.type}" + ("_quick" if args.quick else "")
    write_text(out_dir / f"{stem}.md", md + "\n")
    write_json(out_dir / f"{stem}.json", report)
    log(f"wrote {out_dir}/{stem}.{{md,json}} in {report['total_wall_s']:.0f} s")
    return 0
