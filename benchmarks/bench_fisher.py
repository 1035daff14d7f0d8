"""Fisher-estimation benchmark: time and peak memory of four ways to compute the diagonal empirical
Fisher F = sum_n (d loss_n / d theta)^2 over the same N samples, side by side in one run.

Methods (every one sees the same pre-built batches, already on the device):

1. fishkern    fishkern.fisher.estimate_fisher(model, batches, N, implementation="auto"): batched
               exact per-sample squared gradients (PyTorch rules on CPU, Triton kernel on CUDA).
               Where estimate_fisher has the option, a second row times it with self_check=False
               (no first-batch comparison with the per-sample loop), to show what the check costs.
2. loop        estimate_fisher(..., implementation="loop"): the original algorithm, one forward and
               one backward per sample (batch size 1), squared gradients summed. On CUDA it may run
               on a subset (--loop-samples, default 128) and its time is extrapolated linearly to N.
3. vmap        torch.func: functional_call + vmap(grad(per-sample loss)) over chunks of samples
               (--vmap-chunk): per-sample gradients of every parameter are materialised, squared in
               place and summed (written here, not part of fishkern). HF BERT models run it with
               eager attention (--vmap-attn): torch has no vmap batching rule for the CPU
               flash-attention kernel behind SDPA, which makes it ~5x slower, and transformers' SDPA
               mask helper calls .all() on the mask (data-dependent, refused under vmap), so the
               attention mask is handed over pre-expanded to 4-D. Its scores are checked against
               fishkern's: max over parameters of max|vmap - fishkern| / max(fishkern_p),
               the denominator floored at 1e-8 x the global max score. The loop is checked the same way.
4. floor       a plain batched forward + backward over the same N samples (model.eval(), parameters
               requiring grad, model.zero_grad() between batches): what one training epoch over the
               samples costs, the lower bound any Fisher method is compared with.

Workloads
    CPU (default without CUDA):
      minilm-vader      all-MiniLM-L6-v2 (fishkern.data.minilm_path()) as
                        AutoModelForSequenceClassification(num_labels=2); N=256 real words from the
                        VADER lexicon (fishkern.data.load_vader() train split, in split order),
                        MiniLM tokenizer, max_length 16, batches of 32 with trim_padding=True,
                        VADER labels. Real text, but single words: 3-7 tokens per sample.
      minilm-synth-t64  the same model, SYNTHETIC input: N=128 sequences of 64 uniformly random
                        token ids (no padding), random labels, batches of 32.
    CUDA (default with CUDA, or --device cuda):
      bert-large        BertForSequenceClassification BERT-large, random init (benchmarks/_common.py),
                        N=1024, 128 random token ids per sample (no padding), batches of 32.
      resnet34          ResNet-34 for CIFAR (benchmarks/_common.py CifarResNet), N=1024 random
                        3x32x32 images, random labels, batches of 128.

Timing: each method is warmed up once on a small N (one batch; the loop 4 samples; vmap one chunk),
then timed --reps times (fishkern, floor) or --slow-reps times (loop, vmap), the methods interleaved
round by round. CPU: time.perf_counter around the call; CUDA: torch.cuda.synchronize() before and
after it. The machine may be shared: before each call the script waits (up to --quiet-wait s) for
other processes to leave the CPU, records the CPU time other processes used during it
(/proc/stat), the load average, and a fixed reference workload (a 1024x1024 fp32 matmul) before and
after each method; a call during which other processes used over 10% of a core is re-run (up to
--retries times) and marked as disturbed if it stays so.

Memory: CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the call (after a
warm-up), in this process. CPU: one fresh subprocess per (workload, method): it builds the model and
the data, runs a common 2-sample forward+backward warm-up (to page in the code), then records the
growth of the peak resident set size over the call (VmHWM after, reset before, minus VmRSS before).
Every figure includes what the method returns (fp32 scores, or the floor's .grad: one model's worth).
Also reported: the tensor memory still allocated after the call returned and its result was dropped
(nonzero = a leak). Leak or allocator retention: in the same fresh process, fishkern and the floor
are then called --memory-repeats more times; after each call (result dropped, gc.collect()) the
script records VmRSS, VmRSS after glibc's malloc_trim(0) (which hands freed heap memory back to the
OS), and the live tensor bytes. A leak grows all three linearly with the calls; memory the allocator
merely keeps (freed, not returned) shows up in the first figure only, and disappears with the trim.

Usage:
    python benchmarks/bench_fisher.py                 # full run (CUDA workloads if CUDA is available)
    python benchmarks/bench_fisher.py --quick         # MiniLM N=64, no memory subprocesses, < 1 minute
    python benchmarks/bench_fisher.py --workloads minilm-vader --skip-memory --reps 3

Writes benchmarks/results/fisher_<device>[_quick].{md,json}.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import gc
import hashlib
import json
import math
import os
import pstats
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import (  # noqa: E402
    build_model,
    count_params,
    cpu_snapshot,
    environment,
    free_memory,
    interference,
    model_description,
    proc_status_kib,
    reset_peak_rss,
    synchronize,
    wait_for_quiet,
)
from fishkern.fisher import estimate_fisher  # noqa: E402

METHODS = ("fishkern", "fishkern-nocheck", "loop", "vmap", "floor")
DEFAULT_METHODS = ("fishkern", "fishkern-nocheck", "loop", "vmap", "floor")
CPU_WORKLOADS = ("minilm-vader", "minilm-synth-t64")
CUDA_WORKLOADS = ("bert-large", "resnet34")
ALL_WORKLOADS = CPU_WORKLOADS + CUDA_WORKLOADS
DATA_SEED = 1
MODEL_SEED = 0
LOOP_WARM_SAMPLES = 4

# per workload: (N, batch size, N in --quick mode, default vmap chunk on cpu, on cuda)
WORKLOAD_DEFAULTS = {
    "minilm-vader": dict(n=256, batch=32, quick_n=64, chunk_cpu=8, chunk_cuda=32),
    "minilm-synth-t64": dict(n=128, batch=32, quick_n=16, chunk_cpu=8, chunk_cuda=32),
    "bert-large": dict(n=1024, batch=32, quick_n=128, chunk_cpu=2, chunk_cuda=32),
    "resnet34": dict(n=1024, batch=128, quick_n=256, chunk_cpu=16, chunk_cuda=128),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


# ==================================================================================================
# workloads


@dataclass
class Workload:
    name: str
    title: str
    description: str
    hf: bool  # Hugging Face model called with **batch (else (images, labels) pairs)
    synthetic: bool
    n: int
    batch_size: int
    model: torch.nn.Module
    batches: list  # covering at least n samples, on the device
    vmap_chunk: int
    loop_n: int  # samples the loop is measured on (== n unless a subset)
    vmap_n: int
    data_stats: dict[str, Any] = field(default_factory=dict)


def _token_stats(batches, n) -> dict[str, Any]:
    lengths, shapes = [], []
    seen = 0
    for b in batches:
        m = b["attention_mask"]
        lengths += m.sum(1).tolist()
        shapes.append(list(m.shape))
        seen += m.shape[0]
        if seen >= n:
            break
    lengths = lengths[:n]
    real = sum(lengths)
    padded = sum(s[0] * s[1] for s in shapes)
    return {
        "tokens_per_sample_mean": real / len(lengths),
        "tokens_per_sample_min": min(lengths),
        "tokens_per_sample_max": max(lengths),
        "batch_shapes": shapes,
        "padding_fraction": 1 - real / padded if padded else 0.0,
    }


def build_workload(name: str, n: int | None, quick: bool, device: torch.device, args) -> Workload:
    d = WORKLOAD_DEFAULTS[name]
    n = n or (d["quick_n"] if quick else d["n"])
    bs = d["batch"]
    g = torch.Generator().manual_seed(DATA_SEED)
    if name.startswith("minilm"):
        quiet_transformers()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from fishkern.data import TensorBatches, load_vader, minilm_path, tokenize_texts

        path = minilm_path()
        torch.manual_seed(MODEL_SEED)  # the new classifier head
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        if name == "minilm-vader":
            tok = AutoTokenizer.from_pretrained(path)
            train = load_vader()["train"]
            if n > len(train):
                raise SystemExit(f"minilm-vader: N={n} exceeds the {len(train)} VADER training examples")
            enc = tokenize_texts(train.texts[:n], tok, max_length=16, labels=train.labels[:n])
            batches = list(TensorBatches(enc, bs, trim_padding=True))
            title = f"MiniLM, VADER words (real text), N={n}"
            desc = (f"all-MiniLM-L6-v2 + new 2-way head ({count_params(model):,} parameters); the first {n} VADER "
                    f"train-split words, MiniLM tokenizer, max_length 16, batches of {bs} with trim_padding=True, VADER labels")
            synthetic = False
        else:
            T = 64
            vocab = model.config.vocab_size
            ids = torch.randint(1000, vocab, (n, T), generator=g)  # ids < 1000: [PAD], [unused*], [CLS], [SEP]...
            enc = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
                   "labels": torch.randint(0, 2, (n,), generator=g)}
            batches = list(TensorBatches(enc, bs))
            title = f"MiniLM, SYNTHETIC random ids T=64, N={n}"
            desc = (f"all-MiniLM-L6-v2 + new 2-way head; SYNTHETIC: {n} sequences of {T} uniformly random token ids "
                    f"(no padding), random labels, batches of {bs}")
            synthetic = True
        hf = True
    elif name == "bert-large":
        model = build_model("bert-large", quick=quick, seed=MODEL_SEED)
        T = 128
        vocab = model.config.vocab_size
        ids = torch.randint(1000, vocab, (n, T), generator=g)
        enc = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
               "labels": torch.randint(0, 2, (n,), generator=g)}
        batches = [{k: v[s : s + bs] for k, v in enc.items()} for s in range(0, n, bs)]
        title = f"BERT-large, random ids T=128, N={n}" if not quick else f"BERT (QUICK: 2 layers, hidden 256), T=128, N={n}"
        desc = model_description("bert-large", quick) + f"; SYNTHETIC: {n} x 128 random token ids (no padding), random labels, batches of {bs}"
        synthetic, hf = True, True
    elif name == "resnet34":
        model = build_model("resnet34", quick=quick, seed=MODEL_SEED)
        x = torch.randn(n, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        batches = [(x[s : s + bs], y[s : s + bs]) for s in range(0, n, bs)]
        title = f"ResNet-34 (CIFAR), random 3x32x32, N={n}" if not quick else f"CIFAR ResNet (QUICK: [1,1,1,1]), N={n}"
        desc = model_description("resnet34", quick) + f"; SYNTHETIC: {n} random N(0,1) 3x32x32 images, random labels, batches of {bs}"
        synthetic, hf = True, False
    else:
        raise ValueError(name)
    model = model.to(device).eval()
    batches = [_to(b, device) for b in batches]
    chunk = args.vmap_chunk or (d["chunk_cuda"] if device.type == "cuda" else d["chunk_cpu"])
    loop_n = min(n, args.loop_samples) if args.loop_samples else n
    vmap_n = min(n, args.vmap_samples) if args.vmap_samples else n
    wl = Workload(name, title, desc, hf, synthetic, n, bs, model, batches, min(chunk, bs), loop_n, vmap_n)
    wl.data_stats = _token_stats(batches, n) if hf else {"image_shape": [3, 32, 32]}
    wl.data_stats["params"] = count_params(model)
    return wl


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return tuple(_to(v, device) for v in obj)


def _batch_size(b) -> int:
    return (b["labels"] if isinstance(b, dict) else b[1]).shape[0]


def _cut(b, s: int, e: int):
    if isinstance(b, dict):
        return {k: v[s:e] for k, v in b.items()}
    return tuple(v[s:e] for v in b)


def iter_samples(batches, n: int):
    """The batches, the last one cut so that exactly n samples are yielded."""
    seen = 0
    for b in batches:
        if seen >= n:
            return
        size = _batch_size(b)
        if seen + size > n:
            b = _cut(b, 0, n - seen)
            size = n - seen
        seen += size
        yield b


def _inputs_labels(wl: Workload, b):
    if wl.hf:
        return {k: v for k, v in b.items() if k != "labels"}, b["labels"]
    return b[0], b[1]


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


# ==================================================================================================
# the four methods; each returns the scores ({name: tensor}) or, for the floor, None


def has_self_check() -> bool:
    import inspect

    return "self_check" in inspect.signature(estimate_fisher).parameters


def run_fishkern(wl: Workload, n: int, impl: str, self_check: bool | None = None):
    kw = {} if self_check is None else {"self_check": self_check}
    res = estimate_fisher(wl.model, wl.batches, n, implementation=impl, progress=False, **kw)
    return res.scores, {"implementation": res.implementation, "fallback_reason": res.fallback_reason,
                        "generic_modules": res.generic_modules}


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of all tensors the Python garbage collector can see."""
    seen: dict[tuple[str, int], int] = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            try:
                st = o.untyped_storage()
                seen[(str(st.device), st.data_ptr())] = st.nbytes()
            except Exception:  # noqa: BLE001  meta / sparse / odd subclasses
                pass
    return sum(seen.values())


