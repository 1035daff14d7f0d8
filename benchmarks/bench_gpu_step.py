"""One masked AdamW step on BERT-large's 393 parameter tensors, on the GPU: stage 05 of scripts/gpu_check.sh.

    python benchmarks/bench_gpu_step.py --out DIR                       full size, CUDA
    python benchmarks/bench_gpu_step.py --device cpu --tiny --out DIR   the dry run (2 layers, hidden 64)

Variants, all on the same parameters and random fp32 gradients (a uniformly random mask at
--density percent, 0.5 by default, the paper's):
  masked        fishkern.MaskedAdamW(params, mask_indices, lr=1e-4) (implementation "auto": Triton on CUDA)
  fused         torch.optim.AdamW(fused=True) on the dense model
  foreach       torch.optim.AdamW(foreach=True) on the dense model
  original      the original FISH code: dense AdamW (torch's default) after p.grad.mul_(dense 0/1 mask)
For each:
  device ms     CUDA events around one step(), the GPU idle before it and the L2 flushed (a 256 MiB
                write outside the timed region), so the step finds its data in HBM as after a backward
  host ms       time.perf_counter around step() with no synchronisation, steps back to back: the CPU
                cost of issuing the step (when it is near the device time, the step is launch-bound)
  syncs/step    host-device synchronisations in one step, counted twice: torch's sync debug mode
                (torch.cuda.set_sync_debug_mode("warn"): one warning per synchronising call torch
                makes, e.g. .item(), nonzero, a copy to the host) and the profiler's CUDA runtime and
                driver calls that block (*Synchronize, blocking cudaMemcpy); the first sees only
                torch's own calls, the second also other libraries' (Triton's launcher included)
  launches/step kernel launches in one step (profiler: cudaLaunchKernel*, cuLaunchKernel*)
  GB/s          bytes moved / device time. Dense: 28 bytes a parameter (read grad; read and write
                param, exp_avg, exp_avg_sq); original: 40 (plus the mask multiply's 12). Masked,
                two counts: "useful" k x (28 + index bytes), and "sectors" (the 32-byte DRAM sectors
                the gathers and scatters touch at random positions: gradient read, parameter read
                and write) + the k-sized state and indices read and written contiguously
  % of peak     of the device's peak memory bandwidth, computed from its memory clock and bus width
                (2 x clock x width; the source is recorded: torch's device properties, NVML, CuPy,
                or --peak-gbps), and of a measured device-to-device copy (the practical ceiling)
Writes DIR/bench_gpu_step.json and DIR/bench_gpu_step.md, and prints the table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import fishkern  # noqa: E402

LR = 1e-4
BERT_LARGE_PARAMS = 335_143_938
BERT_LARGE_TENSORS = 393


# ----------------------------------------------------------------------------------------- shapes

def bert_shapes(layers=24, hidden=1024, ffn=4096, vocab=30522, positions=512, types=2, labels=2) -> list[tuple[str, tuple]]:
    """BertForSequenceClassification's parameters, in model order, without transformers."""
    out = [("bert.embeddings.word_embeddings.weight", (vocab, hidden)),
           ("bert.embeddings.position_embeddings.weight", (positions, hidden)),
           ("bert.embeddings.token_type_embeddings.weight", (types, hidden)),
           ("bert.embeddings.LayerNorm.weight", (hidden,)), ("bert.embeddings.LayerNorm.bias", (hidden,))]
    for i in range(layers):
        pre = f"bert.encoder.layer.{i}."
        for part in ("query", "key", "value"):
            out += [(pre + f"attention.self.{part}.weight", (hidden, hidden)), (pre + f"attention.self.{part}.bias", (hidden,))]
        out += [(pre + "attention.output.dense.weight", (hidden, hidden)), (pre + "attention.output.dense.bias", (hidden,)),
                (pre + "attention.output.LayerNorm.weight", (hidden,)), (pre + "attention.output.LayerNorm.bias", (hidden,)),
                (pre + "intermediate.dense.weight", (ffn, hidden)), (pre + "intermediate.dense.bias", (ffn,)),
                (pre + "output.dense.weight", (hidden, ffn)), (pre + "output.dense.bias", (hidden,)),
                (pre + "output.LayerNorm.weight", (hidden,)), (pre + "output.LayerNorm.bias", (hidden,))]
    out += [("bert.pooler.dense.weight", (hidden, hidden)), ("bert.pooler.dense.bias", (hidden,)),
            ("classifier.weight", (labels, hidden)), ("classifier.bias", (labels,))]
    return out


