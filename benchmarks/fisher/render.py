"""The markdown report of a run (what bench_fisher.py prints and writes next to the JSON)."""
from __future__ import annotations

from typing import Any

from _common import fmt_bytes, md_table

from .methods import CHECKED_METHODS, RATIOS


def fmt_s(s) -> str:
    if s is None:
        return "n/a"
    if s >= 100:
        return f"{s:,.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.0f} ms"


def fmt_x(x) -> str:
    return "n/a" if x is None else (f"{x:,.0f}×" if x >= 100 else f"{x:.1f}×" if x >= 10 else f"{x:.2f}×")


METHOD_LABEL = {
    "fishkern": "fishkern (batched, `auto`)",
    "fishkern-nocheck": "… same, `self_check=False`",
    "loop": "loop (batch size 1, original)",
    "vmap": "torch.func vmap(grad)",
    "backpack": "BackPACK SumGradSquared",
    "floor": "floor: batched fwd+bwd",
}


def render(report: dict[str, Any]) -> str:
    """The markdown report of a run: how it was measured, one section per workload, the machine's load."""
    env = report["environment"]
    cuda = report["device"] == "cuda"
    s = report["settings"]
    lines = [
        f"# fishkern Fisher-estimation benchmark — {report['device']}" + (" (QUICK)" if s["quick"] else ""),
        "",
        f"- device: {env['device_description']}",
        f"- python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}, "
        f"fishkern {env['fishkern']} (git {report['git']}, sources sha256 {report['fishkern_source_sha256']})",
        f"- command: `{report['command']}`",
        f"- timestamp: {report['timestamp']}; total wall {report.get('total_wall_s', 0):.0f} s",
        f"- timing: {report['timing_method']}; each method warmed up once on a small N, then {s['reps']} timed calls "
        f"(fishkern, floor) or {s['slow_reps']} (loop, vmap, BackPACK), methods interleaved; the table shows the median of the "
        "undisturbed calls (all calls in the JSON). Ratios use times for the full N.",
        "- Fisher: empirical (true labels), fp32 scores, model in eval mode; every method sees the same batches, "
        "already on the device. vmap: per-sample gradients of all parameters materialised per chunk, squared and summed "
        f"(HF models with `{s['vmap_attn']}` attention, mask pre-expanded to 4-D; see the script's docstring). "
        "floor: `model.zero_grad()` + forward + `cross_entropy(...).backward()` per batch, parameters requiring grad.",
        "- check: max over parameters of max|scores − fishkern| / max(fishkern scores of that parameter), denominator "
        "floored at 1e-8 × the global max score, on the same samples.",
    ]
    if cuda:
        lines.append("- memory: `torch.cuda.max_memory_allocated()` during one call minus `memory_allocated()` before it "
                     "(includes the returned scores, or the floor's .grad); 'still allocated after return': memory_allocated() "
                     "after the result was dropped and gc.collect() run, minus before — nonzero means a leak.")
    else:
        lines.append("- memory: peak RSS growth over one call in a fresh process per method (VmHWM reset before the call, "
                     "minus VmRSS before it; after building the model + data and a common 2-sample forward/backward warm-up). "
                     "Includes the returned fp32 scores (or the floor's .grad), one model's worth. 'still allocated after "
                     "return': bytes of tensors still alive (Python-visible storages) after the call returned and its result "
                     "was dropped, gc.collect() run — nonzero means a leak. The process's cold call time is in the JSON.")
    lines.append("")
    for w in report["workloads"]:
        lines += workload_section(w, report, cuda)
    ri = report.get("reference_start"), report.get("reference_end")
    if ri[0] and ri[1] and ri[0].get("reference"):
        lines += [f"Reference workload at start / end of the run: {ri[0]['reference']['median_ms']:.0f} / "
                  f"{ri[1]['reference']['median_ms']:.0f} ms (min {ri[0]['reference']['min_ms']:.0f} / "
                  f"{ri[1]['reference']['min_ms']:.0f} ms); load average {ri[0]['loadavg']} / {ri[1]['loadavg']}. "
                  f"Whole timing phase: other processes used {report['timing_interference']['other_cpu_s']:.1f} CPU s in "
                  f"{report['timing_interference']['wall_s']:.0f} s (steal {report['timing_interference']['steal_s']:.1f} s). "
                  "† marks calls during which other processes used over 10% of a core.", ""]
    if report.get("profile"):
        p = report["profile"]
        lines += ["## Profile of one fishkern call", "", "```", p["torch_profiler"].rstrip(), "```", "", "```", p["cprofile"].rstrip(), "```", ""]
    return "\n".join(lines)




