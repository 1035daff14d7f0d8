"""The workloads as declarative entries: one ``WorkloadConfig`` per workload (how to build the model
and the data, N, batch size, the N of --quick, vmap chunks, the subsets the slow methods are
measured on, the issue's goals for it). Adding a workload is adding one entry to ``CONFIGS``;
workloads.py turns an entry into the model and batches every method sees.

Builders: ``model(quick) -> nn.Module`` (on CPU, fp32, seeded); ``data(model, n, batch, quick, g) ->
(batches, description of the data)``, batches as Hugging Face dicts with "labels" (``hf=True``) or
(inputs, labels) pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from _common import build_model, count_params, model_description

MODEL_SEED = 0


@dataclass(frozen=True)
class Goal:
    """A goal of the issue on one measured ratio: ``ratio op threshold`` (op ``<=`` or ``>=``).
    ``at_n``: the N the goal is stated for (a run with another N says so next to the verdict)."""

    ratio: str
    op: str
    threshold: float
    at_n: int | None = None
    label: str = ""


@dataclass(frozen=True)
class WorkloadConfig:
    name: str
    title: str  # with {n}
    hf: bool  # a Hugging Face model called with **batch (else (images, labels) pairs)
    synthetic: bool
    model: Callable[[bool], torch.nn.Module]
    data: Callable[..., tuple[list, str]]
    n: int
    batch: int
    quick_n: int
    chunk_cpu: int  # vmap samples per call
    chunk_cuda: int
    # samples the slow methods are measured on (None: all N), their time scaled to N; per device
    subsets_cpu: dict[str, int] = field(default_factory=dict)
    subsets_cuda: dict[str, int] = field(default_factory=dict)
    devices: tuple[str, ...] = ("cpu",)  # where it is a default workload
    goals: tuple[Goal, ...] = ()
    quick_title: str | None = None  # title in --quick mode, when the model differs


# --------------------------------------------------------------------------------------------------
# builders


def _minilm(quick: bool) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    from fishkern.data import minilm_path

    torch.manual_seed(MODEL_SEED)  # the new classifier head
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def random_ids(n: int, T: int, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, vocab, (n, T), generator=g)  # ids < 1000: [PAD], [unused*], [CLS], [SEP]...
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (n,), generator=g)}


def _vader_words(model, n, bs, quick, g):
    from transformers import AutoTokenizer

    from fishkern.data import TensorBatches, load_vader, minilm_path, tokenize_texts

    train = load_vader()["train"]
    if n > len(train):
        raise SystemExit(f"minilm-vader: N={n} exceeds the {len(train)} VADER training examples")
    enc = tokenize_texts(train.texts[:n], AutoTokenizer.from_pretrained(minilm_path()), max_length=16, labels=train.labels[:n])
    desc = (f"all-MiniLM-L6-v2 + new 2-way head ({count_params(model):,} parameters); the first {n} VADER "
            f"train-split words, MiniLM tokenizer, max_length 16, batches of {bs} with trim_padding=True, VADER labels")
    return list(TensorBatches(enc, bs, trim_padding=True)), desc


def _synthetic_ids(T: int):
    def data(model, n, bs, quick, g):
        from fishkern.data import TensorBatches

        desc = (f"all-MiniLM-L6-v2 + new 2-way head; SYNTHETIC: {n} sequences of {T} uniformly random token ids "
                f"(no padding), random labels, batches of {bs}")
        return list(TensorBatches(random_ids(n, T, model.config.vocab_size, g), bs)), desc
    return data


def _random_images(num_classes: int, what: str):
    def data(model, n, bs, quick, g):
        x = torch.randn(n, 3, 32, 32, generator=g)
        y = torch.randint(0, num_classes, (n,), generator=g)
        desc = (what(quick) + f"; SYNTHETIC: {n} random N(0,1) 3x32x32 images (seeded), random labels "
                f"(CIFAR-10 is not downloaded), batches of {bs}")
        return [(x[s : s + bs], y[s : s + bs]) for s in range(0, n, bs)], desc
    return data


def _resnet34_full(quick: bool) -> torch.nn.Module:
    """ResNet-34 for CIFAR at full size also in --quick mode (only N is smaller)."""
    return build_model("resnet34", quick=False, seed=MODEL_SEED)


def _bert_large_data(model, n, bs, quick, g):
    enc = random_ids(n, 128, model.config.vocab_size, g)
    desc = model_description("bert-large", quick) + f"; SYNTHETIC: {n} x 128 random token ids (no padding), random labels, batches of {bs}"
    return [{k: v[s : s + bs] for k, v in enc.items()} for s in range(0, n, bs)], desc


# --------------------------------------------------------------------------------------------------
# the entries

SELF_CHECK_GOAL = Goal("self-check overhead", "<=", 0.10, at_n=256,
                       label="self-check costs ≤ 10% of a pass: (fishkern − fishkern-nocheck) / fishkern-nocheck")

CONFIGS: dict[str, WorkloadConfig] = {c.name: c for c in (
    WorkloadConfig(
        "minilm-vader", "MiniLM, VADER words (real text), N={n}", hf=True, synthetic=False,
        model=_minilm, data=_vader_words, n=256, batch=32, quick_n=64, chunk_cpu=8, chunk_cuda=32,
        subsets_cpu={"loop": 64, "vmap": 64},
        goals=(Goal("loop/fishkern", ">=", 8, at_n=256, label="fishkern ≥ 8× faster than the loop on MiniLM, N=256 real text"),
               SELF_CHECK_GOAL)),
    WorkloadConfig(
        "minilm-synth-t64", "MiniLM, SYNTHETIC random ids T=64, N={n}", hf=True, synthetic=True,
        model=_minilm, data=_synthetic_ids(64), n=128, batch=32, quick_n=16, chunk_cpu=8, chunk_cuda=32,
        subsets_cpu={"loop": 32, "vmap": 32}),
    WorkloadConfig(
        "minilm-synth-t128", "MiniLM, SYNTHETIC random ids T=128, N={n}", hf=True, synthetic=True,
        model=_minilm, data=_synthetic_ids(128), n=128, batch=32, quick_n=8, chunk_cpu=4, chunk_cuda=32,
        subsets_cpu={"loop": 32, "vmap": 16},
        goals=(Goal("fishkern/floor", "<=", 1.3, label="MiniLM T=128: fishkern ≤ 1.3× plain forward+backward"),
               Goal("loop/fishkern", ">=", 3, label="MiniLM T=128: fishkern ≥ 3× faster than the batch-1 loop"),
               Goal("memory fishkern/floor", "<=", 2, label="MiniLM T=128: peak memory ≤ 2× plain forward+backward"))),
    WorkloadConfig(
        "resnet34-cifar", "ResNet-34 (CIFAR), SYNTHETIC random 3x32x32, N={n}", hf=False, synthetic=True,
        model=_resnet34_full, data=_random_images(10, lambda quick: model_description("resnet34", False)),
        n=256, batch=64, quick_n=16, chunk_cpu=16, chunk_cuda=128,
        subsets_cpu={"loop": 64, "vmap": 64, "backpack": 64},
        goals=(Goal("loop/fishkern", ">=", 5, label="ResNet-34: fishkern ≥ 5× faster than the batch-1 loop"),
               Goal("fishkern/floor", "<=", 1.5, label="ResNet-34: fishkern ≤ 1.5× plain forward+backward"),
               SELF_CHECK_GOAL)),
    WorkloadConfig(
        "bert-large", "BERT-large, random ids T=128, N={n}", hf=True, synthetic=True,
        model=lambda quick: build_model("bert-large", quick=quick, seed=MODEL_SEED), data=_bert_large_data,
        n=1024, batch=32, quick_n=128, chunk_cpu=2, chunk_cuda=32, subsets_cuda={"loop": 128},
        devices=("cuda",), quick_title="BERT (QUICK: 2 layers, hidden 256), T=128, N={n}"),
    WorkloadConfig(
        "resnet34", "ResNet-34 (CIFAR), random 3x32x32, N={n}", hf=False, synthetic=True,
        model=lambda quick: build_model("resnet34", quick=quick, seed=MODEL_SEED),
        data=_random_images(10, lambda quick: model_description("resnet34", quick)),
        n=1024, batch=128, quick_n=256, chunk_cpu=16, chunk_cuda=128, subsets_cuda={"loop": 128},
        devices=("cuda",), quick_title="CIFAR ResNet (QUICK: [1,1,1,1]), N={n}"),
)}

CPU_WORKLOADS = tuple(c.name for c in CONFIGS.values() if "cpu" in c.devices)
CUDA_WORKLOADS = tuple(c.name for c in CONFIGS.values() if "cuda" in c.devices)
ALL_WORKLOADS = tuple(CONFIGS)