def model_shapes(tiny: bool) -> list[tuple[str, tuple]]:
    if tiny:
        return bert_shapes(layers=2, hidden=64, ffn=128, vocab=512, positions=64)
    shapes = bert_shapes()
    n = sum(math.prod(s) for _, s in shapes)
    assert len(shapes) == BERT_LARGE_TENSORS and n == BERT_LARGE_PARAMS, (len(shapes), n)
    return shapes


def random_mask(params, density_pct: float, seed: int, device) -> tuple[list[torch.Tensor], int]:
    """Per-tensor sorted flat indices of k = floor(density x total) entries drawn uniformly over all."""
    numels = [p.numel() for p in params]
    total = sum(numels)
    k = math.floor(density_pct / 100 * total)
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.randperm(total, generator=g, device=device)[:k].sort().values
    bounds = torch.tensor([0] + numels, dtype=torch.int64, device=device).cumsum(0)
    cuts = torch.searchsorted(idx, bounds).tolist()
    return [idx[cuts[i]:cuts[i + 1]] - bounds[i] for i in range(len(numels))], k


# ------------------------------------------------------------------------------------ the device

def peak_gbps_from(clock_hz: float, bus_bits: int) -> float:
    """Peak DRAM bandwidth in GB/s: two transfers a memory clock (DDR / HBM) over the bus."""
    return 2 * clock_hz * bus_bits / 8 / 1e9


PLAUSIBLE_GBPS = (50.0, 50_000.0)  # a source whose units are not what we think gives values outside this


def device_peak_gbps(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak DRAM bandwidth in GB/s = 2 x memory clock x bus width, where the numbers came from)."""
    if override:
        return override, "--peak-gbps"
    if device.type != "cuda":
        return None, "no GPU"
    tried = []
    for peak, source in _peak_candidates(device):
        if peak is not None and PLAUSIBLE_GBPS[0] <= peak <= PLAUSIBLE_GBPS[1]:
            return peak, source + (f" [rejected before it: {'; '.join(tried)}]" if tried else "")
        tried.append(source if peak is None else f"{source} gives an implausible {peak:.4g} GB/s")
    return None, "unknown (" + "; ".join(tried) + "); pass --peak-gbps"


def _peak_candidates(device: torch.device):
    """(peak GB/s or None, description) from each source in turn: torch, NVML, CuPy."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    clock_khz, width = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock_khz and width:
        yield peak_gbps_from(clock_khz * 1e3, width), f"torch device properties (memory_clock_rate {clock_khz} kHz, memory_bus_width {width} bit)"
    else:
        yield None, "torch device properties: memory_clock_rate / memory_bus_width not exposed"
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(idx)
        mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        width = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        yield peak_gbps_from(mhz * 1e6, width), f"NVML (max memory clock {mhz} MHz, bus width {width} bit)"
    except Exception as e:  # not installed, or an old driver without the call
        yield None, f"NVML: {type(e).__name__}: {e}"
    try:
        from cupy.cuda import runtime as rt

        clock_khz = rt.deviceGetAttribute(rt.cudaDevAttrMemoryClockRate, idx)
        width = rt.deviceGetAttribute(rt.cudaDevAttrGlobalMemoryBusWidth, idx)
        yield peak_gbps_from(clock_khz * 1e3, width), f"CuPy cudaDeviceGetAttribute (memory clock {clock_khz} kHz, bus width {width} bit)"
    except Exception as e:
        yield None, f"CuPy: {type(e).__name__}: {e}"


def measured_copy_gbps(device: torch.device) -> float | None:
    """Device-to-device copy of 2 GiB (read + write counted), best of 5: the practical ceiling."""
    if device.type != "cuda":
        return None
    n = 2**29  # fp32 entries: 2 GiB
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * n * 4 / best / 1e9


# ------------------------------------------------------------------------------------ measurement

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_times(fn, device, steps: int) -> list[float]:
    if device.type != "cuda":
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    out = []
    for _ in range(steps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    del flush
    return out


def host_times(fn, device, steps: int) -> tuple[list[float], float]:
    """(perf_counter per call with no synchronisation, wall time per step including the final sync)."""
    sync(device)
    out = []
    t_all = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    sync(device)
    return out, (time.perf_counter() - t_all) / steps


SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
              "cuCtxSynchronize", "cuEventSynchronize", "cudaMemcpy", "cuMemcpyDtoH", "cuMemcpyHtoD")