def workload_section(w: dict[str, Any], report: dict[str, Any], cuda: bool) -> list[str]:
    """The data, the methods' table, repeated calls in the memory process, ratios, the goal, interference."""
    lines: list[str] = []
    lines += [f"## {w['title']}", "", w["description"] + ".", ""]
    ds = w["data"]
    if "tokens_per_sample_mean" in ds:
        lines += [f"{ds['params']:,} parameters. Tokens per sample {ds['tokens_per_sample_mean']:.2f} on average "
                  f"({ds['tokens_per_sample_min']}–{ds['tokens_per_sample_max']}); batch shapes "
                  f"{sorted({tuple(b) for b in map(tuple, ds['batch_shapes'])})}; "
                  f"{100 * ds['padding_fraction']:.0f}% of the positions run are padding.", ""]
    else:
        lines += [f"{ds['params']:,} parameters.", ""]
    mem_rows = {r["method"]: r for r in report.get("memory_cpu", []) if r.get("workload") == w["workload"]}
    lines += [methods_table(w, mem_rows, cuda), ""]
    lines += repeats_table(mem_rows)
    rt = w.get("ratios", {})
    parts = []
    for _a, _b, key in RATIOS:
        if key in rt:
            parts.append(f"**{key} = {fmt_x(rt[key])}** (min-based {fmt_x(rt[key + ' (min)'])})")
    if parts:
        lines += ["Ratios: " + ", ".join(parts) + ".", ""]
    lines += goals_lines(w.get("goals") or [])
    lines += interference_table(w)
    return lines


def goals_lines(goals: list[dict[str, Any]]) -> list[str]:
    """The issue's goals for this workload and whether this run meets them."""
    if not goals:
        return []
    rows = []
    for g in goals:
        def val(v):
            if v is None:
                return "n/a"
            return f"{100 * v:.0f}%" if g["ratio"] == "self-check overhead" else fmt_x(v)
        shown_threshold = f"{100 * g['threshold']:.0f}%" if g["ratio"] == "self-check overhead" else f"{g['threshold']:g}×"
        rows.append([g["label"], f"{g['ratio']} {g['op']} {shown_threshold}", val(g["value"]), val(g.get("value_min")),
                     f"**{g['verdict']}**" + (f" ({g['note']})" if g.get("note") else "")])
    return ["Goals (issue 15):", "", md_table(["goal", "test", "measured (median)", "min-based", "verdict"], rows), ""]


