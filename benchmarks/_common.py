"""Helpers shared by the fishkern benchmarks: the benchmark models, seeded random masks, timers,
memory probes and a description of the machine.

Nothing here is part of the fishkern package; the benchmarks import it as a sibling module.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------------
# models


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convolutions with BatchNorm, identity or 1x1 projection shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem (stride 1), no max-pool, four stages of BasicBlocks."""

    def __init__(self, blocks: Sequence[int] = (3, 4, 6, 3), widths: Sequence[int] = (64, 128, 256, 512), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        in_planes = widths[0]
        for stage, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if stage == 0 else 2
            for b in range(n):
                layers.append(BasicBlock(in_planes, w, stride if b == 0 else 1))
                in_planes = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


BERT_LARGE_PARAMS = 335_143_938
RESNET34_PARAMS = 21_282_122

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
            assert n == BERT_LARGE_PARAMS, f"BERT-large has {n} parameters, expected {BERT_LARGE_PARAMS}"
        return model
    if name == "resnet34":
        model = CifarResNet(blocks=(1, 1, 1, 1) if quick else (3, 4, 6, 3))
        if not quick:
            n = count_params(model)
            assert n == RESNET34_PARAMS, f"ResNet-34 has {n} parameters, expected {RESNET34_PARAMS}"
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


# the package's own measure of other processes' CPU use (its reports warn with it), shared here
from fishkern.reporting import cpu_snapshot, interference  # noqa: E402


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


from fishkern.env import cpu_model  # noqa: E402


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
