"""Whole FISH training steps with and without sparse backward, against dense fused AdamW.

Part 1, the training step (forward + backward + optimizer step; median of timed steps after a
warm-up) and its peak memory, each configuration in a fresh process:

- ``dense``: torch.optim.AdamW(fused=True) with torch's dense backward;
- ``fish``: fishkern.MaskedAdamW(free_dense_grads=True, sparse_backward=False): dense backward,
  gradients gathered to k entries in backward hooks;
- ``fish+sparse``: fishkern.MaskedAdamW(model, mask): weight gradients of Linear / Embedding layers
  at the masked entries only (fishkern.optim.sparse_backward).

Models: MiniLM (the demo's model, pretrained, offline) on the demo's data (VADER-labelled
sentences, batch 32 x 16 tokens as the demo trains) with its real FISH mask (N = 256 Fisher
samples, classifier forced in, as the demo); BERT-base and BERT-large shapes (random weights,
uniformly random masks) at batch 8 x 128 random tokens. Densities 0.02%, 0.5% and 2.5%.

Part 2, the layer kernel: ``fishkern::sampled_matmul`` against dense-then-gather (the dense GEMM
and an index_select) for BERT's weight shapes at T = 1024 tokens, by density: where the crossover
``fishkern.optim.sparse_backward.DENSE_ABOVE`` comes from.

    python benchmarks/bench_sparse_backward.py                 # CPU: about 15 minutes on 2 cores
    python benchmarks/bench_sparse_backward.py --quick         # tiny models: seconds
    python benchmarks/bench_sparse_backward.py --device cuda   # GPU: CUDA events, BERT-large 32 x 128

Results: benchmarks/results/sparse_backward_{device}.{md,json} (not with --quick).
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

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("dense", "fish", "fish+sparse")
DENSITIES = (0.0002, 0.005, 0.025)
LAYER_SHAPES = ((768, 768), (3072, 768), (768, 3072), (1024, 1024), (4096, 1024))
LAYER_DENSITIES = (0.0002, 0.005, 0.01, 0.025, 0.05, 0.1)


# ----------------------------------------------------------------------------- models and data

def bert(shape: str):
    from transformers import BertConfig, BertForSequenceClassification

    sizes = {
        "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        "bert-quick": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    }[shape]
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=2, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0, **sizes))


def bert_batches(model, batch: int, tokens: int, n: int, device):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": torch.randint(0, 2, (batch,), generator=g).to(device)})
    return out


def minilm(quick: bool):
    """The demo's model, data and batches (fishkern.runners.demo)."""
    from fishkern.runners.demo import DemoConfig, _load

    cfg = DemoConfig(quick=quick, progress=False)
    model, _base, train_enc, _val, _split, TensorBatches = _load(cfg)
    return model, cfg, train_enc, TensorBatches


def minilm_masks(quick: bool, densities, out_dir: Path) -> dict[str, str]:
    """The demo's FISH masks (one Fisher estimate, masks at every density), saved for the children."""
    from fishkern.fisher.mask import fisher_provenance, model_scores
    from fishkern.finetune import select_mask
    from fishkern.mask.builders import from_scores

    model, cfg, train_enc, TensorBatches = minilm(quick)
    data = TensorBatches(train_enc, cfg.batch_size, shuffle=True, seed=10_000, trim_padding=True)
    _, result = select_mask(model, "fish", densities[0], fisher_data=data, num_samples=64 if quick else cfg.num_samples,
                            head=("classifier",), progress=False)
    scores, frozen = model_scores(model, result)
    paths = {}
    for d in densities:
        mask = from_scores(scores, d, force="classifier", exclude=frozen, provenance=fisher_provenance(result))
        paths[str(d)] = str(out_dir / f"minilm_{d}.safetensors")
        mask.save(paths[str(d)], overwrite=True)
    return paths


def setup(spec: dict, device):
    """(model, batches, loss(model, batch), mask or None)."""
    from fishkern import FishMask

    name = spec["model"]
    if name.startswith("minilm"):
        model, cfg, train_enc, TensorBatches = minilm(spec["quick"])
        data = TensorBatches(train_enc, cfg.batch_size, shuffle=True, seed=0, trim_padding=True)
        batches = [{k: v.to(device) for k, v in b.items()} for _, b in zip(range(spec["warmup"] + spec["steps"]), data)]
        mask = FishMask.load(spec["mask_file"]) if spec["method"] != "dense" else None
    else:
        model = bert(name)
        batches = bert_batches(model, spec["batch"], spec["tokens"], spec["warmup"] + spec["steps"], device)
        mask = None
        if spec["method"] != "dense":
            mask = FishMask.random(dict(model.named_parameters()), spec["density"], seed=1234)
    return model.to(device).train(), batches, mask


def build_optimizer(model, method: str, mask):
    import fishkern

    if method == "dense":
        return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
    if method == "fish":
        return fishkern.MaskedAdamW(model.named_parameters(), mask, lr=1e-5, weight_decay=0.0, free_dense_grads=True,
                                    sparse_backward=False)
    return fishkern.MaskedAdamW(model, mask, lr=1e-5, weight_decay=0.0, sparse_backward=True)