def count_syncs(fn, device) -> dict:
    """Synchronisations and launches of one call (see the module docstring); None where not measurable."""
    res = {"syncs_debug_mode": None, "syncs_profiler": None, "launches_profiler": None, "sync_calls": {}}
    if device.type != "cuda":
        return res
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    res["syncs_debug_mode"] = sum("synchroniz" in str(w.message).lower() for w in caught)
    sync(device)
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            # the profiler's own stop synchronises; nothing of fn's is counted twice
        names = [e.name for e in prof.events()]
        calls = {n: names.count(n) for n in set(names) if n in SYNC_CALLS}
        res["sync_calls"] = calls
        res["syncs_profiler"] = sum(calls.values())
        res["launches_profiler"] = sum(1 for n in names if n.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    except Exception as e:  # the profiler is extra information; never lose the timings to it
        res["profiler_error"] = f"{type(e).__name__}: {e}"
    return res


def measure(fn, device, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    dev = device_times(fn, device, steps)
    host, pipelined = host_times(fn, device, steps)
    out = {"device_median_s": statistics.median(dev), "device_min_s": min(dev), "device_samples_s": dev,
           "host_median_s": statistics.median(host), "pipelined_s_per_step": pipelined}
    out.update(count_syncs(fn, device))
    return out


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ report

def fmt(x, scale=1.0, digits=3, suffix=""):
    return "n/a" if x is None else f"{x * scale:.{digits}g}{suffix}"


def render(report: dict) -> str:
    s = report["settings"]
    peak, copy_bw = report["device"]["peak_gbps"], report["device"]["copy_gbps"]
    lines = [f"# Masked AdamW step: {report['model']['description']}", "",
             f"{report['device']['name']}; torch {report['env']['torch']}, triton {report['env'].get('triton')}; "
             f"density {s['density_pct']}% (k = {report['model']['k']:,} of {report['model']['params']:,}); "
             f"{s['steps']} timed steps after {s['warmup']} warm-up.",
             f"Peak bandwidth: {fmt(peak, digits=4, suffix=' GB/s')} ({report['device']['peak_source']}); "
             f"measured copy {fmt(copy_bw, digits=4, suffix=' GB/s')}.", "",
             "| variant | device ms (median / min) | host ms/step | pipelined ms/step | syncs/step (debug / profiler) | launches/step "
             "| bytes/step | GB/s | % of peak | % of copy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if r.get("error"):
            lines.append(f"| {r['variant']} | error: {r['error']} |  |  |  |  |  |  |  |  |")
            continue
        for label, b, g in [("", r["bytes"], r["gbps"])] + ([(" (sectors)", r["sector_bytes"], r["sector_gbps"])] if r.get("sector_bytes") else []):
            first = label == ""
            lines.append(
                f"| {r['variant']}{label} | "
                + (f"{fmt(r['device_median_s'], 1e3)} / {fmt(r['device_min_s'], 1e3)} | {fmt(r['host_median_s'], 1e3)} | "
                   f"{fmt(r['pipelined_s_per_step'], 1e3)} | {fmt(r['syncs_debug_mode'])} / {fmt(r['syncs_profiler'])} | "
                   f"{fmt(r['launches_profiler'])} | " if first else "  |  |  |  |  | ")
                + f"{b / 1e6:,.4g} MB | {fmt(g, digits=4)} | {fmt(g / peak if peak else None, 100, 3, '%')} | "
                f"{fmt(g / copy_bw if copy_bw else None, 100, 3, '%')} |")
    masked = next((r for r in report["results"] if r["variant"] == "masked" and not r.get("error")), None)
    if masked:
        lines.append("")
        for r in report["results"]:
            if r["variant"] != "masked" and not r.get("error"):
                ratio = r["device_median_s"] / masked["device_median_s"]
                lines.append(f"- masked vs {r['variant']}: {ratio:.3g}x {'faster' if ratio >= 1 else 'slower'} (device time)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-64 BERT (the dry run)")
    ap.add_argument("--density", type=float, default=0.5, help="mask density in percent (default 0.5)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-gbps", type=float, default=None, help="override the peak bandwidth read from the device")
    ap.add_argument("--variants", nargs="+", default=["masked", "fused", "foreach", "original"])
    ap.add_argument("--out", required=True, help="directory for bench_gpu_step.json and .md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_step: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 1
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    shapes = model_shapes(args.tiny)
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, generator=g, device=device).requires_grad_() for _, s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=device)
    total = sum(p.numel() for p in params)
    masks, k = random_mask(params, args.density, seed=1234, device=device)
    idx_bytes = 4 if max(p.numel() for p in params) < 2**31 else 8
    # 32-byte sectors the masked gathers / scatters touch (8 fp32 entries a sector)
    sectors = sum(int(torch.unique_consecutive(m // 8).numel()) for m in masks)
    peak, peak_source = device_peak_gbps(device, args.peak_gbps)
    copy_bw = measured_copy_gbps(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_properties(device).name if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    print(f"bench_gpu_step: {name}, {len(params)} tensors, {total:,} parameters, k = {k:,}; "
          f"peak {fmt(peak, digits=4, suffix=' GB/s')} ({peak_source}); copy {fmt(copy_bw, digits=4, suffix=' GB/s')}", flush=True)

    results = []
    for variant in args.variants:
        t0 = time.perf_counter()
        entry = {"variant": variant}
        try:
            if variant == "masked":
                opt = fishkern.MaskedAdamW(params, masks, lr=LR)
                step = opt.step
                entry.update(bytes=k * (28 + idx_bytes), sector_bytes=sectors * 32 * 3 + k * (16 + idx_bytes),
                             implementation_requested=opt.implementation, state_bytes=None)
            elif variant in ("fused", "foreach"):
                opt = torch.optim.AdamW(params, lr=LR, **{variant: True})
                step = opt.step
                entry.update(bytes=total * 28)
            elif variant == "original":
                opt = torch.optim.AdamW(params, lr=LR)
                dense_masks = []
                for p, m in zip(params, masks):
                    d = torch.zeros(p.numel(), device=device)
                    d[m] = 1.0
                    dense_masks.append(d.view_as(p))

                def step(opt=opt, dense_masks=dense_masks):
                    for p, m in zip(params, dense_masks):
                        p.grad.mul_(m)
                    opt.step()
                entry.update(bytes=total * 40)
            else:
                raise ValueError(f"unknown variant {variant!r}")
            entry.update(measure(step, device, args.warmup, args.steps))
            if variant == "masked":
                entry["state_bytes"] = opt.state_bytes()
            entry["gbps"] = entry["bytes"] / entry["device_median_s"] / 1e9
            if entry.get("sector_bytes"):
                entry["sector_gbps"] = entry["sector_bytes"] / entry["device_median_s"] / 1e9
            entry["fraction_of_peak"] = entry["gbps"] / peak if peak else None
            print(f"  {variant}: device {entry['device_median_s'] * 1e3:.3f} ms, host {entry['host_median_s'] * 1e3:.3f} ms, "
                  f"syncs {entry['syncs_debug_mode']} / {entry['syncs_profiler']}, {entry['gbps']:.1f} GB/s "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as e:  # e.g. fused AdamW missing for this device: record it, go on
            entry["error"] = f"{type(e).__name__}: {e}"
            print(f"  {variant}: ERROR {entry['error']}", flush=True)
        results.append(entry)
        opt = step = dense_masks = None  # noqa: F841  (frees the dense state before the next variant)
        free(device)

    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": rev,
        "env": {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
                "fishkern": fishkern.__version__, "platform": platform.platform()},
        "device": {"name": name, "peak_gbps": peak, "peak_source": peak_source, "copy_gbps": copy_bw},
        "model": {"description": "BERT-large shapes (393 tensors)" if not args.tiny else "TINY BERT shapes (2 layers, hidden 64)",
                  "tensors": len(params), "params": total, "k": k, "index_bytes": idx_bytes, "sectors_touched": sectors},
        "settings": {"density_pct": args.density, "steps": args.steps, "warmup": args.warmup, "lr": LR, "tiny": args.tiny},
        "results": results,
    }
    (out_dir / "bench_gpu_step.json").write_text(json.dumps(report, indent=1))
    md = render(report)
    (out_dir / "bench_gpu_step.md").write_text(md)
    print("\n" + md)
    return 1 if any(r.get("error") and r["variant"] == "masked" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
