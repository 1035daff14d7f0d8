"""Synchronous data-parallel FISH training: bytes per step and step time, DDP's dense all-reduce
against fishkern's masked comm hook, on real BERT-large shapes.

    python benchmarks/bench_ddp.py                      # spawns 2 gloo ranks on this machine (CPU)
    torchrun --nproc-per-node 2 benchmarks/bench_ddp.py --device cuda   # NCCL, one GPU per rank

For each density (0.02%, 0.5%, 2.5%; a random mask with the head forced in) and each reduction —
``dense``: DDP's own all-reduce of every gradient bucket (4·|θ| bytes a step), DDP's defaults;
``dense-view``: the same with ``gradient_as_bucket_view=True`` (torch's faster setting);
``masked``: ``fishkern.distributed.masked_ddp`` (only the k masked values, 4·k bytes; bucket views
by default); ``masked-bf16`` (2·k) —
every rank runs warm-up + timed steps of forward, backward, MaskedAdamW(free_dense_grads=True)
step. The same steps under ``no_sync()`` (no reduction at all) give the compute floor, so
``step − no_sync`` is what the reduction costs. Bytes are counted at the ``torch.distributed``
call for the masked hooks and from the buckets for DDP's C++ all-reduce. Rank 0 writes
``benchmarks/results/ddp_<device>.{md,json}``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    build_model,
    command_line,
    count_params,
    environment,
    git_revision,
    md_table,
    model_description,
    source_digest,
    write_json,
    write_text,
)

from fishkern import FishMask, MaskedAdamW  # noqa: E402
from fishkern.distributed import masked_ddp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("dense", "dense-view", "masked", "masked-bf16")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.0002, 0.005, 0.025])
    ap.add_argument("--world", type=int, default=2, help="ranks to spawn when not launched by torchrun")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=1, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a 2-layer BERT (a smoke run, not a measurement)")
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/ddp_<device>)")
    ap.add_argument("--render", default=None, metavar="JSON", help="only rewrite the table of a saved result")
    return ap.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(net, model, opt, batch, device, n: int, no_sync: bool) -> list[float]:
    out = []
    for _ in range(n):
        dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        ctx = net.no_sync() if no_sync else _Null()
        with ctx:
            net(**batch).loss.backward()
        if not no_sync:
            opt.step()
        opt.zero_grad()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def run_config(args, device, method: str, density: float) -> dict:
    model = build_model("bert-large", quick=args.quick).to(device)
    mask = FishMask.random(model.named_parameters(), density, seed=0, force="classifier")
    opt = MaskedAdamW(model.named_parameters(), mask, lr=1e-5, weight_decay=0.0, free_dense_grads=True)
    if method.startswith("dense"):
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                        gradient_as_bucket_view=method == "dense-view")
        state = None
    else:
        net = masked_ddp(model, mask, dtype=torch.bfloat16 if method == "masked-bf16" else None,
                         device_ids=[device] if device.type == "cuda" else None)
        state = net._fishkern_comm_state
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": torch.randint(0, 2, (args.batch,), generator=g).to(device)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    time_steps(net, model, opt, batch, device, args.warmup, no_sync=False)
    if state is not None:
        state.reset_stats()
    synced = time_steps(net, model, opt, batch, device, args.steps, no_sync=False)
    sent = state.bytes_sent // args.steps if state is not None else 4 * trainable  # DDP: every bucketed gradient
    floor = time_steps(net, model, opt, batch, device, args.steps, no_sync=True)
    row = {
        "method": method, "density": density, "k": mask.k, "params": count_params(model), "bucketed_params": trainable,
        "bytes_per_step": sent, "bytes_counted_at": "torch.distributed.all_reduce" if state is not None else "DDP buckets",
        "step_s": statistics.median(synced), "no_sync_s": statistics.median(floor),
        "step_all_s": synced, "no_sync_all_s": floor,
    }
    del net, opt, model, state
    gc.collect()  # DDP's reducer and the model form cycles: free them before the next configuration
    dist.barrier()
    return row


def worker(args) -> None:
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    rows = []
    for density in args.densities:
        for method in METHODS:
            rows.append(run_config(args, device, method, density))
            if rank == 0:
                r = rows[-1]
                print(f"density {100 * density:g}%  {method:<12} {r['bytes_per_step'] / 1e6:10.3f} MB/step  "
                      f"step {r['step_s'] * 1e3:8.1f} ms  no_sync {r['no_sync_s'] * 1e3:8.1f} ms", flush=True)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        write(args, device, gathered)


def write(args, device, per_rank: list[list[dict]]) -> None:
    env = environment(device)
    world = len(per_rank)
    rows = per_rank[0]
    for i, r in enumerate(rows):  # a step takes as long as its slowest rank
        r["step_s"] = max(pr[i]["step_s"] for pr in per_rank)
        r["no_sync_s"] = max(pr[i]["no_sync_s"] for pr in per_rank)
        r["reduction_s"] = r["step_s"] - r["no_sync_s"]
    dense = {r["density"]: r for r in rows if r["method"] == "dense"}  # ratios against DDP's defaults
    for r in rows:
        d = dense[r["density"]]
        r["bytes_vs_dense"] = d["bytes_per_step"] / r["bytes_per_step"]
        r["step_speedup_vs_dense"] = d["step_s"] / r["step_s"]
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    stem = Path(args.out) if args.out else RESULTS / f"ddp_{device.type}"
    meta = {
        "command": command_line(), "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git": git_revision(), "fishkern_source_sha256": source_digest(), "world_size": world, "backend": dist.get_backend(),
        "environment": env,
        "model": model_description("bert-large", args.quick), "batch_per_rank": args.batch, "seq": args.seq,
        "warmup": args.warmup, "steps": args.steps, "load_average_1min_at_end": load,
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_suffix(".json"), {"meta": meta, "rows": rows})
    render(meta, rows, stem)


def render(meta: dict, rows: list[dict], stem: Path) -> None:
    env, world, load = meta["environment"], meta["world_size"], meta["load_average_1min_at_end"]
    floors = [r["no_sync_s"] for r in rows]
    lines = [
        f"# Data-parallel FISH step: DDP's dense all-reduce vs fishkern's masked hook — {stem.name.split('_')[-1]}", "",
        f"- device: {env['device_description']}; {world} ranks, backend {meta['backend']}",
        f"- python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, fishkern {env['fishkern']} (git {meta['git']})",
        f"- command: `{meta['command']}`; {meta['timestamp']}; 1-min load average at the end: {load}",
        f"- model: {meta['model']}; {rows[0]['params']:,} parameters; per rank {meta['batch_per_rank']} × {meta['seq']} tokens",
        f"- step = forward + backward (with the reduction) + MaskedAdamW(free_dense_grads=True) step, median of {meta['steps']} "
        f"after {meta['warmup']} warm-up, the slowest rank; no_sync = the same forward + backward without any reduction; "
        "reduction = step − no_sync (it includes the optimizer step, the same for all methods of a density).",
        f"- noise: no_sync is the same computation in every row, yet ranges {min(floors) * 1e3:,.0f}–{max(floors) * 1e3:,.0f} ms "
        "here; differences smaller than that spread (and the reduction column, a difference of two such numbers) are not "
        "meaningful on this machine. Bytes are exact.",
        "- bytes per step and rank: masked hooks counted at `torch.distributed.all_reduce`; dense = 4 × the "
        "parameters DDP buckets (parameters without a masked entry are frozen by the optimizer before DDP wraps the "
        "model, so DDP buckets only the rest).", "",
    ]
    table = [[f"{100 * r['density']:g}%", f"{r['k']:,}", r["method"], f"{r['bytes_per_step'] / 1e6:,.3f} MB",
              f"{r['bytes_vs_dense']:,.0f}×", f"{r['step_s'] * 1e3:,.0f} ms", f"{r['no_sync_s'] * 1e3:,.0f} ms",
              f"{r['reduction_s'] * 1e3:,.0f} ms", f"{r['step_speedup_vs_dense']:.2f}×"] for r in rows]
    lines.append(md_table(["density", "k", "method", "bytes / step / rank", "dense / this", "step", "no_sync", "reduction",
                           "step speed-up vs dense"], table))
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def render_saved(path: str) -> None:
    """Rewrite the .md of a saved .json (no run)."""
    data = json.loads(Path(path).read_text())
    render(data["meta"], data["rows"], Path(path).with_suffix(""))


def _spawned(rank: int, args, store_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=1800))
    try:
        worker(args)
    finally:
        dist.destroy_process_group()


def main() -> None:
    args = parse()
    if args.render:
        render_saved(args.render)
        return
    if "RANK" in os.environ:  # torchrun
        from fishkern.distributed import init_from_env

        init_from_env(backend="nccl" if args.device == "cuda" else "gloo", timeout=1800)
        try:
            worker(args)
        finally:
            dist.destroy_process_group()
        return
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_spawned, args=(args, d), nprocs=args.world)


if __name__ == "__main__":
    main()