# ----------------------------------------------------------------------------- one configuration

def child(spec: dict) -> dict:
    from fishkern.memory import PeakMemory, release_freed_memory

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model, batches, mask = setup(spec, device)
    release_freed_memory()
    it = iter(batches)
    times = []
    with PeakMemory(device) as peak:
        opt = build_optimizer(model, spec["method"], mask)

        def step():
            b = next(it)
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for i in range(spec["warmup"] + spec["steps"]):
            C.synchronize(device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                dt = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                step()
                dt = time.perf_counter() - t0
            if i >= spec["warmup"]:
                times.append(dt)
    layers = opt.sparse_backward.layers() if getattr(opt, "sparse_backward", None) is not None else []
    dense_grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() >= 2)
    avoided = sum(l["entries"] * 4 for l in layers)  # fp32 dense weight gradients never formed
    return {
        "spec": spec, "median_s": statistics.median(times), "min_s": min(times), "samples_s": times,
        "peak_bytes": peak.peak_bytes, "peak_kind": peak.kind, "k": mask.k if mask is not None else None,
        "params": sum(p.numel() for p in model.parameters()), "layers_sparse": len(layers),
        "layers_sampled": sum(l["path"] == "sampled" for l in layers), "dense_weight_grad_bytes": dense_grad_bytes,
        "weight_grad_bytes_avoided": avoided,
    }


# ----------------------------------------------------------------------------- layer kernel

def _csr(idx, rows: int, cols: int, dtype):
    r = torch.div(idx, cols, rounding_mode="floor")
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=idx.device)
    crow[1:] = torch.bincount(r, minlength=rows).cumsum(0)
    return torch.sparse_csr_tensor(crow, idx - r * cols, torch.zeros(idx.numel(), dtype=dtype, device=idx.device),
                                   (rows, cols), check_invariants=False)


def layer_table(device, quick: bool) -> list[dict]:
    from fishkern.ops.sampled_matmul import sampled_matmul

    rows = []
    tokens = 128 if quick else 1024
    shapes = LAYER_SHAPES[:1] if quick else LAYER_SHAPES
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in shapes:
        if quick:
            out_f, in_f = out_f // 8, in_f // 8
        a = torch.randn(tokens, out_f, generator=g).to(device)
        b = torch.randn(tokens, in_f, generator=g).to(device)
        for d in LAYER_DENSITIES:
            k = max(1, int(d * out_f * in_f))
            idx = torch.randperm(out_f * in_f, generator=g)[:k].sort().values.to(device)
            reps = 3 if quick else 7
            t_s = statistics.median(C.time_calls(lambda: sampled_matmul(a, b, idx), device, 1, reps))
            t_d = statistics.median(C.time_calls(lambda: (a.t() @ b).reshape(-1).index_select(0, idx), device, 1, reps))
            # torch's own SDDMM: the mask as a CSR matrix (built once, outside the timing)
            csr = _csr(idx, out_f, in_f, a.dtype)
            at = a.t()
            t_t = statistics.median(C.time_calls(lambda: torch.sparse.sampled_addmm(csr, at, b, beta=0.0), device, 1, reps))
            rows.append({"shape": f"{out_f}x{in_f}", "density": d, "k": k, "sampled_ms": 1e3 * t_s,
                         "dense_gather_ms": 1e3 * t_d, "speedup": t_d / t_s, "torch_sampled_addmm_ms": 1e3 * t_t})
            C.log(f"layer {out_f}x{in_f} {100 * d:g}%: sampled {1e3 * t_s:.2f} ms, dense+gather {1e3 * t_d:.2f} ms")
    return rows


# ----------------------------------------------------------------------------- report