def run_loop(wl: Workload, n: int):
    res = estimate_fisher(wl.model, wl.batches, n, implementation="loop", progress=False)
    return res.scores, {"implementation": res.implementation}


def run_floor(wl: Workload, n: int):
    model = wl.model
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for b in iter_samples(wl.batches, n):
            model.zero_grad()  # set_to_none=True (torch's default)
            inputs, labels = _inputs_labels(wl, b)
            out = model(**inputs) if wl.hf else model(inputs)
            F.cross_entropy(_logits(out), labels).backward()
        synchronize(next(model.parameters()).device)
    finally:
        model.zero_grad()
        for p, r in flags:
            p.requires_grad_(r)
    return None, {}


def _set_attn(model, impl: str | None) -> str | None:
    """Switch a transformers model's attention implementation; returns the previous one (None: not HF)."""
    cfg = getattr(model, "config", None)
    prev = getattr(cfg, "_attn_implementation", None)
    if prev is None or impl is None or impl == prev:
        return prev
    model.set_attn_implementation(impl)
    return prev


def run_vmap(wl: Workload, n: int, chunk: int, attn: str):
    """Per-sample gradients by torch.func (functional_call + vmap(grad)), squared and summed."""
    from torch.func import functional_call, grad, vmap

    model = wl.model
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    acc = {k: torch.zeros(v.shape, dtype=torch.float32, device=v.device) for k, v in params.items()}
    prev = _set_attn(model, attn) if wl.hf else None
    used_attn = getattr(model.config, "_attn_implementation", None) if wl.hf else None
    dtype = next(iter(params.values())).dtype

    def loss_one(prm, inputs, y):
        if wl.hf:
            kw = {k: v.unsqueeze(0) for k, v in inputs.items()}
            if "attention_mask" in kw:  # a ready 4-D mask: transformers returns it as is (no .all() under vmap)
                keep = kw["attention_mask"].bool()[:, None, None, :]
                T = keep.shape[-1]
                if used_attn == "eager":  # additive
                    m4 = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
                else:  # sdpa: boolean, True = attend
                    m4 = keep
                kw["attention_mask"] = m4.expand(1, 1, T, T)
            out = functional_call(model, prm, (), kw)
        else:
            out = functional_call(model, prm, (inputs.unsqueeze(0),))
        return F.cross_entropy(_logits(out).float(), y.unsqueeze(0), reduction="sum")  # -log p(y|x)

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    try:
        for b in iter_samples(wl.batches, n):
            inputs, labels = _inputs_labels(wl, b)
            B = labels.shape[0]
            for s in range(0, B, chunk):
                e = min(B, s + chunk)
                sub = {k: v[s:e] for k, v in inputs.items()} if wl.hf else inputs[s:e]
                grads = per_sample(params, sub, labels[s:e])
                for k, gk in grads.items():
                    acc[k].add_(gk.square_().sum(0))
                del grads
        synchronize(next(iter(params.values())).device)
    finally:
        if wl.hf and prev is not None:
            _set_attn(model, prev)
    return acc, {"chunk": chunk, "attention": used_attn}


