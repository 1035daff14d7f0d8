"""Benchmark fishkern's masked optimizers against dense torch optimizers and the original FISH code.

Measures, on the real per-tensor shapes of BERT-large (335,143,938 parameters) and ResNet-34 for
CIFAR-10 (21,282,122 parameters) with uniformly random masks at several densities:

1. optimizer step time (only ``opt.step()`` is timed; gradients are random and filled once) and
   optimizer-state bytes of
     - fishkern.MaskedAdamW(params, mask_indices, lr=1e-4)  (implementation "auto")
     - torch.optim.AdamW with foreach=True, foreach=False and fused=True
     - the original FISH approach: dense torch.optim.AdamW (torch's default foreach) plus
       ``p.grad.mul_(dense_float_mask)`` for every parameter every step (timed together)
   and, for ResNet-34 (the paper's CIFAR recipe: Nesterov momentum 0.9, weight decay 5e-4),
   fishkern.MaskedSGD against torch.optim.SGD (foreach True / False, fused) and the original
   approach (dense SGD + grad mask). Dense baselines do not depend on the density: they are
   measured once per model.
2. peak memory of whole training steps (forward, backward, optimizer step; 2 steps) at density 0.5%
   for the masked optimizers with and without ``free_dense_grads=True``, dense AdamW/SGD and the
   original approach, each in a fresh subprocess. CPU: the child's resident set size from
   /proc/self/status (VmRSS after building model + optimizer, VmHWM = peak); CUDA:
   torch.cuda.memory_allocated / max_memory_allocated.
3. on CUDA, the achieved memory bandwidth of the masked step as a fraction of ``--peak-gbps``.

Usage:
    python benchmarks/bench_masked_optim.py                  # the full run (CUDA if available)
    python benchmarks/bench_masked_optim.py --quick          # small models, a smoke test
    python benchmarks/bench_masked_optim.py --models resnet34 --densities 0.5 2.5 --skip-memory

Writes benchmarks/results/masked_optim_<device>[_quick].{json,md,csv} (+ _memory.csv, _profile.txt).
"""
from __future__ import annotations

import argparse
import cProfile
import csv
import datetime as _dt
import gc
import io
import json
import pstats
import resource
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

import torch  # noqa: E402

import fishkern  # noqa: E402
from _common import (  # noqa: E402
    MODEL_NAMES,
    build_model,
    command_line,
    count_params,
    cpu_snapshot,
    dense_float_masks,
    environment,
    fmt_bytes,
    free_memory,
    git_revision,
    interference,
    log,
    make_batch,
    md_table,
    model_description,
    print_child_result,
    proc_status_kib,
    random_mask_indices,
    reset_peak_rss,
    run_child,
    source_digest,
    state_tensor_bytes,
    summarize,
    synchronize,
    time_calls,
    training_loss,
    wait_for_quiet,
    write_json,
    write_text,
)

DEFAULT_DENSITIES_PCT = (0.02, 0.1, 0.5, 2.5, 10.0)
ADAMW_LR = 1e-4
SGD_KW = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)  # the paper's CIFAR-10 recipe
MEMORY_DENSITY_PCT = 0.5
MASK_SEED = 1234
GRAD_SEED = 4321

# bytes moved per masked entry (fp32 values, plus the flat index: int32 where every tensor of the
# group has < 2**31 entries, as fishkern stores them): AdamW reads grad, param, exp_avg, exp_avg_sq,
# index and writes param, exp_avg, exp_avg_sq; SGD reads grad, param, momentum, index and writes
# param, momentum. Scattered entries really move whole 32-byte sectors, so at low density the
# hardware moves more than this: the fraction is a lower bound on how busy the memory system is.
ADAMW_VALUE_BYTES = 4 * (4 + 3)
SGD_VALUE_BYTES = 4 * (3 + 2)

MEMORY_CONFIGS = {
    # name: (optimizer family, description)
    "adamw_dense": ("adamw", "torch.optim.AdamW (torch's default foreach/for-loop choice)"),
    "adamw_original": ("adamw", "original FISH: dense AdamW + grad.mul_(dense mask)"),
    "masked_adamw": ("adamw", "MaskedAdamW"),
    "masked_adamw_free": ("adamw", "MaskedAdamW(free_dense_grads=True)"),
    "sgd_dense": ("sgd", "torch.optim.SGD (torch's default foreach/for-loop choice)"),
    "sgd_original": ("sgd", "original FISH: dense SGD + grad.mul_(dense mask)"),
    "masked_sgd": ("sgd", "MaskedSGD"),
    "masked_sgd_free": ("sgd", "MaskedSGD(free_dense_grads=True)"),
}