def render(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# Sparse backward: whole training steps ({report['device']})", "",
        f"Command: `{report['command']}`  ", f"Date: {report['date']}, git {report['git']}  ",
        f"Device: {env['device_description']}; torch {env['torch']}, transformers {env['transformers']}  ",
        f"Machine load during the run: {report['load']}", "",
        "Median whole step (forward + backward + optimizer step) and peak memory growth during training "
        "(CPU: resident set size, sampled; includes the optimizer's state). `fish`: MaskedAdamW with "
        "free_dense_grads=True and torch's dense backward; `fish+sparse`: MaskedAdamW(model, mask), weight "
        "gradients at the masked entries only. Ratios are against dense fused AdamW in the same run.", "",
    ]
    header = ["model", "batch", "density", "method", "step (ms)", "vs dense", "peak memory", "dense W-grad never formed",
              "layers sampled / sparse"]
    rows = []
    for r in report["steps"]:
        s = r["spec"]
        dense = next((x for x in report["steps"] if x["spec"]["model"] == s["model"] and x["spec"]["method"] == "dense"), None)
        ratio = f"{r['median_s'] / dense['median_s']:.2f}x" if dense else "n/a"
        dens = "—" if s["method"] == "dense" else f"{100 * s['density']:g}%"
        rows.append([s["model"], s["batch_desc"], dens, s["method"], f"{1e3 * r['median_s']:.1f}", ratio,
                     C.fmt_bytes(r["peak_bytes"]), C.fmt_bytes(r["weight_grad_bytes_avoided"]) if r["layers_sparse"] else "—",
                     f"{r['layers_sampled']} / {r['layers_sparse']}" if r["layers_sparse"] else "—"])
    lines += [C.md_table(header, rows), ""]
    for f in report.get("failures", []):
        lines.append(f"- FAILED: {f}")
    lines += ["", "## The layer kernel: sampled against dense-then-gather", "",
              f"`fishkern::sampled_matmul` (the weight gradient's k entries) against the dense weight-gradient GEMM "
              f"plus an index_select, and against torch's own SDDMM (`torch.sparse.sampled_addmm` with the mask as "
              f"a CSR matrix built beforehand), T = {report['layer_tokens']} tokens, median of {report['layer_reps']} "
              "calls." + (f" Measured by `{report['layers_command']}` on {report['layers_date']}, git "
                          f"{report['layers_git']}." if report.get("layers_command") else ""), ""]
    lines.append(C.md_table(["weight", "density", "k", "sampled (ms)", "dense+gather (ms)", "sampled speedup",
                             "torch sampled_addmm (ms)"],
                            [[r["shape"], f"{100 * r['density']:g}%", str(r["k"]), f"{r['sampled_ms']:.2f}",
                              f"{r['dense_gather_ms']:.2f}", f"{r['speedup']:.2f}x",
                              f"{r['torch_sampled_addmm_ms']:.2f}" if "torch_sampled_addmm_ms" in r else "n/a"]
                             for r in report["layers"]]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--densities", nargs="*", type=float, default=list(DENSITIES))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--layers-only", action="store_true",
                    help="re-measure only the layer-kernel table into the committed results (steps kept)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        C.print_child_result(child(json.loads(args.child)))
        return 0
    device = torch.device(args.device)
    quick = args.quick
    if args.layers_only:
        path = RESULTS / f"sparse_backward_{device.type}.json"
        report = json.loads(path.read_text())
        report["layers"] = layer_table(device, quick)
        report["layer_tokens"], report["layer_reps"] = (128, 3) if quick else (1024, 7)
        report.update(layers_command=C.command_line(argv), layers_git=C.git_revision(),
                      layers_date=datetime.datetime.now().isoformat(timespec="seconds"))
        text = render(report)
        print(text)
        if not quick:
            C.write_text(RESULTS / f"sparse_backward_{device.type}.md", text)
            C.write_json(path, report)
        return 0
    if args.models is None:
        args.models = ["minilm", "bert-quick"] if quick else ["minilm", "bert-base", "bert-large"]
    steps = args.steps or (2 if quick else 4)
    cmd = C.command_line(argv)
    from fishkern.reporting import MachineLoad

    report = {"device": str(device), "command": cmd, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "git": C.git_revision(), "environment": C.environment(device), "steps": [], "failures": []}
    with MachineLoad() as load, tempfile.TemporaryDirectory() as tmp:
        mask_files = minilm_masks(quick, args.densities, Path(tmp)) if "minilm" in args.models else {}
        for model in args.models:
            if model == "minilm":
                batch = dict(batch=32, tokens=16, batch_desc="32 x ≤16 (demo)")
            else:
                big = device.type == "cuda" and model == "bert-large"
                batch = dict(batch=32 if big else 8, tokens=128, batch_desc=f"{32 if big else 8} x 128")
            for method in METHODS:
                for d in ([None] if method == "dense" else args.densities):
                    spec = dict(model=model, method=method, density=d, device=str(device), quick=quick, steps=steps,
                                warmup=1 if quick else 2, mask_file=mask_files.get(str(d)), **batch)
                    C.log(f"{model} {method} {d}")
                    res, proc = C.run_child(__file__, spec)
                    if res is None:
                        report["failures"].append(f"{model} {method} {d}: {proc.stderr[-2000:]}")
                        C.log(proc.stderr[-2000:])
                        continue
                    report["steps"].append(res)
                    C.log(f"  {1e3 * res['median_s']:.1f} ms, peak {C.fmt_bytes(res['peak_bytes'])}")
        report["layer_tokens"], report["layer_reps"] = (128, 3) if quick else (1024, 7)
        report["layers"] = layer_table(device, quick)
    inter = load.result
    report["load"] = (f"other processes {inter['other_cpu_s']:.0f} CPU-s and steal {inter['steal_s']:.0f} s over "
                      f"{inter['wall_s']:.0f} s" if inter else "unknown")
    text = render(report)
    print(text)
    if not quick:
        RESULTS.mkdir(exist_ok=True)
        C.write_text(RESULTS / f"sparse_backward_{device.type}.md", text)
        C.write_json(RESULTS / f"sparse_backward_{device.type}.json", report)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
