"""Fisher pass on a Llama-shaped decoder LM: fishkern (batched, with and without its self-check)
against the batch-size-1 loop and a plain forward+backward of the same causal-LM loss (the floor),
for an untied (Llama-2-style) and a tied (Llama-3.2-1B-style) output head; and the peak memory of
the pass with the scores in RAM, in a memory-mapped file, and (CUDA) in pinned host memory.

The model is random (LlamaConfig: 8 layers, hidden 512, GQA 8/4 heads, MLP 1376, vocabulary 8192),
the data synthetic: N sequences of T = 256 uniformly random ids, labels = the ids (every next
token a target). The loop runs on a subset of the samples, its time scaled to N (it is linear in N).

    python benchmarks/bench_fisher_lm.py                   # CPU: about 10 minutes on 2 cores
    python benchmarks/bench_fisher_lm.py --quick           # 2 layers, N=8: seconds
    python benchmarks/bench_fisher_lm.py --device cuda     # on a GPU: CUDA events, GPU peak memory

Results: benchmarks/results/fisher_lm_{device}.{md,json} (not with --quick).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from fishkern.fisher import clear_self_check_cache, estimate_fisher  # noqa: E402
from fishkern.reporting import MachineLoad  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(tied: bool, quick: bool):
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376,
                         num_hidden_layers=2 if quick else 8, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=tied)
    return tr.AutoModelForCausalLM.from_config(cfg).eval()


def batches_for(n: int, batch: int, T: int, vocab: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    return [{"input_ids": ids[s:s + batch].to(device), "labels": ids[s:s + batch].to(device)} for s in range(0, n, batch)]


def floor(model, batches) -> None:
    """Forward + backward of the summed next-token loss: what any Fisher method must at least do."""
    for b in batches:
        model.zero_grad()
        logits = model(input_ids=b["input_ids"]).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                          reduction="sum").backward()
    model.zero_grad()


def run_method(method: str, model, batches, n: int, **kw):
    if method == "floor":
        floor(model, batches)
        return None
    clear_self_check_cache()  # each timed call pays for the check as a process's first pass does
    impl = {"fishkern": "auto", "fishkern-nocheck": "auto", "loop": "loop"}[method]
    res = estimate_fisher(model, batches, n, implementation=impl, progress=False,
                          self_check=method != "fishkern-nocheck", **kw)
    if method != "loop":
        assert res.implementation != "loop" and not res.generic_modules, (res.fallback_reason, res.generic_modules)
    return res.scores


def max_rel_error(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)).item() for n in b)


def time_one(fn, device, reps: int) -> list[float]:
    return C.time_calls(fn, device, warmup=0, steps=reps)


def bench_variant(tied: bool, args, device) -> dict:
    model = build(tied, args.quick).to(device)
    params = C.count_params(model)
    batches = batches_for(args.n, args.batch, args.tokens, model.config.vocab_size, device)
    loop_n = min(args.loop_samples, args.n)
    loop_batches = batches_for(loop_n, args.batch, args.tokens, model.config.vocab_size, device)
    C.log(f"{'tied' if tied else 'untied'}: {params:,} parameters, N={args.n}, batch {args.batch}, T={args.tokens}")
    # one untimed pass of each (allocator, thread pools, lazy imports)
    run_method("fishkern-nocheck", model, batches[:1], args.batch)
    floor(model, batches[:1])
    out = {"tied": tied, "params": params, "n": args.n, "loop_n": loop_n, "methods": {}}
    methods = ("floor", "fishkern", "fishkern-nocheck", "loop")
    times = {m: [] for m in methods}
    lost = {m: [] for m in methods}
    # Interleaved (one call of each method per round): a shared machine's load drifts, and each
    # method then sees the same drift.
    for rnd in range(max(args.reps, args.slow_reps)):
        for method in methods:
            if rnd >= (args.slow_reps if method == "loop" else args.reps):
                continue
            n, data = (loop_n, loop_batches) if method == "loop" else (args.n, batches)
            with MachineLoad() as load:
                times[method] += time_one(lambda: run_method(method, model, data, n), device, 1)
            inter = load.result or {}
            lost[method].append((inter.get("steal_s", 0) + inter.get("other_cpu_s", 0)) / max(inter.get("wall_s", 1), 1e-9))
            C.log(f"  round {rnd + 1} {method}: {times[method][-1] * args.n / n:.2f} s for N={args.n}"
                  + (f" (measured on {n}, scaled)" if n != args.n else "")
                  + f"; other processes + hypervisor steal: {lost[method][-1]:.2f} cores")
    for method in methods:
        n = loop_n if method == "loop" else args.n
        scale = args.n / n
        out["methods"][method] = {"times_s": times[method], "median_s": statistics.median(times[method]) * scale,
                                  "min_s": min(times[method]) * scale, "measured_n": n,
                                  "cores_lost": statistics.mean(lost[method]), "cores_lost_per_call": lost[method]}
    ref = run_method("loop", model, loop_batches, loop_n)
    got = run_method("fishkern", model, loop_batches, loop_n)
    out["max_rel_error_vs_loop"] = max_rel_error(got, ref)
    m = out["methods"]
    out["ratios"] = {
        "fishkern/floor": m["fishkern"]["median_s"] / m["floor"]["median_s"],
        "fishkern-nocheck/floor": m["fishkern-nocheck"]["median_s"] / m["floor"]["median_s"],
        "loop/fishkern": m["loop"]["median_s"] / m["fishkern"]["median_s"],
        "self-check share": m["fishkern"]["median_s"] / m["fishkern-nocheck"]["median_s"] - 1,
    }
    return out


# ------------------------------------------------------------------------------------ memory
def child(spec: dict) -> None:
    """One measurement in a fresh process: the peak memory of one Fisher pass (or the floor)."""
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    model = build(spec["tied"], spec["quick"]).to(device)
    batches = batches_for(spec["n"], spec["batch"], spec["tokens"], model.config.vocab_size, device)
    kw = {}
    tmp = None
    if spec["where"] == "file":
        tmp = tempfile.mkdtemp()
        kw["scores_file"] = os.path.join(tmp, "scores.f32")
    elif spec["where"] == "cpu":
        kw["scores_device"] = "cpu"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        C.reset_peak_rss()
        base = C.proc_status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    if spec["where"] == "floor":
        floor(model, batches)
    else:
        estimate_fisher(model, batches, spec["n"], progress=False, **kw)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else C.proc_status_kib("VmHWM") * 1024
    C.print_child_result({"peak_above_model_bytes": peak - base, "seconds": seconds,
                          "measure": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"})


def memory_rows(args, device) -> list[dict]:
    wheres = ["floor", "ram", "file"] + (["cpu"] if device.type == "cuda" else [])
    rows = []
    for tied in (False, True):
        for where in wheres:
            spec = {"device": str(device), "threads": torch.get_num_threads(), "tied": tied, "quick": args.quick,
                    "n": args.memory_n, "batch": args.batch, "tokens": args.tokens, "where": where}
            result, proc = C.run_child(__file__, spec)
            if result is None:
                raise SystemExit(f"memory child {spec} failed:\n{proc.stderr[-3000:]}")
            rows.append({**spec, **result})
            C.log(f"  memory {'tied' if tied else 'untied'} {where}: {C.fmt_bytes(result['peak_above_model_bytes'])}")
    return rows


WHERE = {"floor": "plain forward+backward (floor)", "ram": "fishkern, scores with the parameters",
         "file": "fishkern, scores_file (memory-mapped)", "cpu": "fishkern, scores_device='cpu' (pinned host)"}


def render(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Fisher pass on a Llama-shaped decoder LM ({report['device']})", "",
             f"- device: {env['device_description']}; torch {env['torch']}, transformers {env.get('transformers')}",
             f"- load before the run: {report['load_before']}",
             f"- code: {report['git']} (fishkern sources {report['source_sha256']})",
             f"- command: `{report['command']}`; {report['timestamp']}",
             f"- model: {report['model']}", f"- data: {report['data']}", ""]
    header = ["head", "params", "floor (fwd+bwd)", "fishkern", "fishkern, no self-check", "batch-1 loop",
              "fishkern / floor (min)", "loop / fishkern (min)", "self-check share (min)", "max rel. error vs loop",
              "cores lost (floor / fk / nocheck / loop)"]
    rows = []
    for v in report["variants"]:
        m, r = v["methods"], v["ratios"]
        rows.append(["tied" if v["tied"] else "untied", f"{v['params'] / 1e6:.1f} M",
                     f"{m['floor']['median_s']:.2f} s", f"{m['fishkern']['median_s']:.2f} s",
                     f"{m['fishkern-nocheck']['median_s']:.2f} s",
                     f"{m['loop']['median_s']:.2f} s (on {v['loop_n']}, ×{v['n'] // v['loop_n']})",
                     f"{r['fishkern/floor']:.2f} ({m['fishkern']['min_s'] / m['floor']['min_s']:.2f})",
                     f"{r['loop/fishkern']:.2f} ({m['loop']['min_s'] / m['fishkern']['min_s']:.2f})",
                     f"{r['self-check share']:+.0%} ({m['fishkern']['min_s'] / m['fishkern-nocheck']['min_s'] - 1:+.0%})",
                     f"{v['max_rel_error_vs_loop']:.1e}",
                     " / ".join(f"{m[k].get('cores_lost', 0):.2f}" for k in ("floor", "fishkern", "fishkern-nocheck", "loop"))])
    lines += [f"## Time for N = {report['variants'][0]['n']} sequences (median of {report['reps']}, ratios of medians and, "
              f"in parentheses, of the fastest calls; loop: {report['slow_reps']} calls)",
              "", C.md_table(header, rows), "",
              "Cores lost: CPU time of other processes plus hypervisor steal during that method's timed calls, "
              "per second of wall time (this machine is shared: compare ratios of rows measured alike).", ""]
    if report.get("memory"):
        mrows = [["tied" if r["tied"] else "untied", WHERE[r["where"]], C.fmt_bytes(r["peak_above_model_bytes"]),
                  f"{r['seconds']:.2f} s"] for r in report["memory"]]
        lines += [f"## Peak memory of one pass above the loaded model (N = {report['memory'][0]['n']}, fresh process each; "
                  f"{report['memory'][0]['measure']})", "",
                  C.md_table(["head", "what", "peak above the model", "time"], mrows), ""]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="sequences (64; quick: 8)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=None, help="T (256; quick: 64)")
    ap.add_argument("--loop-samples", type=int, default=16)
    ap.add_argument("--memory-n", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--slow-reps", type=int, default=1)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.n = args.n or (8 if args.quick else 64)
    args.tokens = args.tokens or (64 if args.quick else 256)
    if min(args.n, args.batch, args.tokens, args.loop_samples, args.memory_n, args.reps, args.slow_reps) < 1:
        ap.error("sizes and repetitions must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return {}
    device = torch.device(args.device)
    report = {"device": str(device), "environment": C.environment(device), "git": C.git_revision(),
              "source_sha256": C.source_digest(), "command": C.command_line(argv),
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "load_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "reps": args.reps, "slow_reps": args.slow_reps,
              "model": ("random LlamaForCausalLM, " + ("2" if args.quick else "8") + " layers, hidden 512, 8 heads / 4 KV "
                        "heads, MLP 1376, vocabulary 8192, RMSNorm, untied and tied lm_head; fp32"),
              "data": f"SYNTHETIC: {args.n} sequences of {args.tokens} uniformly random ids, batches of {args.batch}, "
                      "labels = ids (every next token a target)",
              "variants": [bench_variant(tied, args, device) for tied in (False, True)]}
    if not args.skip_memory:
        report["memory"] = memory_rows(args, device)
    md = render(report)
    print(md)
    if not args.quick and argv is None:
        RESULTS.mkdir(exist_ok=True)
        C.write_text(RESULTS / f"fisher_lm_{device.type}.md", md + "\n")
        C.write_json(RESULTS / f"fisher_lm_{device.type}.json", report)
    return report


if __name__ == "__main__":
    main()