# ==================================================================================================
# helpers


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:,.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def fmt_x(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}×" if x >= 100 else f"{x:.1f}×"


def index_bytes(params) -> int:
    return 4 if max(p.numel() for p in params) < 2**31 else 8


def fill_random_grads(params, seed: int) -> None:
    g = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype, device=p.device)


# ==================================================================================================
# 1. step time and state bytes


RETRIES = 2  # set from --retries
QUIET_WAIT_S = 120.0  # set from --quiet-wait


def measure(label: str, fn, device, warmup: int, steps: int) -> dict[str, Any]:
    """Time ``fn``, first waiting (up to QUIET_WAIT_S) for other processes to leave the CPU. If they
    still used much CPU meanwhile (on a shared 2-core machine an OpenMP op whose second thread is
    descheduled waits a whole time slice), measure again, up to RETRIES more times, and keep the
    least disturbed attempt; every attempt stays in the result."""
    attempts = []
    for attempt in range(1 + RETRIES):
        if attempt:
            time.sleep(2)
        if QUIET_WAIT_S > 0 and cpu_snapshot() is not None:
            waited = wait_for_quiet(QUIET_WAIT_S)
            if waited > 0.5:
                log(f"  (waited {waited:.0f} s for other processes to quieten down)")
        t0 = time.perf_counter()
        snap = cpu_snapshot()
        times = time_calls(fn, device, warmup, steps)
        res = summarize(times)
        res["interference"] = inter = interference(snap, cpu_snapshot())
        # other processes busy for over 10% of a core meanwhile: the numbers may be inflated
        # (CPU times come in 10 ms ticks, so below 50 ms nothing can be told)
        res["disturbed"] = bool(inter and (inter["other_cpu_s"] + inter["steal_s"]) > max(0.05, 0.1 * inter["wall_s"]))
        note = ""
        if inter:
            note = f", other processes {inter['other_cpu_s']:.2f} CPU s, steal {inter['steal_s']:.2f} s"
        log(f"  {label}: median {fmt_ms(res['median_s'])}, min {fmt_ms(res['min_s'])} ({steps} steps, "
            f"{time.perf_counter() - t0:.1f} s{note})" + ("  ** DISTURBED **" if res["disturbed"] else ""))
        attempts.append(res)
        if not res["disturbed"]:
            break
    best = dict(min(attempts, key=lambda r: (r["disturbed"], (r["interference"] or {}).get("other_cpu_s", 0.0))))
    if len(attempts) > 1:
        best["attempts"] = [dict(a) for a in attempts]
    return best


def profile_step(opt, title: str) -> str:
    """cProfile (Python level, sorted by own time) and torch.profiler (op level) of one step."""
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    opt.step()
    pr.disable()
    wall = time.perf_counter() - t0
    # pstats prints seconds with 3 decimals, useless for a millisecond step: format in microseconds
    stats = pstats.Stats(pr).strip_dirs().stats  # (file, line, func) -> (cc, ncalls, tottime, cumtime, callers)
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:18]
    total_tt = sum(v[2] for v in stats.values())
    out = [f"==== {title}: cProfile of one opt.step() (wall {wall * 1e3:.2f} ms under cProfile; "
           f"sum of own times {total_tt * 1e3:.2f} ms), top functions by own time",
           f"{'ncalls':>8} {'own us':>10} {'own %':>6} {'cum us':>10}  function"]
    for (file, line, func), (_cc, nc, tt, ct, _callers) in rows:
        where = f"{file}:{line}({func})" if line else func
        out.append(f"{nc:>8} {tt * 1e6:>10.1f} {100 * tt / max(total_tt, 1e-12):>5.1f}% {ct * 1e6:>10.1f}  {where}")
    out.append("")
    try:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            opt.step()
        out.append(f"==== {title}: torch.profiler, one opt.step()")
        out.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    except Exception as e:  # the profiler is a bonus; never let it break the benchmark
        out.append(f"(torch.profiler failed: {e!r})")
    return "\n".join(out)


