"""Fine-tuning a sequence classifier with a sparse mask (or densely): the loop the runners share.

`finetune(model, train, evaluate, config)` picks the mask (FISH from Fisher scores, random, BitFit, or
none for dense), builds the optimizer (MaskedAdamW over the mask, torch.optim.AdamW for dense), trains
with a linear learning-rate decay, evaluates after every epoch, and measures what the paper's tables
and ours report: trainable entries, optimizer-state bytes, peak memory, Fisher time, step time.

It is also the reference for a hand-written loop: see `train_epoch` for the step sequence.

Under torchrun (an initialised process group of W > 1 ranks) the same call trains data-parallel:
every rank takes its rows of each global batch (`fishkern.distributed.loop.ShardedBatches`), the
Fisher pass is split across the ranks (`fisher_mask_distributed`: one mask, chosen on rank 0), and
the model is wrapped in DDP — with the masked all-reduce hook for sparse methods
(`fishkern.distributed.masked_ddp`), DDP's own for dense. Results equal one process over the same
global batches within floating-point rounding (a final batch with fewer rows than ranks is
skipped); every rank returns them.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .fisher.mask import MASK_METHODS, make_mask
from .mask import FishMask
from .mask.heads import head_names
from .memory import PeakMemory
from .optim import MaskedAdamW

METHODS = MASK_METHODS


@dataclass
class FinetuneConfig:
    method: str = "fish"
    density: float = 0.005  # fraction of all parameters (the paper's 0.5%)
    num_samples: int = 1024  # Fisher samples (the paper's N)
    fisher_kind: str = "empirical"
    lr: float = 5e-5
    epochs: int = 7
    weight_decay: float = 0.0  # the paper's runs (torch's AdamW defaults to 0.01)
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0  # clipping over the trained entries only (as a model of just those)
    # new head: forced into every mask, counted inside k. None: the rule of fish_mask_for
    # ("classifier" / "score", an error when neither exists); () forces nothing in
    head: Sequence[str] | str | None = None
    seed: int = 0
    free_dense_grads: bool = True  # masked methods: gather gradients during backward, free dense .grad
    # masked methods: Linear / Embedding weight gradients computed at the masked entries only (one
    # process; implies free_dense_grads). Off under data parallelism: DDP's reducer needs dense gradients
    sparse_backward: bool = True

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method != "dense" and self.method != "bitfit" and not (0.0 < self.density <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclass
class FinetuneResult:
    method: str
    density: float  # actual trained fraction (1.0 for dense)
    trainable: int  # trained entries
    total: int  # all parameters
    optimizer_state_bytes: int
    peak_memory_bytes: int  # growth during training over the loaded model
    peak_memory_kind: str  # "cpu_rss" or "cuda_allocated"
    fisher_seconds: float | None
    fisher_samples: int | None
    step_ms: float  # median full training step (forward, backward, optimizer)
    optimizer_step_ms: float  # median optimizer step alone
    train_seconds: float
    metrics: dict[str, float]  # after the last epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    mask: FishMask | None = None

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("mask")
        d["mask_digest"] = self.mask.digest if self.mask is not None else None
        return d


def select_mask(
    model: nn.Module,
    method: str,
    density: float,
    *,
    fisher_data: Iterable | None = None,
    num_samples: int = 1024,
    head: Sequence[str] | str | None = None,
    seed: int = 0,
    fisher_kind: str = "empirical",
    progress: bool = True,
) -> tuple[FishMask | None, Any]:
    """The mask of a method (None for dense) and the Fisher result (FISH only). ``head``: the
    rule of ``fishkern.mask.heads.head_names`` (None: "classifier" / "score"; () forces nothing),
    the same for every method. The switch itself is ``fishkern.fisher.mask.make_mask``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    head = head_names(model, head)  # checked for dense too (as before): a wrong head is a wrong config
    if method == "fish" and fisher_data is None:
        raise ValueError("the FISH mask needs data for the Fisher estimate (fisher_data)")
    return make_mask(model, method, density, data=fisher_data, num_samples=num_samples, force=head, seed=seed,
                     kind=fisher_kind, progress=progress)


