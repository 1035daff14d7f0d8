"""The workloads: a model and the batches every method sees (built once, already on the device),
and the small helpers that walk those batches sample by sample."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from _common import build_model, count_params, model_description

CPU_WORKLOADS = ("minilm-vader", "minilm-synth-t64")
CUDA_WORKLOADS = ("bert-large", "resnet34")
ALL_WORKLOADS = CPU_WORKLOADS + CUDA_WORKLOADS
DATA_SEED = 1
MODEL_SEED = 0

# per workload: N, batch size, N in --quick mode, default vmap chunk on cpu, on cuda
WORKLOAD_DEFAULTS = {
    "minilm-vader": dict(n=256, batch=32, quick_n=64, chunk_cpu=8, chunk_cuda=32),
    "minilm-synth-t64": dict(n=128, batch=32, quick_n=16, chunk_cpu=8, chunk_cuda=32),
    "bert-large": dict(n=1024, batch=32, quick_n=128, chunk_cpu=2, chunk_cuda=32),
    "resnet34": dict(n=1024, batch=128, quick_n=256, chunk_cpu=16, chunk_cuda=128),
}


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


def _random_ids(n: int, T: int, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, vocab, (n, T), generator=g)  # ids < 1000: [PAD], [unused*], [CLS], [SEP]...
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (n,), generator=g)}


def build_workload(name: str, n: int | None, quick: bool, device: torch.device, args) -> Workload:
    """``args`` needs vmap_chunk, loop_samples and vmap_samples (None: the defaults)."""
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
            batches = list(TensorBatches(_random_ids(n, T, model.config.vocab_size, g), bs))
            title = f"MiniLM, SYNTHETIC random ids T=64, N={n}"
            desc = (f"all-MiniLM-L6-v2 + new 2-way head; SYNTHETIC: {n} sequences of {T} uniformly random token ids "
                    f"(no padding), random labels, batches of {bs}")
            synthetic = True
        hf = True
    elif name == "bert-large":
        model = build_model("bert-large", quick=quick, seed=MODEL_SEED)
        enc = _random_ids(n, 128, model.config.vocab_size, g)
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
        raise ValueError(f"unknown workload {name!r}; choose from {ALL_WORKLOADS}")
    model = model.to(device).eval()
    batches = [to_device(b, device) for b in batches]
    chunk = args.vmap_chunk or (d["chunk_cuda"] if device.type == "cuda" else d["chunk_cpu"])
    loop_n = min(n, args.loop_samples) if args.loop_samples else n
    vmap_n = min(n, args.vmap_samples) if args.vmap_samples else n
    wl = Workload(name, title, desc, hf, synthetic, n, bs, model, batches, min(chunk, bs), loop_n, vmap_n)
    wl.data_stats = token_stats(batches, n) if hf else {"image_shape": [3, 32, 32]}
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
