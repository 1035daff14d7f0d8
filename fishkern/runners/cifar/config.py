"""`fishkern cifar`'s settings: the config, the grid of runs it plans, and the learning-rate schedule.

Light: no torch or numpy here (the command line reads its defaults from this module).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...reporting import plural

if TYPE_CHECKING:
    from ...data.augment import Augment

METHODS = ("standard", "dense", "fish", "random")
DATASETS = ("cifar10", "digits")
HUB_NAME = "uoft-cs/cifar10"
HEAD = "fc"

@dataclass
class CifarConfig:
    out_dir: str = "fishkern-cifar"
    dataset: str = "cifar10"
    data_dir: str | None = None
    methods: tuple[str, ...] = ("fish",)
    densities: tuple[float, ...] = (0.1,)
    merge_intervals: tuple[int, ...] = (100,)  # H: local steps between exchanges
    workers: int | None = None  # spawned workers (None: 2; ignored under torchrun)
    epochs: int = 100
    batch_size: int = 512  # per worker
    lr: float = 0.4  # peak (cifar10-fast's; the paper searched {0.4, 0.2, 0.08, 0.04, 0.02})
    lr_warmup_epochs: float = 5.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    dense_warmup_epochs: int = 5  # standard training before the distributed phase
    num_samples: int = 256  # Fisher samples (the paper's value for distributed training)
    mask_every_exchanges: int = 0  # R: recompute the mask every R exchanges (0: fixed)
    mask_every_epochs: int = 0  # recompute the mask every E epochs (0: fixed)
    checkpoint_every_epochs: int = 0  # sparse checkpoints every E epochs (0: none)
    force_head: bool = True  # the fc head is always in the mask (counted in k)
    blocks: tuple[int, ...] | None = None  # None: (3, 4, 6, 3) for CIFAR-10, (1, 1, 1, 1) for digits
    widths: tuple[int, ...] | None = None  # None: (64, 128, 256, 512) / (8, 16, 32, 64)
    crop_padding: int | None = None  # None: 4 / 1
    cutout: int | None = None  # None: 8 / 0
    flip: bool | None = None  # None: True / False (digits are not mirror-symmetric)
    seeds: tuple[int, ...] = (0,)
    device: str | None = None  # default: cuda when available
    threads: int | None = None  # torch threads per worker (default: cores / workers)
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    verify_sync: bool = False  # assert_in_sync after every exchange
    save_states: bool = False  # write the parameters at the start of the masked phase and at the end
    timeout: float = 1800.0  # seconds for any collective
    benchmark_steps: int = 0
    overwrite: bool = False
    progress: bool = True

    def model_blocks(self) -> tuple[int, ...]:
        return tuple(self.blocks) if self.blocks else ((3, 4, 6, 3) if self.dataset == "cifar10" else (1, 1, 1, 1))

    def model_widths(self) -> tuple[int, ...]:
        return tuple(self.widths) if self.widths else ((64, 128, 256, 512) if self.dataset == "cifar10" else (8, 16, 32, 64))

    def augment(self) -> Augment:
        from ...data.augment import Augment

        cifar = self.dataset == "cifar10"
        return Augment(
            crop_padding=(4 if cifar else 1) if self.crop_padding is None else self.crop_padding,
            flip=cifar if self.flip is None else self.flip,
            cutout_size=(8 if cifar else 0) if self.cutout is None else self.cutout,
        )

    def check(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown method {bad[:1]}; choose from {', '.join(METHODS)}")
        if any(not 0.0 < d <= 1.0 for d in self.densities) or not self.densities:
            raise ValueError(f"densities are fractions in (0, 1] (0.1 = 10%), got {self.densities}")
        if any(h < 1 for h in self.merge_intervals) or not self.merge_intervals:
            raise ValueError(f"merge intervals are numbers of local steps >= 1, got {self.merge_intervals}")
        for name in ("epochs", "batch_size", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dense_warmup_epochs", "mask_every_exchanges", "mask_every_epochs", "checkpoint_every_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mask_every_exchanges and self.mask_every_epochs:
            raise ValueError("give at most one of mask_every_exchanges (R) and mask_every_epochs")
        if not 0 <= self.lr_warmup_epochs < self.epochs:
            raise ValueError(f"the learning-rate warm-up ({plural(float(self.lr_warmup_epochs), 'epoch')}) must be "
                             f"shorter than the {plural(self.epochs, 'epoch')} of training")
        if any(m != "standard" for m in self.methods) and self.dense_warmup_epochs >= self.epochs:
            raise ValueError(f"the dense warm-up ({plural(self.dense_warmup_epochs, 'epoch')}) leaves no epoch of the "
                             f"{self.epochs} for distributed training")
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0 or self.timeout <= 0:
            raise ValueError("lr and timeout must be > 0, momentum and weight decay >= 0")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if len(self.model_blocks()) != len(self.model_widths()):
            raise ValueError(f"blocks {self.model_blocks()} and widths {self.model_widths()} need the same length")


@dataclass(frozen=True)
class RunSpec:
    """One training run; the settings not here are the config's."""

    name: str
    method: str
    seed: int = 0
    density: float | None = None
    merge_interval: int | None = None
    mask_every_exchanges: int = 0
    mask_every_epochs: int = 0
    checkpoint_every_epochs: int = 0
    group: str = ""


def plan_runs(cfg: CifarConfig) -> list[RunSpec]:
    """The grid of runs of a config: methods × densities (masked methods) × merge intervals
    (distributed methods) × seeds."""
    out = []
    for seed in cfg.seeds:
        for m in cfg.methods:
            dens = cfg.densities if m in ("fish", "random") else (None,)
            hs = cfg.merge_intervals if m != "standard" else (None,)
            for d in dens:
                for h in hs:
                    name = m + ("" if d is None else f"_d{d:g}") + ("" if h is None else f"_h{h}") + f"_s{seed}"
                    out.append(RunSpec(name, m, seed, d, h, cfg.mask_every_exchanges if d else 0,
                                       cfg.mask_every_epochs if d else 0, cfg.checkpoint_every_epochs))
    return out


def lr_at(epoch: float, peak: float, warmup: float, total: float) -> float:
    """The piecewise-linear schedule: 0 at epoch 0, ``peak`` at ``warmup``, 0 at ``total`` (linear in
    between; 0 after the end). Step i of an epoch with S steps uses ``lr_at(epoch + i / S)``, as
    cifar10-fast does (the first step of training has lr 0)."""
    if epoch <= 0:
        return 0.0 if warmup > 0 else float(peak)
    if epoch < warmup:
        return peak * epoch / warmup
    if epoch >= total:
        return 0.0
    return peak * (total - epoch) / (total - warmup)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per pass over n examples (the last partial batch is dropped, as in cifar10-fast;
    a set smaller than one batch is one batch)."""
    return max(1, n // batch_size)