def build_optimizer(model: nn.Module, mask: FishMask | None, config: FinetuneConfig,
                    sparse_backward: bool | None = None) -> torch.optim.Optimizer:
    """MaskedAdamW over the mask's entries (with sparse backward when ``sparse_backward``, default
    ``config.sparse_backward``); torch.optim.AdamW (fused on CUDA) for dense."""
    if mask is None:
        params = [p for p in model.parameters() if p.requires_grad]
        # torch's fastest AdamW where it has one (fused: CUDA, and CPU fp32/fp64 since torch 2.4)
        fused = all(p.is_cuda or (p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64)) for p in params)
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
    sparse = config.sparse_backward if sparse_backward is None else sparse_backward
    return MaskedAdamW(
        model if sparse else model.named_parameters(), mask, lr=config.lr, weight_decay=config.weight_decay,
        free_dense_grads=config.free_dense_grads, sparse_backward="auto" if sparse else False,
    )


def linear_schedule(optimizer, total_steps: int, warmup_ratio: float):
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _clip(model, optimizer, max_norm):
    if max_norm is None or max_norm <= 0:
        return
    if isinstance(optimizer, MaskedAdamW):
        optimizer.clip_grad_norm_(max_norm)
    else:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)


LOG_EVERY_S = 0.5  # the progress bar's loss is read (a device sync) at most this often, and at each epoch end


class _StepClock:
    """Step and optimizer-step times without a device sync per step: CUDA events recorded around
    each step and read once, at the end of the epoch (one sync); on other devices the host clock
    (their work is done when the call returns). ``mark(0)`` before the batch moves, ``mark(1)``
    after backward, ``mark(2)`` after the optimizer step."""

    def __init__(self, device: torch.device, enabled: bool):
        self.cuda = enabled and device.type == "cuda"
        self.enabled = enabled
        self.marks: list[list] = []

    def mark(self, i: int) -> None:
        if not self.enabled:
            return
        if i == 0:
            self.marks.append([None, None, None])
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks[-1][i] = ev
        else:
            self.marks[-1][i] = time.perf_counter()

    def read(self, step_times: list[float], opt_times: list[float]) -> None:
        """Append the seconds of every marked step (the one sync of the epoch on CUDA)."""
        if self.cuda and self.marks:
            self.marks[-1][2].synchronize()
            for a, b, c in self.marks:
                step_times.append(a.elapsed_time(c) / 1e3)
                opt_times.append(b.elapsed_time(c) / 1e3)
        else:
            for a, b, c in self.marks:
                step_times.append(c - a)
                opt_times.append(c - b)
        self.marks.clear()