def is_oom(e: BaseException) -> bool:
    s = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in s or "can't allocate memory" in s


def method_call(method: str, wl: Workload, n: int, args, chunk: int | None = None):
    if method == "fishkern":
        return run_fishkern(wl, n, args.fishkern_impl)
    if method == "fishkern-nocheck":
        return run_fishkern(wl, n, args.fishkern_impl, self_check=False)
    if method == "loop":
        return run_loop(wl, n)
    if method == "vmap":
        return run_vmap(wl, n, chunk or wl.vmap_chunk, args.vmap_attn)
    if method == "floor":
        return run_floor(wl, n)
    raise ValueError(method)


def measured_n(method: str, wl: Workload) -> int:
    return wl.loop_n if method == "loop" else wl.vmap_n if method == "vmap" else wl.n


def warm_n(method: str, wl: Workload, chunk: int) -> int:
    return min(measured_n(method, wl), LOOP_WARM_SAMPLES if method == "loop" else chunk if method == "vmap" else wl.batch_size)


# ==================================================================================================
# interference probes


_REF: dict[str, torch.Tensor] = {}


def reference_workload() -> dict[str, float]:
    """A fixed CPU workload (1024x1024 fp32 matmul, torch's threads), 5 timed calls: its slowdown
    tells how much CPU other processes took at that moment."""
    if "a" not in _REF:
        g = torch.Generator().manual_seed(0)
        _REF["a"] = torch.randn(1024, 1024, generator=g)
        _REF["out"] = torch.empty(1024, 1024)
        torch.mm(_REF["a"], _REF["a"], out=_REF["out"])
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(_REF["a"], _REF["a"], out=_REF["out"])
        ts.append(time.perf_counter() - t0)
    return {"min_ms": min(ts) * 1e3, "median_ms": statistics.median(ts) * 1e3}


