"""The workloads: a model and the batches every method sees (built once, already on the device),
and the small helpers that walk those batches sample by sample."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from _common import count_params

from .configs import ALL_WORKLOADS, CONFIGS, CPU_WORKLOADS, CUDA_WORKLOADS, WorkloadConfig  # noqa: F401  (re-exported)

DATA_SEED = 1
SUBSET_METHODS = ("loop", "vmap", "backpack")  # the methods that may be measured on a subset of the N samples


def quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


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
    backpack_n: int | None = None  # None: all n
    config: WorkloadConfig | None = None
    cache: dict[str, Any] = field(default_factory=dict)  # per-method state built once (BackPACK's extended copy)

    def __post_init__(self):
        if self.backpack_n is None:
            self.backpack_n = self.n


def token_stats(batches, n) -> dict[str, Any]:
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


def subset_n(method: str, cfg: WorkloadConfig, n: int, quick: bool, device: torch.device, args) -> int:
    """Samples ``method`` is measured on: the CLI's --loop-samples / --vmap-samples / --backpack-samples,
    else the entry's subset for the device (in --quick mode at most half of N, so the scaling path runs),
    else all n."""
    given = getattr(args, f"{method}_samples", None)
    if given:
        return min(n, given)
    sub = (cfg.subsets_cuda if device.type == "cuda" else cfg.subsets_cpu).get(method)
    if sub is None:
        return n
    return min(n, sub, max(1, n // 2)) if quick else min(n, sub)


def build_workload(name: str, n: int | None, quick: bool, device: torch.device, args) -> Workload:
    """``args`` needs vmap_chunk and the --*-samples options (None: the entry's defaults)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown workload {name!r}; choose from {ALL_WORKLOADS}")
    cfg = CONFIGS[name]
    n = n or (cfg.quick_n if quick else cfg.n)
    bs = cfg.batch
    if cfg.hf:
        quiet_transformers()
    model = cfg.model(quick)
    g = torch.Generator().manual_seed(DATA_SEED)
    batches, desc = cfg.data(model, n, bs, quick, g)
    title = ((cfg.quick_title if quick and cfg.quick_title else cfg.title)).format(n=n)
    model = model.to(device).eval()
    batches = [to_device(b, device) for b in batches]
    chunk = args.vmap_chunk or (cfg.chunk_cuda if device.type == "cuda" else cfg.chunk_cpu)
    sub = {m: subset_n(m, cfg, n, quick, device, args) for m in SUBSET_METHODS}
    wl = Workload(name, title, desc, cfg.hf, cfg.synthetic, n, bs, model, batches, min(chunk, bs), sub["loop"], sub["vmap"],
                  backpack_n=sub["backpack"], config=cfg)
    wl.data_stats = token_stats(batches, n) if cfg.hf else {"image_shape": [3, 32, 32]}
    wl.data_stats["params"] = count_params(model)
    return wl


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return tuple(to_device(v, device) for v in obj)


def batch_size(b) -> int:
    return (b["labels"] if isinstance(b, dict) else b[1]).shape[0]


def cut(b, s: int, e: int):
    if isinstance(b, dict):
        return {k: v[s:e] for k, v in b.items()}
    return tuple(v[s:e] for v in b)


def iter_samples(batches, n: int):
    """The batches, the last one cut so that exactly n samples are yielded."""
    seen = 0
    for b in batches:
        if seen >= n:
            return
        size = batch_size(b)
        if seen + size > n:
            b = cut(b, 0, n - seen)
            size = n - seen
        seen += size
        yield b


def inputs_labels(wl: Workload, b):
    if wl.hf:
        return {k: v for k, v in b.items() if k != "labels"}, b["labels"]
    return b[0], b[1]


def logits(out):
    return out.logits if hasattr(out, "logits") else out
