"""Global top-k benchmark: fishkern.global_topk (multi-tensor, no concatenation) against torch.topk
and torch.kthvalue on the concatenated scores (concatenation time included), on the real per-tensor
shapes of BERT-large (335,143,938 scores) and ResNet-34 (CIFAR, 21,282,122 scores).

Scores are log-normal (exp(4·N(0,1))), heavy-tailed like Fisher information. Reports the median time,
the speed-up, the extra memory of each method (peak RSS above the scores on CPU; peak allocated on
CUDA) and, on CUDA, the effective bandwidth (4 bytes × N / time, i.e. one read of the scores) as a
fraction of --peak-gbps.

    python benchmarks/bench_topk.py                  # full run (about 3 minutes on the 2-core CPU)
    python benchmarks/bench_topk.py --quick          # small shapes, seconds
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import fishkern  # noqa: E402

DENSITIES = (0.0002, 0.001, 0.005, 0.025, 0.10)


def shapes_of(name: str, quick: bool) -> list[tuple[int, ...]]:
    with torch.device("meta"):
        model = C.build_model(name, quick=quick)
    return [tuple(p.shape) for p in model.parameters()]


def make_scores(shapes, device, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).mul_(4).exp_().to(device) for s in shapes]


def measure(fn, device, reps):
    """(median seconds, min seconds, extra peak bytes) of fn()."""
    C.free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        del out
        times = C.time_calls(fn, device, warmup=1, steps=reps)
    else:
        rss = C.proc_status_kib("VmRSS")
        C.reset_peak_rss()
        out = fn()
        extra = (C.proc_status_kib("VmHWM") - rss) * 1024 if rss is not None else None
        del out
        times = C.time_calls(fn, device, warmup=0, steps=reps)
    return statistics.median(times), min(times), extra


def agreement(scores, ours, k) -> str:
    """Compare with torch.topk on the concatenation. fp32 scores repeat at this size, so the two may
    differ only by which entries equal to the threshold they keep: ours must keep the lowest indices."""
    offsets = torch.tensor([0] + [s.numel() for s in scores]).cumsum(0)[:-1].to(scores[0].device)
    ours_global = torch.cat([i + o for i, o in zip(ours, offsets)])
    flat = torch.cat([s.reshape(-1) for s in scores])
    ref = torch.topk(flat, k, sorted=False)
    if k == 0:
        return "same set"
    only_ours = ours_global[~torch.isin(ours_global, ref.indices)]
    only_ref = ref.indices[~torch.isin(ref.indices, ours_global)]
    if only_ours.numel() == 0:
        return "same set"
    thr = ref.values.min()
    ties_only = bool((flat[only_ours] == thr).all() and (flat[only_ref] == thr).all())
    lowest = bool(only_ours.max() < only_ref.min())
    if ties_only and lowest:
        return f"same up to {only_ours.numel()} threshold ties (ours: lowest indices)"
    return f"DIFFERENT ({only_ours.numel()} entries)"


def run_model(name, args, device):
    shapes = shapes_of(name, args.quick)
    scores = make_scores(shapes, device)
    n = sum(s.numel() for s in scores)
    rows = []
    for density in args.densities:
        k = int(density * n)
        ours = fishkern.global_topk(scores, k)
        row = {"model": name, "density": density, "k": k, "n": n}
        row["fishkern"] = measure(lambda: fishkern.global_topk(scores, k), device, args.reps)

        def topk_concat():
            return torch.topk(torch.cat([s.reshape(-1) for s in scores]), k, sorted=False).indices

        def kth_concat():
            flat = torch.cat([s.reshape(-1) for s in scores])
            return torch.kthvalue(flat, n - k + 1).values if k else None

        if not args.skip_baselines:
            row["torch.topk"] = measure(topk_concat, device, args.baseline_reps)
            if device.type == "cpu":  # kthvalue has no CUDA kernel for tensors this large in one call
                row["torch.kthvalue"] = measure(kth_concat, device, args.baseline_reps)
            row["agrees_with_torch_topk"] = agreement(scores, ours, k)
        rows.append(row)
        t = row["fishkern"][0]
        print(
            f"{name:10s} density {density:7.2%} k {k:>11,}  fishkern {t * 1e3:9.2f} ms"
            + (
                f"  torch.topk {row['torch.topk'][0] * 1e3:9.1f} ms ({row['torch.topk'][0] / t:5.1f}x)"
                if "torch.topk" in row
                else ""
            )
            + (
                f"  kthvalue {row['torch.kthvalue'][0] * 1e3:8.1f} ms ({row['torch.kthvalue'][0] / t:5.1f}x)"
                if "torch.kthvalue" in row
                else ""
            ),
            flush=True,
        )
    del scores
    C.free_memory()
    return rows


def markdown(rows, env, args, device):
    lines = [
        f"# fishkern global top-k benchmark — {device.type}",
        "",
        f"- device: {env.get('gpu') or env['cpu_model']}, {env['cpu_count']} cores ({env['torch_num_threads']} torch threads)",
        f"- python {env['python']}, torch {env['torch']}, fishkern {env['fishkern']} (git {env.get('git')})",
        f"- command: `{env['command']}`",
        f"- timestamp: {env['timestamp']}",
        "- scores: log-normal exp(4·N(0,1)) fp32, one tensor per parameter of the model; baselines concatenate "
        "first (concatenation included in their time). Times are medians; extra memory is the peak above the "
        "scores themselves, decimal units (CUDA: peak allocated; CPU: growth of the peak RSS, a LOWER BOUND only, since the process reuses memory freed by earlier rows: read the large rows, e.g. torch.topk's concatenation + sort buffers, not the zeros).",
        "",
    ]
    table = []
    for r in rows:
        f = r["fishkern"]
        tk = r.get("torch.topk")
        kv = r.get("torch.kthvalue")
        table.append(
            [r["model"], f"{r['density']:.2%}", f"{r['k']:,}", f"{f[0] * 1e3:,.1f} ms", C.fmt_bytes(f[2])]
            + ([f"{tk[0] * 1e3:,.0f} ms", C.fmt_bytes(tk[2]), f"{tk[0] / f[0]:.1f}×"] if tk else ["–", "–", "–"])
            + ([f"{kv[0] * 1e3:,.0f} ms", f"{kv[0] / f[0]:.1f}×"] if kv else ["–", "–"])
            + [str(r.get("agrees_with_torch_topk", "–"))]
        )
    lines.append(C.md_table(["model", "density", "k", "fishkern", "extra mem", "torch.topk (cat)", "extra mem", "speed-up",
                             "torch.kthvalue (cat)", "speed-up", "selection vs torch.topk"], table))
    if device.type == "cuda":
        bw = []
        for r in rows:
            gbs = 4 * r["n"] / r["fishkern"][0] / 1e9
            bw.append([r["model"], f"{r['density']:.2%}", f"{gbs:,.0f}", f"{gbs / args.peak_gbps:.0%}"])
        lines += ["", C.md_table(["model", "density", "effective GB/s (one read)", "fraction of peak"], bw)]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(C.MODEL_NAMES), choices=C.MODEL_NAMES)
    ap.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of fishkern.global_topk")
    ap.add_argument("--baseline-reps", type=int, default=1, help="timed repetitions of the (slow) baselines")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small models, for a smoke test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-gbps", type=float, default=3350.0, help="peak memory bandwidth (H100 SXM: 3350)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    device = torch.device(args.device)
    env = C.environment(device)
    env["command"] = C.command_line()
    env["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["git"] = C.git_revision()
    env["fishkern_source_sha256"] = C.source_digest()
    rows = []
    for name in args.models:
        rows += run_model(name, args, device)
    md = markdown(rows, env, args, device)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"topk_{device.type}{'_quick' if args.quick else ''}")
    C.write_text(stem + ".md", md)
    C.write_json(stem + ".json", {"environment": env, "rows": rows})
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