def train_epoch(model, batches, optimizer, scheduler, *, max_grad_norm=None, device=None, progress=None,
                step_times=None, opt_times=None) -> float:
    """One epoch of the standard loop: forward (HF models compute the loss from "labels"), backward,
    clip, optimizer step, scheduler step, zero_grad. Returns the mean training loss. A batch with a
    ``loss_scale`` (a data-parallel rank's share, see ShardedBatches) scales its loss for backward.

    No host-device sync per step: the loss is summed on the device (float64, so the mean equals the
    sum of the per-step Python floats it replaces) and read when the progress bar shows it (at most
    every ``LOG_EVERY_S`` seconds) and at the end; step times come from CUDA events read at the end."""
    device = device or next(model.parameters()).device
    model.train()
    clock = _StepClock(device, step_times is not None)
    show = progress is not None and not getattr(progress, "disable", False)
    acc, n = None, 0  # acc: the running loss sum on the loss's device
    host_sum = device.type == "mps"  # no float64 there: sum Python floats, as before (a sync per step)
    last_shown = time.monotonic()
    for batch in batches:
        clock.mark(0)
        scale = getattr(batch, "loss_scale", 1.0)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = model(**batch)
        (out.loss * scale if scale != 1.0 else out.loss).backward()
        clock.mark(1)
        _clip(model, optimizer, max_grad_norm)
        optimizer.step()
        clock.mark(2)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # a rank's share of the global batch's mean loss (times W)
        if host_sum:
            loss = out.loss.item() * scale
        else:
            loss = out.loss.detach().to(torch.float64) * scale
        acc = loss if acc is None else acc + loss
        n += 1
        if progress is not None:
            progress.update(1)
            if show and time.monotonic() - last_shown >= LOG_EVERY_S:
                progress.set_postfix(loss=f"{float(acc) / n:.4f}")
                last_shown = time.monotonic()
    total = 0.0 if acc is None else float(acc)
    if show and n:
        progress.set_postfix(loss=f"{total / n:.4f}")
    if step_times is not None:
        clock.read(step_times, opt_times)
    return total / max(1, n)


def time_training_steps(model: nn.Module, batches: Iterable, mask: FishMask, config: FinetuneConfig, *,
                        steps: int = 20, warmup: int = 3, sparse_backward: bool = True) -> float:
    """Median ms of ``steps`` training steps (forward, backward, clip, optimizer step) of a masked
    method after ``warmup`` untimed ones, with or without sparse backward, on the first batches of
    ``batches``. The model trains during them: reload its weights afterwards."""
    device = next(model.parameters()).device
    times: list[float] = []
    opt = build_optimizer(model, mask, config, sparse_backward=sparse_backward)
    try:
        clock = _StepClock(device, True)
        for i, batch in zip(range(warmup + steps), batches):
            if i >= warmup:
                clock.mark(0)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            model(**batch).loss.backward()
            if i >= warmup:
                clock.mark(1)
            _clip(model, opt, config.max_grad_norm)
            opt.step()
            if i >= warmup:
                clock.mark(2)
            opt.zero_grad(set_to_none=True)
        clock.read(times, [])
    finally:
        opt.disable_sparse_backward()
        opt.zero_grad()
        opt.remove_grad_hooks()
    return 1e3 * statistics.median(times) if times else math.nan


