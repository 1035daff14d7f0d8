"""Helpers shared by the fishkern benchmarks: the benchmark models, seeded random masks, timers,
memory probes, a description of the machine, and the pieces every report is made of (byte and
table formatting, provenance, atomic result files, the memory-child protocol).

Nothing here is part of the fishkern package; the benchmarks import it as a sibling module. What
the package's runners share with the benchmarks (the load of the machine, atomic writes, the CPU
model) comes from fishkern.reporting and fishkern.env and is not copied here.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fishkern.env import cpu_model
# the package's own measure of other processes' CPU use (its reports warn with it), shared here
from fishkern.reporting import cpu_snapshot, interference, write_text_atomic
# The CIFAR ResNet is the package's (fishkern.models): the benchmarks measure the model the recipes
# train. Same architecture, parameter names and initialisation order as the copy that lived here
# before (checked: state_dict keys, shapes and seeded weights identical), so earlier results compare.
from fishkern.models import RESNET34_CIFAR10_PARAMS, CifarResNet, resnet34_cifar

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

# --------------------------------------------------------------------------------------------------
# models

RESNET_WIDTHS = (64, 128, 256, 512)
QUICK_RESNET_BLOCKS = (1, 1, 1, 1)

BERT_LARGE_PARAMS = 335_143_938
RESNET34_PARAMS = RESNET34_CIFAR10_PARAMS  # 21,282,122

MODEL_NAMES = ("bert-large", "resnet34")


def model_description(name: str, quick: bool) -> str:
    if name == "bert-large":
        if quick:
            return "BertForSequenceClassification, QUICK: 2 layers, hidden 256, 4 heads, FFN 1024, 2 labels"
        return "BertForSequenceClassification (BERT-large: 24 layers, hidden 1024, 16 heads, FFN 4096, 2 labels), random init"
    if name == "resnet34":
        if quick:
            return "CIFAR ResNet, QUICK: BasicBlocks [1,1,1,1], widths 64/128/256/512, 10 classes"
        return "ResNet-34 for CIFAR-10 (3x3 stem, no max-pool, BasicBlocks [3,4,6,3], 64/128/256/512, BatchNorm, 10 classes)"
    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")


def build_model(name: str, quick: bool = False, seed: int = 0) -> nn.Module:
    """A freshly, randomly initialised benchmark model (on CPU, fp32)."""
    torch.manual_seed(seed)
    if name == "bert-large":
        from transformers import BertConfig, BertForSequenceClassification

        if quick:
            cfg = BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024, num_labels=2)
        else:
            cfg = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, num_labels=2)
        model = BertForSequenceClassification(cfg)
        if not quick:
            n = count_params(model)
            if n != BERT_LARGE_PARAMS:  # a transformers release that builds BERT differently: the numbers would not compare
                raise RuntimeError(f"BERT-large has {n} parameters, expected {BERT_LARGE_PARAMS}")
        return model
    if name == "resnet34":
        model = CifarResNet(QUICK_RESNET_BLOCKS, RESNET_WIDTHS) if quick else resnet34_cifar()
        if not quick:
            n = count_params(model)
            if n != RESNET34_PARAMS:
                raise RuntimeError(f"ResNet-34 has {n} parameters, expected {RESNET34_PARAMS}")
        return model
    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")


def make_batch(name: str, model: nn.Module, device: torch.device, seed: int = 1) -> dict[str, Tensor]:
    """The small training batch of the memory benchmark: BERT 2 x 128 random token ids, ResNet 32 x 3x32x32."""
    g = torch.Generator().manual_seed(seed)
    if name == "bert-large":
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 128), generator=g)
        return {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (2,), generator=g).to(device),
        }
    if name == "resnet34":
        return {"x": torch.randn(32, 3, 32, 32, generator=g).to(device), "y": torch.randint(0, 10, (32,), generator=g).to(device)}
    raise ValueError(name)


def training_loss(name: str, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    if name == "bert-large":
        return model(**batch).loss
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# masks


def random_global_indices(total: int, k: int, seed: int) -> Tensor:
    """k distinct flat indices drawn uniformly from [0, total), sorted, int64, on CPU.

    Exact and memory-light (O(k), unlike a randperm over all entries, which takes ~25 s and 2.7 GB
    for BERT-large on a 2-core CPU): draw indices with replacement until at least k distinct values
    are seen (the set of distinct values is a uniform random subset given its size), then keep a
    uniform random k of them.
    """
    if not 0 <= k <= total:
        raise ValueError(f"k={k} must lie in [0, {total}]")
    g = torch.Generator().manual_seed(seed)
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if k > total // 2:
        return torch.sort(torch.randperm(total, generator=g)[:k]).values
    # expected number of draws for k distinct values, plus a margin
    n_draw = int(-total * math.log1p(-k / total) * 1.02) + 64
    seen = torch.empty(0, dtype=torch.int64)
    while True:
        seen = torch.unique(torch.cat([seen, torch.randint(0, total, (n_draw,), generator=g)]))
        if seen.numel() >= k:
            break
        n_draw = max(64, int((k - seen.numel()) * 1.5))
    if seen.numel() > k:
        seen = torch.sort(seen[torch.randperm(seen.numel(), generator=g)[:k]]).values
    return seen


def split_global_indices(global_idx: Tensor, numels: Sequence[int]) -> list[Tensor]:
    """Split sorted global flat indices over tensors laid end to end (in the given order)."""
    bounds = torch.tensor([0] + list(numels), dtype=torch.int64).cumsum(0)
    cuts = torch.searchsorted(global_idx, bounds).tolist()
    return [global_idx[cuts[i] : cuts[i + 1]] - int(bounds[i]) for i in range(len(numels))]


def random_mask_indices(params: Sequence[Tensor], density: float, seed: int = 1234) -> tuple[list[Tensor], int]:
    """Per-parameter sorted flat indices (int64, on each parameter's device) of a uniformly random
    mask with k = floor(density x total) entries over all parameters; returns (indices, k)."""
    numels = [p.numel() for p in params]
    total = sum(numels)
    k = math.floor(density * total)
    idx = random_global_indices(total, k, seed)
    parts = split_global_indices(idx, numels)
    return [t.to(p.device) for t, p in zip(parts, params)], k


def dense_float_masks(params: Sequence[Tensor], mask_indices: Sequence[Tensor]) -> list[Tensor]:
    """The original FISH code's representation: one dense float32 0/1 tensor per parameter."""
    masks = []
    for p, idx in zip(params, mask_indices):
        m = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        m.index_fill_(0, idx, 1.0)
        masks.append(m.view_as(p))
    return masks


# --------------------------------------------------------------------------------------------------
# timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds per call of ``fn`` for ``steps`` timed calls after ``warmup`` untimed ones.

    CPU: time.perf_counter around each call. CUDA: a pair of CUDA events around each call, with the
    GPU idle before it and the L2 cache flushed (a 256 MB write, outside the timed region), so a
    step finds its data in HBM as it would after a backward pass.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
        for _ in range(steps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del flush
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def summarize(times: Sequence[float]) -> dict[str, object]:
    return {"median_s": statistics.median(times), "min_s": min(times), "samples_s": list(times)}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def state_tensor_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the per-parameter state tensors of a torch optimizer, leaving out the 'step' counters."""
    total = 0
    for st in opt.state.values():
        for key, v in st.items():
            if key != "step" and isinstance(v, Tensor):
                total += v.numel() * v.element_size()
    return total


# --------------------------------------------------------------------------------------------------
# memory probes (Linux /proc)


def proc_status_kib(key: str) -> int | None:
    """A 'VmXXX:' line of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def wait_for_quiet(max_wait_s: float, window_s: float = 1.0, threshold: float = 0.05) -> float:
    """Wait until other processes use less than ``threshold`` of a core over a ``window_s`` window
    (giving up after ``max_wait_s``); returns the seconds waited beyond the first window."""
    t0 = time.perf_counter()
    while True:
        before = cpu_snapshot()
        time.sleep(window_s)
        inter = interference(before, cpu_snapshot())
        # one 10 ms clock tick of slack
        quiet = inter is None or inter["other_cpu_s"] + inter["steal_s"] <= threshold * inter["wall_s"] + 0.011
        elapsed = time.perf_counter() - t0
        if quiet or elapsed >= max_wait_s:
            return max(0.0, elapsed - window_s)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# the machine


def environment(device: torch.device) -> dict[str, object]:
    env: dict[str, object] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        env["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for mod in ("triton", "transformers", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # not installed, or broken: record that
            env[mod] = None
    try:
        import fishkern

        env["fishkern"] = fishkern.__version__
    except Exception:
        env["fishkern"] = None
    try:  # whether fishkern's compiled CPU ops (multi-tensor gather/scatter) are loaded
        from fishkern._native import native_available

        env["fishkern_native_ops"] = bool(native_available())
    except Exception:
        env["fishkern_native_ops"] = None
    try:  # what torch.optim does with foreach=None, fused=None for this device (private helper)
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _, foreach = _default_to_fused_or_foreach([torch.zeros(1, device=device)], differentiable=False, use_fused=False)
        env["torch_default_foreach"] = "foreach" if foreach else "for-loop"
    except Exception:
        env["torch_default_foreach"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
        env["device_description"] = f"{props.name} ({env['gpu_memory_gib']} GiB), host {env['cpu_model']}"
    else:
        env["device_description"] = f"{env['cpu_model']}, {env['cpu_count']} cores ({env['torch_num_threads']} torch threads)"
    return env


# --------------------------------------------------------------------------------------------------
# reports: formatting, provenance, result files, log lines
#
# Byte counts: decimal units with two decimals ("441.35 MB", "2.68 GB"), as the committed tables
# and docs/design.md have them. Not fishkern.reporting.fmt_bytes: its one decimal ("2.7 GB") hides
# differences the memory tables are about (dense AdamW +5.01 GB against original FISH +4.99 GB).


def fmt_bytes(n: float | None) -> str:
    """``441.35 MB``, ``-1.20 kB``, ``12 B``; ``n/a`` for None."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{int(n)} B"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table (cells used as given)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def git_revision() -> str | None:
    """The full commit hash, with ``+dirty(fishkern/)`` when the package's sources differ from it
    (the measured code is then not the commit's); None outside a git checkout. Unlike
    fishkern.reporting.git_revision (short hash, no dirty marker), a result must name its code exactly."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "fishkern"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return rev + ("+dirty(fishkern/)" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest() -> str:
    """sha256 (first 16 hex digits) of fishkern's Python sources, so a result names the exact code it measured."""
    h = hashlib.sha256()
    for f in sorted((REPO / "fishkern").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def command_line(argv: Sequence[str] | None = None) -> str:
    """How this run was started, to paste back: ``python benchmarks/bench_x.py --opt ...`` (the script
    relative to the repository); for a call from Python, ``main([...])``."""
    if argv is not None:
        return "main(" + repr(list(argv)) + ")"
    script = sys.argv[0]
    if os.path.isabs(script) or os.path.exists(script):
        script = os.path.relpath(os.path.abspath(script), REPO)
    return "python " + " ".join(shlex.quote(a) for a in [script] + sys.argv[1:])


def write_text(path, text: str) -> None:
    """Replace a result file atomically (fishkern.reporting's writer): an interrupted run leaves the
    previous result, never half a table."""
    write_text_atomic(Path(path), text)


def write_json(path, obj) -> None:
    """A result JSON (indent 1, values JSON cannot hold written with str()), replaced atomically."""
    write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the tables and the child results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# memory children: one fresh process per measurement, so that one peak RSS is not another's
#
# The parent runs ``python <script> --child '<json spec>'``; the child prints one line
# ``CHILD_RESULT <json>`` on stdout (anything else it prints is ignored).

CHILD_TAG = "CHILD_RESULT "


def print_child_result(result: dict[str, Any]) -> None:
    print(CHILD_TAG + json.dumps(result), flush=True)


def run_child(script, spec: dict[str, Any]) -> tuple[dict[str, Any] | None, subprocess.CompletedProcess]:
    """Run ``script --child <spec>`` in a fresh interpreter; (its result or None if it failed, the process)."""
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(CHILD_TAG)), None)
    if proc.returncode != 0 or line is None:
        return None, proc
    return json.loads(line[len(CHILD_TAG):]), proc