def methods_table(w: dict[str, Any], mem_rows: dict[str, Any], cuda: bool) -> str:
    """One row per method: time for N, min, samples/s, time / fishkern, memory, what stays allocated, the check, notes."""
    rows = []
    fk = w["methods"].get("fishkern", {})
    for m, r in w["methods"].items():
        label = METHOD_LABEL[m]
        if r.get("error") and not r.get("median_s"):
            rows.append([label, r["error"], "", "", "", "", "", "", ""])
            continue
        note = []
        if r.get("extrapolated"):
            note.append(f"measured on {r['n_measured']} samples, time ×{w['n'] / r['n_measured']:g} (linear extrapolation)")
        if m == "vmap":
            note.append(f"chunk {r.get('chunk')}" + (f"; OOM at chunk {', '.join(map(str, r['oom']))}" if r.get("oom") else "")
                        + (f"; {r.get('attention')} attention" if r.get("attention") else ""))
        if m == "fishkern" and r.get("implementation"):
            note.append(f"ran `{r['implementation']}`" + (f"; fallback: {r['fallback_reason']}" if r.get("fallback_reason") else "")
                        + (f"; generic rule for {r['generic_modules']}" if r.get("generic_modules") else ""))
        if r.get("disturbed_calls"):
            note.append(f"{r['disturbed_calls']} of {len(r['calls'])} calls disturbed †")
        if cuda:
            mem = r.get("memory") or {}
            mem_s = mem.get("error") or fmt_bytes(mem.get("peak_allocated_growth_bytes"))
            ret_s = "n/a" if mem.get("error") or "retained_after_return_bytes" not in mem else fmt_bytes(mem["retained_after_return_bytes"])
        else:
            mr = mem_rows.get(m)
            mem_s = "not measured" if mr is None else (mr.get("error") or fmt_bytes(mr.get("peak_growth_bytes")))
            ret_s = "not measured" if mr is None or mr.get("retained_after_return_bytes") is None else fmt_bytes(mr["retained_after_return_bytes"])
        chk = w["checks"].get(m)
        chk_s = "—" if m not in CHECKED_METHODS else ("n/a" if chk is None else f"{chk['max_rel_error']:.1e}")
        vs = (r["time_for_n_s"] / fk["time_for_n_s"]) if fk.get("time_for_n_s") and r.get("time_for_n_s") else None
        rows.append([
            label,
            fmt_s(r["time_for_n_s"]) + (" *" if r.get("extrapolated") else "") + (" †" if r.get("disturbed_calls") == len(r["calls"]) else ""),
            fmt_s(r["min_for_n_s"]),
            f"{r['samples_per_s']:,.1f}",
            fmt_x(vs),
            mem_s,
            ret_s,
            chk_s,
            "; ".join(note),
        ])
    return md_table([f"method (N={w['n']})", "time (median)", "min", "samples/s", "time / fishkern", "peak memory growth",
                     "still allocated after return", "max rel. err vs fishkern", "notes"], rows)


def repeats_table(mem_rows: dict[str, Any]) -> list[str]:
    """Repeated calls in the CPU memory process (leak or allocator retention), when measured."""
    rrows = []
    for m, mr in mem_rows.items():
        rp = mr.get("repeats")
        if not rp:
            continue
        per = rp.get("per_call_growth_after_trim_bytes")
        rrows.append([METHOD_LABEL.get(m, m),
                      ", ".join(fmt_bytes(c["rss_growth_bytes"]) for c in rp["calls"]),
                      ", ".join(fmt_bytes(c["rss_growth_after_trim_bytes"]) for c in rp["calls"]),
                      ", ".join(fmt_bytes(c["live_tensor_growth_bytes"]) for c in rp["calls"]),
                      fmt_bytes(per), fmt_bytes(rp.get("per_call_live_tensor_growth_bytes"))])
    if not rrows:
        return []
    return ["Repeated calls in the memory process (leak or retention): after calls 1, 2, … (result dropped, "
            "`gc.collect()`), growth over before the first call of the RSS, of the RSS after glibc's "
            "`malloc_trim(0)`, and of the live tensor bytes. A leak grows every column with each call; "
            "freed memory the allocator keeps shows in the first column only.", "",
            md_table(["method", "RSS", "RSS after malloc_trim(0)", "live tensors",
                      "per further call (trimmed RSS)", "per further call (tensors)"], rrows), ""]


def interference_table(w: dict[str, Any]) -> list[str]:
    """CPU time other processes used during each method's calls, the reference workload and load average around them."""
    irows = []
    for m, r in w["methods"].items():
        pr = r.get("probes") or []
        if not pr:
            continue
        calls = r.get("calls") or []
        other = sum((c.get("interference") or {}).get("other_cpu_s", 0.0) for c in calls)
        wall = sum((c.get("interference") or {}).get("wall_s", 0.0) for c in calls)
        refs = [p["reference"]["median_ms"] for p in pr if p.get("reference")]
        la = [p["loadavg"][0] for p in pr if p.get("loadavg")]
        irows.append([METHOD_LABEL[m], f"{other:.2f} s in {wall:.0f} s",
                      ", ".join(f"{x:.0f}" for x in refs) if refs else "n/a",
                      ", ".join(f"{x:.2f}" for x in la) if la else "n/a"])
    if not irows:
        return []
    return ["Interference: CPU time other processes used during this method's timed calls; the reference workload "
            "(median ms of a 1024² fp32 matmul) and the 1-min load average before/after the method's rounds.", "",
            md_table(["method", "other processes' CPU", "reference workload (ms)", "load average"], irows), ""]