def finetune(
    model: nn.Module,
    train: Iterable,
    evaluate: Callable[[nn.Module], dict[str, float]],
    config: FinetuneConfig,
    *,
    fisher_data: Iterable | None = None,
    mask: FishMask | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> FinetuneResult:
    """Train `model` (a Hugging Face sequence classifier: it returns .loss given "labels") on `train`
    (re-iterable batches of dicts; `set_epoch(e)` is called when present) and evaluate after each
    epoch. fisher_data defaults to `train`. A precomputed `mask` skips the mask selection."""
    config.check()
    from ._progress import progress_bar

    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    rank, world = _data_parallel()
    fisher_data = fisher_data if fisher_data is not None else train
    if world > 1:
        from .distributed.loop import FisherSamples, ShardedBatches

        # training: each rank's rows of every global batch; Fisher: each rank's block of the first
        # N samples — together exactly what one process would use
        train = ShardedBatches(train, rank, world)
        fisher_data = FisherSamples(fisher_data, config.num_samples, rank, world)
        progress = progress and rank == 0
    fisher_result = None
    if mask is None and config.method == "fish" and world > 1:
        mask, fisher_result = _fish_mask_data_parallel(model, fisher_data, config, progress)
    elif mask is None and config.method != "dense":
        mask, fisher_result = select_mask(
            model, config.method, config.density, fisher_data=fisher_data,
            num_samples=config.num_samples, head=config.head, seed=config.seed,
            fisher_kind=config.fisher_kind, progress=progress,
        )
    total = sum(p.numel() for p in model.parameters())
    steps_per_epoch = len(train)
    history: list[dict[str, Any]] = []
    step_times: list[float] = []
    opt_times: list[float] = []
    t_start = time.perf_counter()
    optimizer = None
    try:
        with PeakMemory(device) as peak:
            optimizer = build_optimizer(model, mask, config, sparse_backward=config.sparse_backward and world == 1)
            net = _wrap_data_parallel(model, mask) if world > 1 else model  # after the optimizer: k=0 frozen
            scheduler = linear_schedule(optimizer, steps_per_epoch * config.epochs, config.warmup_ratio)
            bar = progress_bar(total=steps_per_epoch * config.epochs, desc=desc or config.method, unit="step",
                               enabled=progress)
            try:
                for epoch in range(config.epochs):
                    if hasattr(train, "set_epoch"):
                        train.set_epoch(epoch)
                    loss = train_epoch(net, train, optimizer, scheduler, max_grad_norm=config.max_grad_norm,
                                       device=device, progress=bar, step_times=step_times, opt_times=opt_times)
                    if world > 1:
                        loss = _mean_over_ranks(loss, world)
                    metrics = evaluate(model)
                    history.append({"epoch": epoch + 1, "train_loss": loss, **metrics})
            finally:
                bar.close()
        if isinstance(optimizer, MaskedAdamW):
            state_bytes = optimizer.state_bytes()
        else:
            state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                              for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    finally:
        if isinstance(optimizer, MaskedAdamW):
            optimizer.disable_sparse_backward()  # the model's layers get their own forward back
            if optimizer.free_dense_grads:
                optimizer.zero_grad()
                optimizer.remove_grad_hooks()  # the model gets its dense .grad behaviour back, also on error
    train_seconds = time.perf_counter() - t_start
    trainable = mask.k if mask is not None else sum(p.numel() for p in model.parameters() if p.requires_grad)
    skip = min(len(step_times) - 1, 3)  # warm-up steps
    return FinetuneResult(
        method=config.method,
        density=trainable / total,
        trainable=trainable,
        total=total,
        optimizer_state_bytes=state_bytes,
        peak_memory_bytes=peak.peak_bytes,
        peak_memory_kind=peak.kind,
        fisher_seconds=fisher_result.seconds if fisher_result is not None else None,
        fisher_samples=fisher_result.num_samples if fisher_result is not None else None,
        step_ms=1e3 * statistics.median(step_times[skip:]) if step_times else math.nan,
        optimizer_step_ms=1e3 * statistics.median(opt_times[skip:]) if opt_times else math.nan,
        train_seconds=train_seconds,
        metrics=dict(history[-1]) if history else {},
        history=history,
        mask=mask,
    )


# ------------------------------------------------------------------------------ data parallel
def _data_parallel() -> tuple[int, int]:
    """(rank, world size) of an initialised multi-rank process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_ranks(value: float, world: int) -> float:
    """The ranks' scaled local losses averaged: the mean loss over the global batches."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / world


def _fish_mask_data_parallel(model, fisher_data, config: FinetuneConfig, progress: bool):
    """The FISH mask with the Fisher pass split across the ranks (one mask, chosen on rank 0)."""
    from types import SimpleNamespace

    from .distributed.fisher import fisher_mask_distributed

    head = head_names(model, config.head)
    t0 = time.perf_counter()
    mask = fisher_mask_distributed(model, fisher_data, config.density, config.num_samples,
                                   force=head, kind=config.fisher_kind, seed=config.seed, progress=progress)
    info = SimpleNamespace(seconds=time.perf_counter() - t0, num_samples=mask.provenance.get("fisher_samples"))
    return mask, info


def _wrap_data_parallel(model, mask):
    """DDP for the training forward: only the masked gradient entries travel for sparse methods."""
    if mask is None:
        return torch.nn.parallel.DistributedDataParallel(model)
    from .distributed.ddp import masked_ddp

    return masked_ddp(model, mask)