def probe(cpu: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if cpu:
        out["reference"] = reference_workload()
    return out


# ==================================================================================================
# timing


QUIET_WAIT_S = 60.0
QUIET_BUDGET_S = 900.0  # total seconds this run may spend waiting for quiet
RETRIES = 2
_waited_total = 0.0


def wait_quiet() -> None:
    """Wait (up to QUIET_WAIT_S, within what is left of QUIET_BUDGET_S) for other processes to leave the CPU."""
    global _waited_total
    left = min(QUIET_WAIT_S, QUIET_BUDGET_S - _waited_total)
    if left <= 0 or cpu_snapshot() is None:
        return
    waited = wait_for_quiet(left)
    _waited_total += waited
    if waited > 0.5:
        log(f"    (waited {waited:.0f} s for other processes to quieten down; {_waited_total:.0f} s in all)")


def one_call(method: str, wl: Workload, n: int, args, chunk: int | None, device: torch.device, tag: str):
    """One timed call, re-run (up to RETRIES times) while other processes disturb it."""
    attempts = []
    result = None
    for attempt in range(1 + RETRIES):
        wait_quiet()
        free_memory()
        synchronize(device)
        snap = cpu_snapshot()
        t0 = time.perf_counter()
        result = method_call(method, wl, n, args, chunk)
        synchronize(device)
        dt = time.perf_counter() - t0
        inter = interference(snap, cpu_snapshot())
        disturbed = bool(inter and (inter["other_cpu_s"] + inter["steal_s"]) > max(0.05, 0.1 * inter["wall_s"]))
        attempts.append({"seconds": dt, "interference": inter, "disturbed": disturbed})
        note = f", other processes {inter['other_cpu_s']:.2f} CPU s, steal {inter['steal_s']:.2f} s" if inter else ""
        log(f"  {tag}: {dt:.3f} s ({n} samples{note})" + ("  ** DISTURBED **" if disturbed else ""))
        if not disturbed:
            break
        if attempt < RETRIES:
            result = None
            free_memory()
            time.sleep(2)
    best = min(attempts, key=lambda a: (a["disturbed"], a["seconds"] if not a["disturbed"] else
                                         (a["interference"] or {}).get("other_cpu_s", 0.0)))
    return best, attempts, result


def bench_workload(wl: Workload, args, device: torch.device, methods: list[str]) -> dict[str, Any]:
    cpu = device.type == "cpu"
    out: dict[str, Any] = {
        "workload": wl.name, "title": wl.title, "description": wl.description, "synthetic": wl.synthetic,
        "n": wl.n, "batch_size": wl.batch_size, "data": wl.data_stats, "methods": {}, "checks": {},
    }
    res: dict[str, dict[str, Any]] = {m: {"method": m, "n_measured": measured_n(m, wl), "calls": [], "all_attempts": []} for m in methods}
    chunk = wl.vmap_chunk

    # -- warm-up (and, for vmap, the chunk that fits)
    for m in methods:
        r = res[m]
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

    # -- CUDA memory: one call each, peak allocated above what was allocated before it
    if not cpu and not args.skip_memory:
        for m in methods:
            r = res[m]
            if r.get("error"):
                continue
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

    # -- timed calls, the methods interleaved round by round
    reps = {m: (args.slow_reps if m in ("loop", "vmap") else args.reps) for m in methods}
    kept_scores: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, dict[str, Any]] = {}
    for rnd in range(max(reps.values())):
        for m in methods:
            r = res[m]
            if rnd >= reps[m] or r.get("error"):
                continue
            if rnd == 0 or m in ("loop", "vmap"):
                r.setdefault("probes", []).append({"when": f"before round {rnd}", **probe(cpu)})
            try:
                best, attempts, result = one_call(m, wl, r["n_measured"], args, r.get("chunk"), device, f"{wl.name} {m} rep {rnd + 1}/{reps[m]}")
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
            if scores is not None and m in ("fishkern", "loop", "vmap"):
                # keep the last call's scores (on CPU, so the GPU stays free for the next method)
                kept_scores[m] = {k: v.detach().to("cpu", copy=True) if not cpu else v for k, v in scores.items()}
            del result, scores
            if rnd == reps[m] - 1 or m in ("loop", "vmap"):
                r["probes"].append({"when": f"after round {rnd}", **probe(cpu)})

    # -- summaries
    for m in methods:
        r = res[m]
        r.update(extra.get(m, {}))
        times = [c["seconds"] for c in r["calls"]]
        if not times:
            continue
        clean = [c["seconds"] for c in r["calls"] if not c["disturbed"]]
        r["median_s"] = statistics.median(clean or times)
        r["min_s"] = min(times)
        r["median_all_s"] = statistics.median(times)
        r["disturbed_calls"] = sum(c["disturbed"] for c in r["calls"])
        r["samples_per_s"] = r["n_measured"] / r["median_s"]
        scale = wl.n / r["n_measured"]
        r["extrapolated"] = scale != 1
        r["time_for_n_s"] = r["median_s"] * scale
        r["min_for_n_s"] = r["min_s"] * scale

    # -- correctness: vmap and loop against fishkern (on the same samples)
    if "fishkern" in kept_scores:
        ref_by_n = {wl.n: kept_scores["fishkern"]}
        for m in ("vmap", "loop"):
            if m not in kept_scores:
                continue
            nm = res[m]["n_measured"]
            if nm not in ref_by_n:
                s, _ = run_fishkern(wl, nm, args.fishkern_impl)
                ref_by_n[nm] = {k: v.detach().to("cpu", copy=True) if not cpu else v for k, v in s.items()}
                del s
            out["checks"][m] = rel_error(kept_scores[m], ref_by_n[nm])
            out["checks"][m]["n"] = nm
            log(f"  {wl.name} {m} vs fishkern ({nm} samples): max rel. error {out['checks'][m]['max_rel_error']:.2e} "
                f"({out['checks'][m]['worst_param']})")
    del kept_scores
    free_memory()

    # -- ratios (on the times for N: the loop/vmap subset times extrapolated)
    def t(m, key="time_for_n_s"):
        return res.get(m, {}).get(key)

    ratios = {}
    for a, b, key in (("loop", "fishkern", "loop/fishkern"), ("vmap", "fishkern", "vmap/fishkern"), ("fishkern", "floor", "fishkern/floor"),
                      ("loop", "fishkern-nocheck", "loop/fishkern-nocheck"), ("fishkern", "fishkern-nocheck", "fishkern/fishkern-nocheck")):
        if t(a) and t(b):
            ratios[key] = t(a) / t(b)
            ratios[key + " (min)"] = t(a, "min_for_n_s") / t(b, "min_for_n_s")
    out["ratios"] = ratios
    out["methods"] = res
    return out