def bench_model(name: str, args, device: torch.device, profiles: list[str]) -> dict[str, Any]:
    log(f"building {name}")
    model = build_model(name, quick=args.quick).to(device)
    params = [p for p in model.parameters()]
    total = count_params(model)
    fill_random_grads(params, GRAD_SEED)
    idx_b = index_bytes(params)
    out: dict[str, Any] = {
        "model": name,
        "description": model_description(name, args.quick),
        "params": total,
        "tensors": len(params),
        "index_bytes": idx_b,
        "masked": [],  # one entry per (optimizer, density)
        "dense": [],  # one entry per baseline (density-independent)
    }
    families = ["adamw"] + (["sgd"] if name == "resnet34" else [])
    mw, ms = args.masked_warmup, args.steps
    dw, ds = args.dense_warmup, args.dense_steps

    # -- masked optimizers, every density
    for fam in families:
        for d in args.densities:
            masks, k = random_mask_indices(params, d / 100, seed=MASK_SEED)
            if fam == "adamw":
                opt = fishkern.MaskedAdamW(params, masks, lr=ADAMW_LR)
                per_entry = ADAMW_VALUE_BYTES + idx_b
                expected_state = 8 * k
            else:
                opt = fishkern.MaskedSGD(params, masks, **SGD_KW)
                per_entry = SGD_VALUE_BYTES + idx_b
                expected_state = 4 * k
            label = f"{name} Masked{'AdamW' if fam == 'adamw' else 'SGD'} {d:g}% (k={k:,})"
            res = measure(label, opt.step, device, mw, ms)
            sb = opt.state_bytes()
            moved = k * per_entry
            gbps = moved / res["median_s"] / 1e9
            entry = {
                "optimizer": fam,
                "variant": "masked",
                "density_pct": d,
                "k": k,
                "num_masked": opt.num_masked(),
                "implementation": opt.implementation,
                "warmup": mw,
                "steps": ms,
                **res,
                "state_bytes": sb,
                "state_bytes_expected": expected_state,
                "state_bytes_ok": sb == expected_state,
                "bytes_moved_model": moved,
                "achieved_gbps": gbps,
                "fraction_of_peak": (gbps / args.peak_gbps) if args.peak_gbps else None,
            }
            if sb != expected_state:
                log(f"  WARNING: state_bytes() = {sb} but expected {expected_state}")
            if args.profile and abs(d - args.profile_density) < 1e-12:
                profiles.append(profile_step(opt, f"{name} Masked{'AdamW' if fam == 'adamw' else 'SGD'} {d:g}% k={k:,}"))
            out["masked"].append(entry)
            del opt, masks
            free_memory()

    # -- dense baselines, once per model
    variants = {
        "adamw": [("foreach", dict(foreach=True)), ("for-loop", dict(foreach=False)), ("fused", dict(fused=True))],
        "sgd": [("foreach", dict(foreach=True)), ("for-loop", dict(foreach=False)), ("fused", dict(fused=True))],
    }
    for fam in families:
        for vname, kw in variants[fam]:
            opt = None
            label = f"{name} {'AdamW' if fam == 'adamw' else 'SGD'} {vname}"
            try:
                opt = torch.optim.AdamW(params, lr=ADAMW_LR, **kw) if fam == "adamw" else torch.optim.SGD(params, **SGD_KW, **kw)
                res = measure(label, opt.step, device, dw, ds)
                entry = {"optimizer": fam, "variant": vname, "kwargs": {k_: v for k_, v in kw.items()}, "warmup": dw, "steps": ds, **res,
                         "state_bytes": state_tensor_bytes(opt), "error": None}
            except Exception as e:  # e.g. fused not available for this device/dtype
                log(f"  {label}: n/a ({type(e).__name__}: {e})")
                entry = {"optimizer": fam, "variant": vname, "kwargs": dict(kw), "median_s": None, "min_s": None, "samples_s": [],
                         "state_bytes": None, "error": f"{type(e).__name__}: {e}"}
            out["dense"].append(entry)
            del opt
            free_memory()

    # -- the original FISH approach: dense optimizer + dense float mask multiply on every gradient.
    # Last, because it zeroes the unmasked gradient entries in place (its cost does not depend on that).
    masks, k = random_mask_indices(params, MEMORY_DENSITY_PCT / 100, seed=MASK_SEED)
    dense_masks = dense_float_masks(params, masks)
    del masks
    mask_bytes = sum(m.numel() * m.element_size() for m in dense_masks)
    def mask_grads():
        for p, m in zip(params, dense_masks):
            p.grad.mul_(m)

    res = measure(f"{name} original FISH: grad.mul_(mask) alone", mask_grads, device, dw, ds)
    out["dense"].append({"optimizer": "any", "variant": "mask-multiply", "kwargs": {}, "mask_density_pct": MEMORY_DENSITY_PCT, "warmup": dw,
                         "steps": ds, **res, "state_bytes": 0, "mask_bytes": mask_bytes, "error": None})
    for fam in families:
        opt = torch.optim.AdamW(params, lr=ADAMW_LR) if fam == "adamw" else torch.optim.SGD(params, **SGD_KW)

        def original_step(opt=opt):
            for p, m in zip(params, dense_masks):
                p.grad.mul_(m)
            opt.step()

        label = f"{name} original FISH ({'AdamW' if fam == 'adamw' else 'SGD'} + grad mask, mask density {MEMORY_DENSITY_PCT:g}%)"
        res = measure(label, original_step, device, dw, ds)
        sb = state_tensor_bytes(opt)
        out["dense"].append({"optimizer": fam, "variant": "original", "kwargs": {}, "mask_density_pct": MEMORY_DENSITY_PCT, "warmup": dw,
                             "steps": ds, **res, "state_bytes": sb, "mask_bytes": mask_bytes, "state_plus_mask_bytes": sb + mask_bytes,
                             "error": None})
        del opt, original_step
        free_memory()
    del dense_masks, params, model, mask_grads
    free_memory()
    return out


