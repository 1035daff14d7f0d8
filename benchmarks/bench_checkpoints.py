"""Checkpoint size and speed: a dense safetensors checkpoint of the whole model against fishkern's
sparse files at density 0.5%, on BERT-large (335,143,938 parameters) and ResNet-34 for CIFAR-10.

The model is built with random weights (benchmarks/_common.py), a uniformly random mask with
k = ⌊0.005 × all parameters⌋ entries is drawn, and one MaskedAdamW step with random gradients
trains it (so exactly the masked entries move). Then, in a temporary directory:

- dense: ``safetensors.torch.save_file`` of all parameters (+ fsync), ``load_file`` (+ a copy of
  every tensor, since safetensors maps the file lazily);
- ``SparseDiff`` (kind "delta", the default, and "absolute"): ``from_models`` (includes the
  sha256 content hashes of base and tuned and the bitwise check outside the mask), ``save``,
  ``load`` (includes the checksum), ``revert_`` / ``apply_`` with ``verify="full"`` (hashes the whole
  model) and ``verify="entries"`` (hashes the k entries);
- ``SparseCheckpointer``: the base written once, one checkpoint of the trained model with the
  MaskedAdamW state and the mask, ``rebuild`` of it.
Sizes are exact file sizes; "dense + AdamW state" is computed (3 × the fp32 model), not written.
Times are medians over --reps runs (fsync included in every write; reads come from the page cache).

    python benchmarks/bench_checkpoints.py            # BERT-large and ResNet-34 (about 1.5 minutes on 2 cores)
    python benchmarks/bench_checkpoints.py --quick    # ResNet-34 only (seconds)

Writes benchmarks/results/checkpoints_<device>[_quick].{md,json}.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(1, os.path.dirname(HERE))
import _common as C  # noqa: E402

from fishkern import MaskedAdamW  # noqa: E402
from fishkern.diff import SparseCheckpointer, SparseDiff, content_hash, size_report  # noqa: E402
from fishkern.mask.fishmask import new_mask  # noqa: E402


def timed(fn, reps, setup=None):
    """(median seconds, all samples, last result) of fn() over reps calls; setup() runs untimed before each."""
    times, out = [], None
    for _ in range(reps):
        if setup is not None:
            setup()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_model(name, args):
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    model = C.build_model(name)
    params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    idx, k = C.random_mask_indices(list(params.values()), args.density, seed=1234)
    mask = new_mask(shapes, dict(zip(params, idx)), provenance={"method": "random", "density": args.density, "seed": 1234})
    base = {n: p.detach().clone() for n, p in params.items()}
    # "training": one MaskedAdamW step with random gradients moves exactly the masked entries
    opt = MaskedAdamW(model.named_parameters(), mask, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.zero_grad()
    C.free_memory()
    setup_s = time.perf_counter() - t0
    print(f"{name}: {n_params:,} parameters in {len(params)} tensors, k = {k:,}; set up in {setup_s:.1f} s", flush=True)
    dense_bytes = sum(p.numel() * p.element_size() for p in params.values())
    rows = []

    def row(what, nbytes, write=None, read=None, use=None, use_what="", note=""):
        r = {"model": name, "what": what, "bytes": nbytes, "vs_dense": dense_bytes / nbytes if nbytes else None,
             "write_s": write, "read_s": read, "use_s": use, "use_what": use_what, "note": note}
        rows.append(r)
        fmt = lambda t: "–" if t is None else f"{t[0] * 1e3:,.0f} ms"  # noqa: E731
        print(f"  {what:52s} {nbytes / 1e6:10,.1f} MB  write {fmt(write):>9s}  read {fmt(read):>9s}  {use_what} {fmt(use)}", flush=True)

    tmp = tempfile.mkdtemp(prefix="fishkern-bench-ckpt-", dir=args.tmpdir)
    try:
        # ---- dense
        path = os.path.join(tmp, "dense.safetensors")
        tensors = {n: p.detach() for n, p in params.items()}

        def remove():
            if os.path.exists(path):
                os.unlink(path)

        w = timed(lambda: (save_file(tensors, path), fsync_path(path)), args.reps, setup=remove)
        # safetensors maps the file lazily: copy every tensor so that the read is complete
        r = timed(lambda: {n: t.clone() for n, t in load_file(path).items()}, args.reps)
        row("dense safetensors (all parameters, fp32)", os.path.getsize(path), w[:2], r[:2], note="read = load_file + copy of every tensor")
        del r
        os.unlink(path)
        C.free_memory()
        rows.append({"model": name, "what": "dense + AdamW state (computed, not written)", "bytes": 3 * dense_bytes,
                     "vs_dense": 1 / 3, "write_s": None, "read_s": None, "use_s": None, "use_what": "", "note": "computed"})

        # ---- SparseDiff
        tuned_sha = content_hash(params)
        for kind in ("delta", "absolute"):
            build = timed(lambda: SparseDiff.from_models(base, model, mask, kind=kind), args.reps)
            diff = build[2]
            path = os.path.join(tmp, f"task.{kind}.safetensors")
            w = timed(lambda: diff.save(path, overwrite=True), args.reps)
            r = timed(lambda: SparseDiff.load(path, mask=mask), args.reps)
            loaded = r[2]
            rep = size_report(path)
            assert rep["k"] == k
            # revert + apply on the trained model itself (it ends trained again)
            # alternate: revert (full) / apply (full), then revert / apply with entries only
            full, fulla, ent, enta = [], [], [], []
            for _ in range(args.reps):
                full.append(timed(lambda: loaded.revert_(model, verify="full"), 1)[0])
                fulla.append(timed(lambda: loaded.apply_(model, verify="full"), 1)[0])
                ent.append(timed(lambda: loaded.revert_(model, verify="entries"), 1)[0])
                enta.append(timed(lambda: loaded.apply_(model, verify="entries"), 1)[0])
            row(
                f"SparseDiff {kind} 0.5% ({loaded.num_fixups} fix-ups)",
                rep["diff_bytes"],
                w[:2],
                r[:2],
                (statistics.median(fulla), fulla),
                "apply_ full",
                note=(
                    f"from_models {build[0]:.2f} s (content hashes + check outside the mask); apply_ entries-only "
                    f"{statistics.median(enta) * 1e3:,.0f} ms; revert_ full {statistics.median(full) * 1e3:,.0f} ms, "
                    f"entries-only {statistics.median(ent) * 1e3:,.0f} ms"
                ),
            )
            rows[-1].update({"from_models_s": build[0], "apply_entries_s": enta, "revert_full_s": full, "revert_entries_s": ent,
                             "bytes_per_entry": rep["bytes_per_entry"]})
            del diff, loaded
        assert content_hash(params) == tuned_sha  # every revert_ was followed by an apply_: bit-exact

        # ---- SparseCheckpointer: base once, then one checkpoint of the trained model + MaskedAdamW state
        chain = os.path.join(tmp, "chain")
        t = time.perf_counter()
        base_state = {n: base[n] if n in base else t.clone() for n, t in model.state_dict().items()}
        ck = SparseCheckpointer(chain, base_state, save_rng=True)
        base_s = time.perf_counter() - t
        t = time.perf_counter()
        entry = ck.save(model, opt, mask, step=1)
        save_s = time.perf_counter() - t
        rb = timed(lambda: ck.rebuild(0), args.reps)
        ok = all(torch.equal(rb[2][n], params[n].detach()) for n in params)
        sizes = ck.sizes()
        row(
            "SparseCheckpointer link (changes + MaskedAdamW state + mask)",
            entry["bytes"],
            (save_s, [save_s]),
            rb[:2],
            None,
            "",
            note=f"{3 * dense_bytes / entry['bytes']:,.0f}× smaller than dense model + AdamW state; write: 1 run (bitwise comparison with the last saved state included); read = rebuild (base + link); base file written once: {sizes['base_bytes'] / 1e9:.2f} GB in {base_s:.1f} s; rebuild bit-exact: {ok}",
        )
        rows[-1].update({"base_bytes": sizes["base_bytes"], "base_write_s": base_s, "rebuild_bit_exact": ok,
                         "optimizer_state_bytes": opt.state_bytes()})
        del ck, rb
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del model, base, opt, params
    C.free_memory()
    return {"model": name, "parameters": n_params, "tensors": len(shapes), "k": k, "density": args.density,
            "dense_bytes": dense_bytes, "description": C.model_description(name, False), "setup_s": setup_s, "rows": rows}


def fmt_t(t):
    return "–" if t is None else f"{t[0] * 1e3:,.0f} ms" if t[0] < 10 else f"{t[0]:,.1f} s"


def markdown(results, env):
    lines = [
        f"# fishkern checkpoint benchmark — {env['device']}",
        "",
        f"- device: {env['device_description']}",
        f"- python {env['python']}, torch {env['torch']}, transformers {env.get('transformers')}, fishkern {env['fishkern']} (git {env.get('git')})",
        f"- command: `{env['command']}`",
        f"- timestamp: {env['timestamp']}",
        "- setup: random weights, uniformly random mask at 0.5% (k = ⌊0.005 × all parameters⌋, seed 1234), one MaskedAdamW "
        "step with random gradients (only the masked entries move). Sizes are exact file sizes, decimal units. Times are "
        "medians; every write includes fsync; reads come from the page cache (just written). `apply_ full` hashes the "
        "whole model (sha256) before writing; the note gives the entries-only variant.",
        "",
    ]
    for res in results:
        inter = res.get("interference")
        lines += [f"## {res['model']}: {res['parameters']:,} parameters in {res['tensors']} tensors, k = {res['k']:,}", ""]
        if inter:
            lines += [f"Interference during this model's run ({inter['wall_s']:.0f} s): other processes used {inter['other_cpu_s']:.1f} CPU s, "
                      f"hypervisor steal {inter['steal_s']:.1f} s (this process {inter['own_cpu_s']:.1f} CPU s).", ""]
        rows = []
        for r in res["rows"]:
            ratio = "1×" if r["what"].startswith("dense safetensors") else (f"{r['vs_dense']:,.0f}×" if r["vs_dense"] and r["vs_dense"] >= 1 else f"{r['vs_dense']:.2f}×")
            rows.append([r["what"], C.fmt_bytes(r["bytes"]), ratio, fmt_t(r["write_s"]), fmt_t(r["read_s"]), fmt_t(r["use_s"]), r["note"]])
        lines += [C.md_table(["file", "bytes", "dense / this", "write", "read", "apply_ (verify full)", "notes"], rows), ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, choices=C.MODEL_NAMES)
    ap.add_argument("--quick", action="store_true", help="ResNet-34 only")
    ap.add_argument("--density", type=float, default=0.005)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quiet-wait", type=float, default=10.0, help="wait up to this many seconds for other processes to go quiet before each model")
    ap.add_argument("--tmpdir", default=None, help="where the temporary files go (default: the system's)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    models = args.models or (["resnet34"] if args.quick else list(C.MODEL_NAMES))
    device = torch.device("cpu")
    env = C.environment(device)
    env["command"] = C.command_line()
    env["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["git"] = C.git_revision()
    env["fishkern_source_sha256"] = C.source_digest()
    t = time.perf_counter()
    results = []
    for name in models:
        waited = C.wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
        snap = C.cpu_snapshot()
        res = run_model(name, args)
        res["waited_for_quiet_s"] = waited
        res["interference"] = C.interference(snap, C.cpu_snapshot())
        results.append(res)
    env["total_s"] = time.perf_counter() - t
    md = markdown(results, env)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"checkpoints_{device.type}{'_quick' if args.quick else ''}")
    C.write_text(stem + ".md", md)
    C.write_json(stem + ".json", {"environment": env, "results": results})
    print(f"wrote {stem}.md and {stem}.json ({env['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