def rel_error(test: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    """max over parameters p of max|test_p - ref_p| / max(max ref_p, 1e-8 x global max of ref)."""
    gmax = max(float(v.abs().max()) for v in ref.values())
    floor = 1e-8 * gmax
    worst, worst_name, per = 0.0, None, {}
    for k, r in ref.items():
        d = float((test[k].to(r.dtype) - r).abs().max())
        denom = max(float(r.abs().max()), floor)
        e = (d / denom) if denom > 0 else (0.0 if d == 0 else math.inf)
        per[k] = e
        if e > worst or worst_name is None:
            worst, worst_name = e, k
    return {"max_rel_error": worst, "worst_param": worst_name, "global_max_score": gmax,
            "params_above_1e-4": sum(e > 1e-4 for e in per.values()), "params": len(per)}


# ==================================================================================================
# CPU memory: one fresh process per (workload, method)


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    quiet_transformers()
    warnings.filterwarnings("ignore")
    device = torch.device("cpu")
    args = argparse.Namespace(**spec["args"])
    rss_start = proc_status_kib("VmRSS")
    wl = build_workload(spec["workload"], spec["n"], spec["quick"], device, args)
    method = spec["method"]
    # common warm-up for every method: a 2-sample forward + backward pages in the code paths
    run_floor(wl, 2)
    gc.collect()
    rss_build = proc_status_kib("VmRSS")
    hwm_build = proc_status_kib("VmHWM")
    ok = reset_peak_rss()
    n = measured_n(method, wl)
    live_before = live_tensor_bytes()
    t0 = time.perf_counter()
    err = None
    try:
        scores, info = method_call(method, wl, n, args, spec.get("chunk"))
    except Exception as e:  # noqa: BLE001
        scores, info, err = None, {}, ("OOM" if is_oom(e) else f"{type(e).__name__}: {e}")
    wall = time.perf_counter() - t0
    hwm = proc_status_kib("VmHWM")
    rss_after = proc_status_kib("VmRSS")
    scores_bytes = sum(v.numel() * v.element_size() for v in scores.values()) if scores else 0
    scores = None
    gc.collect()
    retained = live_tensor_bytes() - live_before  # tensors still alive after the call, its result dropped
    out = {
        "workload": wl.name, "method": method, "n": n, "error": err,
        "rss_start_kib": rss_start, "rss_before_kib": rss_build, "peak_rss_build_kib": hwm_build,
        "peak_rss_reset_ok": ok, "peak_rss_call_kib": hwm if ok else None, "rss_after_kib": rss_after,
        "peak_growth_bytes": (hwm - rss_build) * 1024 if ok and hwm is not None and rss_build is not None else None,
        "scores_bytes": scores_bytes, "cold_call_s": wall, "info": info,
        "retained_after_return_bytes": retained,
    }
    if err is None and spec.get("repeats", 0) > 0 and method in REPEAT_METHODS:
        out["repeats"] = repeated_calls(method, wl, n, args, spec.get("chunk"), spec["repeats"], rss_build, live_before)
    return out


REPEAT_METHODS = ("fishkern", "fishkern-nocheck", "floor")  # the loop and vmap are too slow to repeat


def _malloc_trim() -> bool:
    """glibc's malloc_trim(0): return the heap's free memory to the OS (False where there is no glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def repeated_calls(method: str, wl: Workload, n: int, args, chunk, repeats: int, rss_build_kib: int,
                   live_before: int) -> dict[str, Any]:
    """The call again `repeats` times; after the first one (already made) and after each repeat, with
    the result dropped and gc.collect() run: VmRSS, VmRSS after malloc_trim(0), live tensor bytes,
    each minus its value before the first call. Linear growth in all three: a leak; growth in the
    first only: memory the allocator keeps for reuse."""
    rows = []

    def record(i: int) -> None:
        gc.collect()
        rss = proc_status_kib("VmRSS")
        trimmed = _malloc_trim()
        rss_trim = proc_status_kib("VmRSS") if trimmed else None
        rows.append({"call": i, "rss_growth_bytes": (rss - rss_build_kib) * 1024,
                     "rss_growth_after_trim_bytes": None if rss_trim is None else (rss_trim - rss_build_kib) * 1024,
                     "live_tensor_growth_bytes": live_tensor_bytes() - live_before})

    record(1)
    for i in range(2, repeats + 2):
        method_call(method, wl, n, args, chunk)
        record(i)
    trim = [r["rss_growth_after_trim_bytes"] for r in rows]
    out: dict[str, Any] = {"calls": rows}
    if len(rows) > 1 and None not in trim:
        # from the second call on: what each further call adds (the first one also pages in code)
        out["per_call_growth_after_trim_bytes"] = (trim[-1] - trim[0]) / (len(rows) - 1)
    out["per_call_live_tensor_growth_bytes"] = (rows[-1]["live_tensor_growth_bytes"] - rows[0]["live_tensor_growth_bytes"]) / max(1, len(rows) - 1)
    return out


def run_memory_cpu(args, workloads: list[str], methods: list[str]) -> list[dict[str, Any]]:
    results = []
    child_args = {k: getattr(args, k) for k in ("fishkern_impl", "vmap_attn", "vmap_chunk", "loop_samples", "vmap_samples")}
    for name in workloads:
        for m in methods:
            spec = {"workload": name, "method": m, "n": args.n, "quick": args.quick, "args": child_args,
                    "repeats": args.memory_repeats}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("CHILD_RESULT ")), None)
            if proc.returncode != 0 or line is None:
                log(f"  memory {name} {m}: child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
                results.append({"workload": name, "method": m, "error": f"child failed (rc {proc.returncode}): {proc.stderr[-1500:]}"})
                continue
            r = json.loads(line[len("CHILD_RESULT "):])
            r["child_wall_s"] = time.perf_counter() - t0
            log(f"  memory {name} {m}: RSS before the call {fmt_bytes(r['rss_before_kib'] * 1024)}, peak growth "
                f"{fmt_bytes(r['peak_growth_bytes'])} (cold call {r['cold_call_s']:.1f} s; child {r['child_wall_s']:.0f} s)")
            results.append(r)
    return results


# ==================================================================================================
# profile of one fishkern call


def profile_fishkern(wl: Workload, args, device: torch.device) -> dict[str, str]:
    out = {}
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    wait_quiet()
    synchronize(device)
    snap = cpu_snapshot()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        run_fishkern(wl, wl.n, args.fishkern_impl)
        synchronize(device)
    wall = time.perf_counter() - t0
    inter = interference(snap, cpu_snapshot())
    out["torch_profiler_interference"] = inter
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort, row_limit=10, max_name_column_width=60)
    except Exception:  # older profiler key name
        sort = "self_cuda_time_total" if device.type == "cuda" else sort
        table = prof.key_averages().table(sort_by=sort, row_limit=10, max_name_column_width=60)
    busy = f"; other processes used {inter['other_cpu_s']:.2f} CPU s meanwhile" if inter else ""
    out["torch_profiler"] = (f"torch.profiler of one estimate_fisher call ({wl.title}; wall {wall:.2f} s under the "
                             f"profiler{busy}), top 10 ops by {sort}:\n" + table)
    # Python level: where the time goes in fishkern's own code
    pr = cProfile.Profile()
    wait_quiet()
    snap = cpu_snapshot()
    t0 = time.perf_counter()
    pr.enable()
    run_fishkern(wl, wl.n, args.fishkern_impl)
    synchronize(device)
    pr.disable()
    wall = time.perf_counter() - t0
    inter = interference(snap, cpu_snapshot())
    busy = f"; other processes used {inter['other_cpu_s']:.2f} CPU s meanwhile" if inter else ""
    stats = pstats.Stats(pr).strip_dirs().stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
    lines = [f"cProfile of one estimate_fisher call (wall {wall:.2f} s under cProfile{busy}), top functions by own time",
             f"{'ncalls':>8} {'own s':>8} {'cum s':>8}  function"]
    for (file, line, func), (_cc, nc, tt, ct, _callers) in rows:
        where = f"{file}:{line}({func})" if line else func
        lines.append(f"{nc:>8} {tt:>8.3f} {ct:>8.3f}  {where}")
    out["cprofile"] = "\n".join(lines)
    return out


# ==================================================================================================
# reporting


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{int(n)} B"


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


def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


METHOD_LABEL = {
    "fishkern": "fishkern (batched, `auto`)",
    "fishkern-nocheck": "… same, `self_check=False`",
    "loop": "loop (batch size 1, original)",
    "vmap": "torch.func vmap(grad)",
    "floor": "floor: batched fwd+bwd",
}


def render(report: dict[str, Any]) -> str:
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
        f"(fishkern, floor) or {s['slow_reps']} (loop, vmap), methods interleaved; the table shows the median of the "
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
            chk_s = "—" if m not in ("loop", "vmap") else ("n/a" if chk is None else f"{chk['max_rel_error']:.1e}")
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
        lines += [md_table([f"method (N={w['n']})", "time (median)", "min", "samples/s", "time / fishkern", "peak memory growth",
                            "still allocated after return", "max rel. err vs fishkern", "notes"], rows), ""]
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
        if rrows:
            lines += ["Repeated calls in the memory process (leak or retention): after calls 1, 2, … (result dropped, "
                      "`gc.collect()`), growth over before the first call of the RSS, of the RSS after glibc's "
                      "`malloc_trim(0)`, and of the live tensor bytes. A leak grows every column with each call; "
                      "freed memory the allocator keeps shows in the first column only.", "",
                      md_table(["method", "RSS", "RSS after malloc_trim(0)", "live tensors",
                                "per further call (trimmed RSS)", "per further call (tensors)"], rrows), ""]
        rt = w.get("ratios", {})
        parts = []
        for key in ("loop/fishkern", "vmap/fishkern", "fishkern/floor", "loop/fishkern-nocheck", "fishkern/fishkern-nocheck"):
            if key in rt:
                parts.append(f"**{key} = {fmt_x(rt[key])}** (min-based {fmt_x(rt[key + ' (min)'])})")
        if parts:
            lines += ["Ratios: " + ", ".join(parts) + ".", ""]
        if w.get("goal"):
            lines += [w["goal"], ""]
        # interference
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
        if irows:
            lines += ["Interference: CPU time other processes used during this method's timed calls; the reference workload "
                      "(median ms of a 1024² fp32 matmul) and the 1-min load average before/after the method's rounds.", "",
                      md_table(["method", "other processes' CPU", "reference workload (ms)", "load average"], irows), ""]
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


def source_digest() -> str:
    h = hashlib.sha256()
    for f in sorted((REPO / "fishkern").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "fishkern"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty(fishkern/)" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


# ==================================================================================================


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    ap.add_argument("--workloads", nargs="+", default=None, choices=ALL_WORKLOADS,
                    help=f"default: {' '.join(CPU_WORKLOADS)} on CPU, {' '.join(CUDA_WORKLOADS)} on CUDA")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                    help="fishkern-nocheck: estimate_fisher(self_check=False), where this fishkern has the option")
    ap.add_argument("--n", type=int, default=None, help="samples per workload (default: per workload, see the docstring)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls of fishkern and the floor (default 5, quick 2)")
    ap.add_argument("--slow-reps", type=int, default=None, help="timed calls of the loop and vmap (default 2, quick 1)")
    ap.add_argument("--loop-samples", type=int, default=None,
                    help="run the loop on the first this-many samples and extrapolate its time to N (default: 128 on CUDA, all on CPU)")
    ap.add_argument("--vmap-samples", type=int, default=None, help="the same for vmap (default: all)")
    ap.add_argument("--vmap-chunk", type=int, default=None, help="samples per vmap call (default: 8 for MiniLM on CPU, 32 for BERT-large on CUDA, 128 for ResNet on CUDA)")
    ap.add_argument("--vmap-oom-retries", type=int, default=2, help="on OOM, halve the vmap chunk up to this many times")
    ap.add_argument("--vmap-attn", default="eager", help="attention implementation of HF models under vmap (eager or sdpa)")
    ap.add_argument("--fishkern-impl", default="auto", choices=("auto", "torch", "triton"), help="estimate_fisher implementation")
    ap.add_argument("--skip-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--memory-repeats", type=int, default=4,
                    help="in the CPU memory processes, call fishkern and the floor this many more times and record the RSS "
                         "and live tensors after each call (leak vs allocator retention; 0: skip)")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profile of one fishkern call")
    ap.add_argument("--quick", action="store_true", help="MiniLM N=64 (synthetic row N=16), fewer calls, no memory subprocesses")
    ap.add_argument("--retries", type=int, default=None, help="re-run a call disturbed by other processes up to this many times "
                    "(default 2, quick 0)")
    ap.add_argument("--quiet-wait", type=float, default=None, help="before each call, wait up to this many seconds for other "
                    "processes to leave the CPU (default 90 on CPU, 0 on CUDA or with --quick)")
    ap.add_argument("--quiet-budget", type=float, default=1500.0, help="at most this many seconds of such waiting in all")
    ap.add_argument("--out-dir", "--out", dest="out_dir", default=str(HERE / "results"))
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
    for k in ("n", "reps", "slow_reps", "loop_samples", "vmap_samples", "vmap_chunk"):
        v = getattr(args, k)
        if v is not None and v < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print("CHILD_RESULT " + json.dumps(memory_child(json.loads(args.child))), flush=True)
        return 0
    global QUIET_WAIT_S, QUIET_BUDGET_S, RETRIES
    QUIET_WAIT_S, QUIET_BUDGET_S, RETRIES = max(0.0, args.quiet_wait), max(0.0, args.quiet_budget), max(0, args.retries)
    if "fishkern-nocheck" in args.methods and not has_self_check():
        args.methods = [m for m in args.methods if m != "fishkern-nocheck"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented the batching rule.*")
    quiet_transformers()
    t_start = time.perf_counter()
    env = environment(device)
    command = ("python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
               if argv is None else "main(" + repr(argv) + ")")
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
        "settings": {k: getattr(args, k) for k in ("quick", "workloads", "methods", "n", "reps", "slow_reps", "loop_samples",
                                                   "vmap_samples", "vmap_chunk", "vmap_oom_retries", "vmap_attn", "fishkern_impl",
                                                   "skip_memory", "memory_repeats", "retries", "quiet_wait", "quiet_budget")},
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
        w = bench_workload(wl, args, device, args.methods)
        if name == "minilm-vader" and cpu and "loop/fishkern" in w["ratios"]:
            r = w["ratios"]["loop/fishkern"]
            goal = (f"**CPU goal (fishkern ≥ 8× faster than the loop on MiniLM, N=256 real tokenized text): "
                    f"{'MET' if r >= 8 else 'NOT MET'}** — loop/fishkern = {r:.1f}× (median), {w['ratios']['loop/fishkern (min)']:.1f}× (min).")
            if wl.n != 256:
                goal += f" (This run has N={wl.n}, not the goal's 256.)"
            w["goal"] = goal
        if args.profile and "fishkern" in args.methods and (name == args.workloads[0]):
            log("profiling one fishkern call")
            try:
                report["profile"] = profile_fishkern(wl, args, device)
            except Exception as e:  # noqa: BLE001  the profile is a bonus
                report["profile"] = {"torch_profiler": f"(failed: {e!r})", "cprofile": ""}
        report["workloads"].append(w)
        del wl
        free_memory()
    report["timing_interference"] = interference(snap, cpu_snapshot()) or {"other_cpu_s": 0.0, "wall_s": 0.0, "steal_s": 0.0}
    report["reference_end"] = probe(cpu)
    report["quiet_waited_s"] = _waited_total
    report["total_wall_s"] = time.perf_counter() - t_start
    md = render(report)
    print(md)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"fisher_{device.type}" + ("_quick" if args.quick else "")
    (out_dir / f"{stem}.md").write_text(md + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    log(f"wrote {out_dir}/{stem}.{{md,json}} in {report['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