# ==================================================================================================
# 2. training-step memory, one configuration per fresh process


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    name, config = spec["model"], spec["config"]
    device = torch.device(spec["device"])
    fam = MEMORY_CONFIGS[config][0]
    cuda = device.type == "cuda"
    rss_start = proc_status_kib("VmRSS")
    model = build_model(name, quick=spec["quick"]).to(device)
    model.train()
    params = list(model.parameters())
    batch = make_batch(name, model, device)
    k = None
    dense_masks = None
    if config.startswith("masked") or config.endswith("original"):
        masks, k = random_mask_indices(params, spec["density_pct"] / 100, seed=MASK_SEED)
    if config == "adamw_dense":
        opt = torch.optim.AdamW(params, lr=ADAMW_LR)
    elif config == "sgd_dense":
        opt = torch.optim.SGD(params, **SGD_KW)
    elif config.endswith("original"):
        dense_masks = dense_float_masks(params, masks)
        opt = torch.optim.AdamW(params, lr=ADAMW_LR) if fam == "adamw" else torch.optim.SGD(params, **SGD_KW)
    else:
        free = config.endswith("_free")
        if fam == "adamw":
            opt = fishkern.MaskedAdamW(params, masks, lr=ADAMW_LR, free_dense_grads=free)
        else:
            opt = fishkern.MaskedSGD(params, masks, **SGD_KW, free_dense_grads=free)
    if k is not None:
        del masks
    gc.collect()
    synchronize(device)
    rss_build = proc_status_kib("VmRSS")
    hwm_build = proc_status_kib("VmHWM")
    alloc_build = torch.cuda.memory_allocated(device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    reset_ok = reset_peak_rss()
    steps = []
    for _ in range(2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = training_loss(name, model, batch)
        loss.backward()
        if dense_masks is not None:
            for p, m in zip(params, dense_masks):
                if p.grad is not None:
                    p.grad.mul_(m)
        opt.step()
        del loss
        synchronize(device)
        steps.append({"wall_s": time.perf_counter() - t0, "rss_after_kib": proc_status_kib("VmRSS"),
                      "peak_rss_so_far_kib": proc_status_kib("VmHWM")})
    hwm_steps = proc_status_kib("VmHWM")
    res: dict[str, Any] = {
        "model": name,
        "config": config,
        "description": MEMORY_CONFIGS[config][1],
        "density_pct": spec["density_pct"] if k is not None else None,
        "k": k,
        "params": sum(p.numel() for p in params),
        "state_bytes": opt.state_bytes() if hasattr(opt, "state_bytes") else state_tensor_bytes(opt),
        "mask_bytes": sum(m.numel() * m.element_size() for m in dense_masks) if dense_masks is not None else 0,
        "rss_start_kib": rss_start,
        "rss_after_build_kib": rss_build,
        "peak_rss_build_kib": hwm_build,
        "peak_rss_reset_ok": reset_ok,
        "peak_rss_steps_kib": hwm_steps if reset_ok else None,
        "peak_rss_overall_kib": max(hwm_build or 0, hwm_steps or 0),
        # ru_maxrss also counts the parent's peak at fork time (Linux keeps the larger); VmHWM does not
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "steps": steps,
    }
    if cuda:
        res["cuda_allocated_after_build_bytes"] = alloc_build
        res["cuda_max_allocated_steps_bytes"] = torch.cuda.max_memory_allocated(device)
        res["cuda_max_reserved_steps_bytes"] = torch.cuda.max_memory_reserved(device)
    return res


def run_memory(args, device: torch.device) -> list[dict[str, Any]]:
    results = []
    for name in args.models:
        configs = ["adamw_dense", "adamw_original", "masked_adamw", "masked_adamw_free"]
        if name == "resnet34" and not args.quick:  # --quick: AdamW only, to stay well under a minute
            configs += ["sgd_dense", "sgd_original", "masked_sgd", "masked_sgd_free"]
        for config in configs:
            spec = {"model": name, "config": config, "device": str(device), "quick": args.quick, "density_pct": MEMORY_DENSITY_PCT}
            t0 = time.perf_counter()
            r, proc = run_child(__file__, spec)
            if r is None:
                log(f"  memory {name} {config}: child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
                results.append({"model": name, "config": config, "description": MEMORY_CONFIGS[config][1], "error": proc.stderr[-3000:]})
                continue
            r["child_wall_s"] = time.perf_counter() - t0
            if device.type == "cuda":
                log(f"  memory {name} {config}: after build {fmt_bytes(r['cuda_allocated_after_build_bytes'])}, "
                    f"peak during steps {fmt_bytes(r['cuda_max_allocated_steps_bytes'])}")
            else:
                log(f"  memory {name} {config}: RSS after build {fmt_bytes(r['rss_after_build_kib'] * 1024)}, "
                    f"peak during steps {fmt_bytes((r['peak_rss_steps_kib'] or 0) * 1024)}, overall {fmt_bytes(r['peak_rss_overall_kib'] * 1024)} "
                    f"({r['child_wall_s']:.0f} s)")
            results.append(r)
    return results


# ==================================================================================================
# reporting


def speedup(base: dict[str, Any] | None, masked_s: float) -> float | None:
    if base is None or base.get("median_s") is None:
        return None
    return base["median_s"] / masked_s


def baseline_rows(fam: str, dense: dict, env: dict[str, Any]) -> list[list[str]]:
    torch_name = "torch.optim.AdamW" if fam == "adamw" else "torch.optim.SGD"
    default = env.get("torch_default_foreach")
    rows = []
    for v in ("foreach", "for-loop", "fused", "original", "mask-multiply"):
        d = dense.get((fam, v)) or dense.get(("any", v))
        if v == "original":
            label = f"original FISH: {torch_name}() default ({default}) + grad.mul_(dense mask)"
        elif v == "mask-multiply":
            label = "… of which grad.mul_(dense mask) over all parameters"
        else:
            label = f"{torch_name} {v}"
        if d is None or d.get("median_s") is None:
            rows.append([label, "n/a" + (f" ({d['error']})" if d and d.get("error") else ""), "", ""])
            continue
        state = fmt_bytes(d["state_bytes"])
        if v == "original":
            state += f" + {fmt_bytes(d['mask_bytes'])} masks"
        elif v == "mask-multiply":
            state = f"({fmt_bytes(d['mask_bytes'])} masks)"
        rows.append([label, fmt_ms(d["median_s"]) + dag(d), fmt_ms(d["min_s"]), state])
    return rows


def dag(entry: dict[str, Any]) -> str:
    return " †" if entry.get("disturbed") else ""


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    dev = report["device"]
    lines = [
        f"# fishkern masked optimizer benchmark — {dev}",
        "",
        f"- device: {env['device_description']}",
        f"- python {env['python']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, fishkern {env['fishkern']} (native CPU ops: {env.get('fishkern_native_ops')}; git {report['git']}, sources sha256 {report['fishkern_source_sha256']})",
        f"- command: `{report['command']}`",
        f"- timestamp: {report['timestamp']}",
        f"- timing: {report['timing_method']}; masked: {report['settings']['masked_warmup']} warm-up + {report['settings']['steps']} timed steps, "
        f"dense: {report['settings']['dense_warmup']} warm-up + {report['settings']['dense_steps']} timed steps; medians shown "
        "(all samples and minima in the JSON). Speed-up = baseline time / masked time.",
        f"- masks: uniformly random, k = ⌊density × total⌋ entries over all parameters (seed {MASK_SEED}); gradients random, filled once; "
        "only `opt.step()` is timed (for the original approach: the mask multiply + `opt.step()`).",
        "- sizes in decimal units (1 GB = 10⁹ bytes); exact byte counts in the JSON.",
    ]
    inter = report.get("timing_interference")
    if inter:
        lines.append(f"- interference during the timing phase ({inter['wall_s']:.0f} s): other processes used {inter['other_cpu_s']:.1f} CPU s, "
                     f"hypervisor steal {inter['steal_s']:.1f} s. † marks a measurement during which other processes used over 10% "
                     "of a core (its time may be inflated).")
    lines.append("")
    for m in report["models"]:
        lines += [f"## {m['model']}: {m['params']:,} parameters in {m['tensors']} tensors", "", m["description"], ""]
        dense = {(d["optimizer"], d["variant"]): d for d in m["dense"]}
        for fam, title, opt_name in (("adamw", "AdamW", "MaskedAdamW"), ("sgd", "SGD (momentum 0.9, Nesterov, wd 5e-4)", "MaskedSGD")):
            rows_m = [e for e in m["masked"] if e["optimizer"] == fam]
            if not rows_m:
                continue
            base_names = [("foreach", "foreach"), ("for-loop", "for-loop"), ("fused", "fused"), ("original", "original FISH")]
            lines += [f"### {title}: step time (median), speed-up of {opt_name}", ""]
            lines += [md_table(["baseline (dense, any density)", "median", "min", "state bytes"], baseline_rows(fam, dense, env)), ""]
            show_bw = True
            hdr = ["density", "k", f"{opt_name} median", "min"] + [f"vs {lbl}" for _, lbl in base_names] + ["GB/s (model)"]
            if report["settings"]["peak_gbps"]:
                hdr.append(f"of {report['settings']['peak_gbps']:g} GB/s")
            rows = []
            for e in rows_m:
                r = [f"{e['density_pct']:g}%", f"{e['k']:,}", fmt_ms(e["median_s"]) + dag(e), fmt_ms(e["min_s"])]
                r += [fmt_x(speedup(dense.get((fam, v)), e["median_s"])) for v, _ in base_names]
                if show_bw:
                    r.append(f"{e['achieved_gbps']:.2f}")
                if report["settings"]["peak_gbps"]:
                    r.append(f"{100 * e['fraction_of_peak']:.1f}%")
                rows.append(r)
            lines += [md_table(hdr, rows), ""]
            # state
            lines += [f"### {title}: optimizer state", ""]
            fe = dense.get((fam, "foreach"))
            orig = dense.get((fam, "original"))
            per = 8 if fam == "adamw" else 4
            rows = []
            for e in rows_m:
                rows.append([
                    f"{e['density_pct']:g}%", f"{e['k']:,}", fmt_bytes(e["state_bytes"]),
                    ("yes" if e["state_bytes_ok"] else f"NO (expected {e['state_bytes_expected']:,})"),
                    fmt_bytes(fe["state_bytes"]) if fe and fe["state_bytes"] is not None else "n/a",
                    fmt_bytes(orig["state_plus_mask_bytes"]) if orig else "n/a",
                    fmt_x(orig["state_plus_mask_bytes"] / e["state_bytes"]) if orig and e["state_bytes"] else "n/a",
                ])
            lines += [md_table(["density", "k", f"{opt_name} state_bytes()", f"= {per}·k", f"dense {title.split(' ')[0]} state",
                                "original (state + float masks)", "original / masked"], rows), ""]
    if report.get("memory"):
        lines += ["## Memory of whole training steps (forward + backward + optimizer step), density 0.5%", ""]
        cuda = report["device"] == "cuda"
        if cuda:
            lines.append("CUDA: torch.cuda.memory_allocated after building model + optimizer (+ batch), max_memory_allocated over 2 training steps.")
        else:
            lines.append("CPU: resident set size of a fresh process per row (VmRSS after building model + optimizer + batch; VmHWM = peak, "
                         "reset after building so the 'steps' column is the peak of the 2 training steps alone; 'overall' includes model "
                         "construction). BERT-large: batch 2 × 128 tokens; ResNet-34: batch 32 × 3×32×32.")
        lines.append("")
        rows = []
        for r in report["memory"]:
            if r.get("error"):
                rows.append([r["model"], r["description"], "failed", "", "", "", ""])
                continue
            if cuda:
                build, peak = r["cuda_allocated_after_build_bytes"], r["cuda_max_allocated_steps_bytes"]
                overall = max(build, peak)
            else:
                build = r["rss_after_build_kib"] * 1024
                peak = (r["peak_rss_steps_kib"] or r["peak_rss_overall_kib"]) * 1024
                overall = r["peak_rss_overall_kib"] * 1024
            rows.append([r["model"], r["description"], fmt_bytes(build), fmt_bytes(peak), fmt_bytes(peak - build), fmt_bytes(overall),
                         fmt_bytes(r["state_bytes"] + r.get("mask_bytes", 0))])
        lines += [md_table(["model", "configuration", "after build", "peak during steps", "step increment", "peak overall",
                            "optimizer state (+ masks)"], rows), ""]
    if report.get("profile_file"):
        lines += [f"Profiles of one masked step at {report['settings']['profile_density']:g}%: `{report['profile_file']}`.", ""]
    return "\n".join(lines)


def _csv_text(rows: list[list[Any]]) -> str:
    f = io.StringIO(newline="")
    csv.writer(f).writerows(rows)
    return f.getvalue()


def write_csv(report: dict[str, Any], path: Path, mem_path: Path) -> None:
    rows: list[list[Any]] = [["model", "optimizer", "variant", "density_pct", "k", "median_ms", "min_ms", "n_samples", "state_bytes",
                              "mask_bytes", "disturbed", "error"]]
    for m in report["models"]:
        for e in m["masked"]:
            rows.append([m["model"], e["optimizer"], "masked", e["density_pct"], e["k"], e["median_s"] * 1e3, e["min_s"] * 1e3,
                         len(e["samples_s"]), e["state_bytes"], 0, e.get("disturbed", ""), ""])
        for d in m["dense"]:
            rows.append([m["model"], d["optimizer"], d["variant"], d.get("mask_density_pct", ""), "",
                         "" if d["median_s"] is None else d["median_s"] * 1e3, "" if d["min_s"] is None else d["min_s"] * 1e3,
                         len(d["samples_s"]), d["state_bytes"], d.get("mask_bytes", ""), d.get("disturbed", ""), d.get("error") or ""])
    write_text(path, _csv_text(rows))
    if report.get("memory"):
        keys = ["model", "config", "density_pct", "k", "params", "state_bytes", "mask_bytes", "rss_start_kib", "rss_after_build_kib",
                "peak_rss_build_kib", "peak_rss_steps_kib", "peak_rss_overall_kib", "ru_maxrss_kib", "cuda_allocated_after_build_bytes",
                "cuda_max_allocated_steps_bytes", "error"]
        rows = [keys] + [[r.get(k_, "") if r.get(k_) is not None else "" for k_ in keys] for r in report["memory"]]
        write_text(mem_path, _csv_text(rows))


# ==================================================================================================


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    ap.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    ap.add_argument("--densities", nargs="+", type=float, default=list(DEFAULT_DENSITIES_PCT), help="in percent (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps of each masked optimizer (default 20, quick 5)")
    ap.add_argument("--masked-warmup", type=int, default=2)
    ap.add_argument("--dense-steps", type=int, default=None, help="timed steps of each dense baseline (default 10; 20 on CUDA; quick 2)")
    ap.add_argument("--dense-warmup", type=int, default=1)
    ap.add_argument("--skip-memory", action="store_true", help="skip the training-step memory measurement")
    ap.add_argument("--quick", action="store_true", help="small models (BERT 2 layers, hidden 256; ResNet [1,1,1,1]) and few steps")
    ap.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth for the masked-step fraction "
                    "(default 3350, H100 SXM, on CUDA; not reported on CPU unless given)")
    ap.add_argument("--retries", type=int, default=2, help="re-measure a timing disturbed by other processes up to this many times")
    ap.add_argument("--quiet-wait", type=float, default=None, help="before each timing, wait up to this many seconds for other "
                    "processes to leave the CPU (default 120 on CPU, 0 on CUDA or with --quick)")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the cProfile/torch.profiler of one masked step")
    ap.add_argument("--profile-density", type=float, default=0.5, help="density (%%) of the profiled masked step")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.steps is None:
        args.steps = 5 if args.quick else 20
    if args.dense_steps is None:
        args.dense_steps = 2 if args.quick else (20 if cuda else 10)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if (cuda or args.quick) else 120.0
    if args.peak_gbps is None and cuda:
        args.peak_gbps = 3350.0
    for d in args.densities:
        if not 0 < d <= 100:
            ap.error(f"densities are percentages in (0, 100], got {d}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print_child_result(memory_child(json.loads(args.child)))
        return 0
    global RETRIES, QUIET_WAIT_S
    RETRIES = max(0, args.retries)
    QUIET_WAIT_S = max(0.0, args.quiet_wait)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    t_start = time.perf_counter()
    env = environment(device)
    command = command_line(argv)
    report: dict[str, Any] = {
        "benchmark": "masked_optim",
        "device": device.type,
        "environment": env,
        "git": git_revision(),
        "fishkern_source_sha256": source_digest(),
        "command": command,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "timing_method": ("CUDA events around each opt.step(), GPU idle and L2 flushed before each" if device.type == "cuda"
                          else "time.perf_counter around each opt.step()"),
        "settings": {"quick": args.quick, "densities_pct": args.densities, "steps": args.steps, "masked_warmup": args.masked_warmup,
                     "dense_steps": args.dense_steps, "dense_warmup": args.dense_warmup, "peak_gbps": args.peak_gbps,
                     "adamw_lr": ADAMW_LR, "sgd": SGD_KW, "mask_seed": MASK_SEED, "grad_seed": GRAD_SEED,
                     "memory_density_pct": MEMORY_DENSITY_PCT, "profile_density": args.profile_density,
                     "bytes_per_masked_entry": {"adamw": f"{ADAMW_VALUE_BYTES} + index", "sgd": f"{SGD_VALUE_BYTES} + index"}},
        "models": [],
        "memory": [],
    }
    log(f"device: {env['device_description']}; command: {command}")
    # Memory first: the children are spawned while this process is still small.
    if not args.skip_memory:
        log("memory: one fresh process per configuration")
        report["memory"] = run_memory(args, device)
    profiles: list[str] = []
    snap = cpu_snapshot()
    for name in args.models:
        report["models"].append(bench_model(name, args, device, profiles))
    report["timing_interference"] = interference(snap, cpu_snapshot())
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"masked_optim_{device.type}" + ("_quick" if args.quick else "")
    if profiles:
        prof_path = out_dir / f"{stem}_profile.txt"
        write_text(prof_path, "\n\n".join(profiles) + "\n")
        report["profile_file"] = str(prof_path.relative_to(REPO)) if prof_path.resolve().is_relative_to(REPO) else str(prof_path)
    report["total_wall_s"] = time.perf_counter() - t_start
    md = render(report)
    print(md)
    write_text(out_dir / f"{stem}.md", md + "\n")
    write_json(out_dir / f"{stem}.json", report)
    write_csv(report, out_dir / f"{stem}.csv", out_dir / f"{stem}_memory.csv")
    log(f"wrote {out_dir}/{stem}.{{md,json,csv}} in {report['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
