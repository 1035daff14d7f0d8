"""`fishkern cifar`: the paper's ResNet-34 / CIFAR-10 recipe (Figure 3, Table 4) on torch.distributed.

Methods: ``standard`` (one process, dense Nesterov SGD: the upper bound), ``dense`` (M workers,
local dense SGD, all parameters averaged every H local steps), ``fish`` and ``random`` (M workers
train the same FISH / random mask with MaskedSGD and exchange only its k values every H steps:
4·k bytes per worker per exchange). Paper defaults: batch 512 per worker, Nesterov momentum 0.9,
weight decay 5e-4 (on the trained entries only), learning rate piecewise linear 0 → peak over 5
epochs → 0 at the end, crop/flip/cutout augmentation, 100 epochs of which the first 5 are dense
"standard" warm-up before the mask is computed (rank 0's Fisher over N = 256 samples, forced head).
The warm-up is standard training (whole training set, one model): every rank computes the same
one, then rank 0's weights are broadcast — like the initial model, not counted as communication.

Workers are real processes: launched by ``torchrun`` (one per GPU; environment variables), or
spawned here with ``--workers M`` (gloo on CPU / NCCL on GPU, rendezvous through a FileStore in a
temporary directory). Each worker trains on its own shard of the training set (each epoch is one
pass over the data in total, as in the paper: a worker runs half the steps of standard training);
``SparseAverager`` does the exchanges and counts the bytes.

Data: ``datasets.load_dataset("uoft-cs/cifar10")`` with a network; ``--data-dir`` for offline use
(a saved DatasetDict with train/test splits, or an .npz file with x_train, y_train, x_test, y_test);
``--dataset digits`` for scikit-learn's 8×8 digits. ``--miniature`` runs the offline miniature of
Figure 3 and Table 4 on the digits; ``--benchmark-steps N`` times the training step (standard vs
FISH) for a GPU.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# numpy, torch and the model are imported where they are used: `fishkern cifar --help` and the
# command line's checks need none of them
from . import check_device
from ..reporting import (
    MachineLoad,
    bytes_log_axis,
    draw_baseline,
    fmt_bytes,
    git_revision,
    load_warning,
    plural,
    save_figure,
    write_json_atomic,
    write_text_atomic,
)

METHODS = ("standard", "dense", "fish", "random")
DATASETS = ("cifar10", "digits")
HUB_NAME = "uoft-cs/cifar10"
HEAD = "fc"


# ------------------------------------------------------------------------------------ settings
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
        from ..data.augment import Augment

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


# ---------------------------------------------------------------------------------------- data
def _to_nchw(x: np.ndarray, what: str) -> np.ndarray:
    import numpy as np

    if x.ndim == 3:  # (N, H, W): grey
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{what}: images must be (N, H, W, C), (N, C, H, W) or (N, H, W), got shape {x.shape}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def make_image_data(x_train, y_train, x_test, y_test, *, name: str, source: str) -> dict[str, Any]:
    """Validate arrays into the runner's data dict: uint8 (0–255) or float images, int labels 0..C-1."""
    import numpy as np
    import torch

    out: dict[str, Any] = {"name": name, "source": source}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype == object or y.dtype == object:
            raise ValueError(f"{split}: images and labels must be numeric arrays")
        x = _to_nchw(x, split)
        if y.ndim != 1 or y.shape[0] != x.shape[0] or x.shape[0] == 0:
            raise ValueError(f"{split}: {x.shape[0]} images but labels of shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{split}: labels must be integers, got {y.dtype}")
        if np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8 and x.size and 0 <= x.min() and x.max() <= 255:
            x = x.astype(np.uint8)  # e.g. images read back from lists
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{split}: images must be uint8 (0-255) or float, got {x.dtype}")
        if min(x.shape[2:]) < 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{split}: images of shape {x.shape[1:]} (C, H, W) are not 1- or 3-channel images >= 4x4")
        out[f"x_{split}"] = torch.from_numpy(np.ascontiguousarray(x))
        out[f"y_{split}"] = torch.from_numpy(y.astype(np.int64))
    if out["x_train"].shape[1:] != out["x_test"].shape[1:] or out["x_train"].dtype != out["x_test"].dtype:
        raise ValueError(f"train images {tuple(out['x_train'].shape[1:])} {out['x_train'].dtype} and test images "
                         f"{tuple(out['x_test'].shape[1:])} {out['x_test'].dtype} differ")
    lo = min(int(out["y_train"].min()), int(out["y_test"].min()))
    classes = int(max(out["y_train"].max(), out["y_test"].max())) + 1
    if lo < 0 or classes < 2:
        raise ValueError(f"labels must be 0..C-1 with C >= 2, got the range [{lo}, {classes - 1}]")
    out["num_classes"] = classes
    out["scale"] = 255.0 if out["x_train"].dtype == torch.uint8 else 1.0
    return out


def _from_datasetdict(dd, source: str) -> dict[str, Any]:
    import numpy as np

    missing = [s for s in ("train", "test") if s not in dd]
    if missing:
        raise ValueError(f"{source}: the DatasetDict has no {missing} split (it has {list(dd)})")
    arrays = {}
    for split in ("train", "test"):
        ds = dd[split]
        img = next((c for c in ("img", "image") if c in ds.column_names), None)
        lab = next((c for c in ("label", "labels") if c in ds.column_names), None)
        if img is None or lab is None:
            raise ValueError(f"{source}: split {split!r} needs an image column (img/image) and a label column, "
                             f"has {ds.column_names}")
        arrays[split] = (np.stack([np.asarray(im) for im in ds[img]]), np.asarray(ds[lab]))
    return make_image_data(*arrays["train"], *arrays["test"], name="cifar10", source=source)


def load_digits_data() -> dict[str, Any]:
    """scikit-learn's 8×8 handwritten digits (1,797 grey images, values 0–16): a stratified 80/20
    split (1,437 train / 360 test, fixed seed)."""
    import numpy as np

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, stratify=d.target, random_state=0)
    return make_image_data(xtr, ytr, xte, yte, name="digits", source="sklearn.datasets.load_digits")


def load_cifar10(data_dir: str | None) -> dict[str, Any]:
    """CIFAR-10: from the hub (``datasets.load_dataset("uoft-cs/cifar10")``) when data_dir is None,
    else from a saved DatasetDict directory or an .npz file (x_train, y_train, x_test, y_test) — the
    path, or the one .npz inside the directory."""
    import numpy as np

    if data_dir is None:
        import datasets

        try:
            dd = datasets.load_dataset(HUB_NAME)
        except OSError as e:  # no network, or the dataset is not reachable
            raise FileNotFoundError(f"could not load {HUB_NAME} from the hub ({e}); offline, pass --data-dir") from e
        return _from_datasetdict(dd, HUB_NAME)
    path = Path(data_dir)
    if not path.exists():
        raise FileNotFoundError(f"data directory {path} does not exist")
    if path.is_dir() and (path / "dataset_dict.json").exists():
        import datasets

        return _from_datasetdict(datasets.load_from_disk(str(path)), str(path))
    npz = [path] if path.is_file() else sorted(path.glob("*.npz"))
    if len(npz) != 1 or npz[0].suffix != ".npz":
        raise ValueError(f"{path} is neither a saved DatasetDict (dataset_dict.json) nor an .npz file / a directory "
                         f"holding exactly one .npz with x_train, y_train, x_test, y_test")
    try:
        with np.load(npz[0], allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise ValueError(f"{npz[0]} lacks {missing} (has {z.files})")
            arrays = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{npz[0]} is not a readable .npz file ({e})") from e
    return make_image_data(*arrays, name="cifar10", source=str(npz[0]))


def load_data(cfg: CifarConfig) -> dict[str, Any]:
    data = load_digits_data() if cfg.dataset == "digits" else load_cifar10(cfg.data_dir)
    if cfg.max_train_samples:
        data["x_train"], data["y_train"] = data["x_train"][: cfg.max_train_samples], data["y_train"][: cfg.max_train_samples]
    if cfg.max_test_samples:
        data["x_test"], data["y_test"] = data["x_test"][: cfg.max_test_samples], data["y_test"][: cfg.max_test_samples]
    x = data["x_train"].float() / data["scale"]
    data["mean"] = x.mean(dim=(0, 2, 3))
    data["std"] = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return data


def build_model(cfg: CifarConfig, data_or_shape, seed: int) -> CifarResNet:
    import torch

    from ..models.resnet import CifarResNet

    channels, classes = (data_or_shape["x_train"].shape[1], data_or_shape["num_classes"]) \
        if isinstance(data_or_shape, dict) else data_or_shape
    torch.manual_seed(seed)
    return CifarResNet(cfg.model_blocks(), cfg.model_widths(), classes, channels)


def check_budget(cfg: CifarConfig, model: torch.nn.Module) -> None:
    """Refuse densities whose k cannot hold the forced head (before any process starts)."""
    import torch

    if not cfg.force_head or not any(m in ("fish", "random") for m in cfg.methods):
        return
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(HEAD + "."))
    for d in cfg.densities:
        if math.floor(d * total) < head:
            raise ValueError(f"density {d:g} gives k = {math.floor(d * total):,} entries of {total:,}, fewer than the "
                             f"{head:,} of the forced head '{HEAD}'; raise the density or pass --no-force-head")


def make_optimizer(cfg: CifarConfig, model: torch.nn.Module, mask=None) -> torch.optim.Optimizer:
    """Nesterov SGD of the recipe: ``torch.optim.SGD`` on every parameter without a mask,
    ``MaskedSGD`` (momentum and weight decay on the k masked entries only) with one. lr is set per step."""
    import torch

    nesterov = cfg.nesterov and cfg.momentum > 0
    if mask is None:
        return torch.optim.SGD(model.parameters(), lr=0.0, momentum=cfg.momentum, nesterov=nesterov,
                               weight_decay=cfg.weight_decay)
    from ..optim import MaskedSGD

    return MaskedSGD(model.named_parameters(), mask, lr=0.0, momentum=cfg.momentum, nesterov=nesterov,
                     weight_decay=cfg.weight_decay)


# -------------------------------------------------------------------------------------- worker
class _Run:
    """The state of one run on one rank: model, generators, counters, checkpointer, current mask."""

    def __init__(self, worker: _Worker, spec: RunSpec):
        import torch

        self.spec, self.t_start = spec, time.perf_counter()
        self.model = build_model(worker.cfg, worker.shape, spec.seed).to(worker.device)
        self.numel = sum(p.numel() for p in self.model.parameters())
        self.gen = torch.Generator().manual_seed(10_007 * spec.seed + worker.rank)  # this rank's augmentation
        self.gen_std = torch.Generator().manual_seed(10_007 * spec.seed + 5_003)  # standard training: same on all ranks
        self.run_dir = worker.artifacts / spec.name if worker.artifacts is not None else None
        self.mask = None
        self.stats: dict[str, Any] = {"rank": worker.rank, "buffer_bytes": 0, "exchanges": 0, "sync_checks": 0,
                                      "comm_seconds": 0.0, "fisher_seconds": 0.0, "mask_recomputes": 0, "local_steps": 0}
        self.result: dict[str, Any] = {**asdict(spec), "numel": self.numel}
        self.ckpt = None
        if spec.checkpoint_every_epochs and worker.rank == 0:
            from ..diff import SparseCheckpointer

            self.ckpt = SparseCheckpointer(self.run_dir / "checkpoints", base=self.model, overwrite=worker.cfg.overwrite)


class _Worker:
    """One rank: its shard, its device, and the training of each RunSpec."""

    def __init__(self, cfg: CifarConfig, data: dict[str, Any], rank: int, world: int, device: torch.device,
                 artifacts: Path | None):
        import torch

        import torch.distributed as dist

        self.cfg, self.rank, self.world, self.device, self.artifacts = cfg, rank, world, device, artifacts
        self.dist = dist
        mean, std = data["mean"].view(1, -1, 1, 1), data["std"].view(1, -1, 1, 1)

        def prep(x):
            return ((x.float() / data["scale"] - mean) / std).to(device)

        self.x_train, self.y_train = prep(data["x_train"]), data["y_train"].to(device)
        self.x_test, self.y_test = prep(data["x_test"]), data["y_test"].to(device)
        self.shape = (data["x_train"].shape[1], data["num_classes"])
        self.aug = cfg.augment()

    # ---- small pieces
    def _order(self, idx: torch.Tensor, seed: int, stream: int, epoch: int) -> list[torch.Tensor]:
        import numpy as np
        import torch

        rng = np.random.default_rng([seed, stream, epoch])
        order = idx[torch.from_numpy(rng.permutation(idx.numel()))]
        n = steps_per_epoch(idx.numel(), self.cfg.batch_size)
        return [order[i * self.cfg.batch_size: (i + 1) * self.cfg.batch_size] for i in range(n)]

    def _shard(self, seed: int) -> torch.Tensor:
        import numpy as np
        import torch

        perm = torch.from_numpy(np.random.default_rng([seed, 9973]).permutation(self.y_train.numel()))
        return perm[self.rank:: self.world]

    def _step(self, model, opt, idx, gen, lr: float) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        idx = idx.to(self.device)
        x = self.aug(self.x_train.index_select(0, idx), gen)
        loss = F.cross_entropy(model(x), self.y_train.index_select(0, idx))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    def _train_epochs(self, model, opt, idx, first: int, last: int, seed: int, stream: int, gen, after_epoch=None):
        """Single-process training (standard runs and the dense warm-up) on the examples ``idx``."""
        c = self.cfg
        spe = steps_per_epoch(idx.numel(), c.batch_size)
        for e in range(first, last):
            for i, b in enumerate(self._order(idx, seed, stream, e)):
                self._step(model, opt, b, gen, lr_at(e + i / spe, c.lr, c.lr_warmup_epochs, c.epochs))
            if after_epoch is not None:
                after_epoch(e + 1, opt)

    def evaluate(self, model) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        model.eval()
        correct, loss = 0, 0.0
        with torch.no_grad():
            for s in range(0, self.y_test.numel(), 1000):
                out = model(self.x_test[s: s + 1000])
                y = self.y_test[s: s + 1000]
                correct += int((out.argmax(1) == y).sum())
                loss += float(F.cross_entropy(out, y, reduction="sum"))
        model.train()
        n = self.y_test.numel()
        return {"accuracy": correct / n, "loss": loss / n, "test_examples": n}

    def _average_buffers(self, model) -> int:
        """Average the BatchNorm running statistics over the ranks (before evaluation, Fisher
        estimates and checkpoints; they are not part of the exchanges). Returns bytes sent."""
        import torch

        bufs = [b for b in model.buffers() if b.is_floating_point()]
        if self.world == 1 or not bufs:
            return 0
        flat = torch.cat([b.reshape(-1) for b in bufs])
        self.dist.all_reduce(flat)
        flat /= self.world
        at = 0
        for b in bufs:
            b.copy_(flat[at: at + b.numel()].view_as(b))
            at += b.numel()
        return flat.numel() * flat.element_size()

    def _make_mask(self, spec: RunSpec, model, shard: torch.Tensor, n_mask: int):
        """Rank 0's new mask (FISH: Fisher over num_samples of its shard, un-augmented; random:
        seeded); None on the other ranks. Returns (mask or None, Fisher seconds)."""
        import numpy as np
        import torch

        from ..fisher import fisher_mask
        from ..mask import FishMask

        if self.rank != 0:
            return None, 0.0
        force = HEAD if self.cfg.force_head else ()
        prov = {"run": spec.name, "mask_number": n_mask}
        if spec.method == "random":
            return FishMask.random(model, spec.density, seed=1_000 * spec.seed + n_mask, force=force, provenance=prov), 0.0
        rng = np.random.default_rng([spec.seed, 7, n_mask])
        idx = shard[torch.from_numpy(rng.permutation(shard.numel()))][: self.cfg.num_samples].to(self.device)
        batches = [(self.x_train[idx[s: s + 128]], self.y_train[idx[s: s + 128]]) for s in range(0, idx.numel(), 128)]
        t0 = time.perf_counter()
        mask = fisher_mask(model, batches, spec.density, idx.numel(), force=force, seed=spec.seed, progress=False)
        return replace(mask, provenance={**mask.provenance, **prov}), time.perf_counter() - t0

    # ---- one run
    def run(self, spec: RunSpec) -> dict[str, Any] | None:
        """Train one run on this rank; rank 0 returns its record (the others None)."""
        r = _Run(self, spec)
        if spec.method == "standard":
            self._standard(r)
        else:
            self._distributed(r)
        return self._finish(r)

    def _checkpoint(self, r: _Run, epoch: int, opt, average: bool) -> None:
        every = r.spec.checkpoint_every_epochs
        if every and epoch % every == 0:
            if average:  # rank 0 saves: give it everyone's BatchNorm statistics
                r.stats["buffer_bytes"] += self._average_buffers(r.model)
            if r.ckpt is not None:
                r.ckpt.save(r.model, opt, r.mask, epoch=epoch)

    def _standard(self, r: _Run) -> None:
        """Standard training on the whole training set. Every rank runs the same computation (same
        seeds, so nobody waits long in a collective); rank 0 reports."""
        import torch

        c = self.cfg
        idx = torch.arange(self.y_train.numel())
        opt = make_optimizer(self.cfg, r.model, None)
        self._train_epochs(r.model, opt, idx, 0, c.epochs, r.spec.seed, 1_000_000, r.gen_std,
                           lambda epoch, o: self._checkpoint(r, epoch, o, average=False))
        r.stats["local_steps"] = c.epochs * steps_per_epoch(idx.numel(), c.batch_size)
        r.result.update(k=r.numel, world_size=1)

    def _distributed(self, r: _Run) -> None:
        """Dense warm-up (standard training), then H local steps on this rank's shard between
        exchanges of the mask's k values (dense: all parameters); new masks every R exchanges or E
        epochs; an exchange before every checkpoint, new mask and the end."""
        import torch

        from ..distributed import SparseAverager

        c, spec, model, stats = self.cfg, r.spec, r.model, r.stats
        avg = SparseAverager(model, None, timeout=c.timeout)
        avg.sync_parameters(src=0)
        warm = c.dense_warmup_epochs
        if warm:  # the same on every rank; then rank 0's weights and statistics everywhere
            opt = make_optimizer(self.cfg, model, None)
            self._train_epochs(model, opt, torch.arange(self.y_train.numel()), 0, warm, spec.seed, 1_000_000, r.gen_std,
                               lambda epoch, o: self._checkpoint(r, epoch, o, average=False))
            avg.sync_parameters(src=0)
        shard = self._shard(spec.seed)
        spe = steps_per_epoch(shard.numel(), c.batch_size)
        total_steps = (c.epochs - warm) * spe
        masked = spec.method in ("fish", "random")

        def new_mask():
            stats["buffer_bytes"] += self._average_buffers(model)  # Fisher runs in eval mode
            mask, secs = self._make_mask(spec, model, shard, stats["mask_recomputes"])
            stats["fisher_seconds"] += secs
            r.mask = avg.set_mask(mask, broadcast_from=0)
            stats["mask_recomputes"] += 1
            return make_optimizer(self.cfg, model, r.mask)

        opt = new_mask() if masked else make_optimizer(self.cfg, model, None)
        if c.save_states and r.run_dir is not None:
            self._save_states(r.run_dir, model, r.mask, "start")
        since = 0

        def exchange():
            nonlocal since, opt
            t0 = time.perf_counter()
            avg.exchange() if masked else avg.dense_exchange()
            stats["comm_seconds"] += time.perf_counter() - t0
            stats["exchanges"] += 1
            since = 0
            if c.verify_sync:
                avg.assert_in_sync()
                stats["sync_checks"] += 1
            every = spec.mask_every_exchanges
            if masked and every and stats["exchanges"] % every == 0 and stats["local_steps"] < total_steps:
                opt = new_mask()

        for e in range(warm, c.epochs):
            for i, b in enumerate(self._order(shard, spec.seed, self.rank, e)):
                self._step(model, opt, b, r.gen, lr_at(e + i / spe, c.lr, c.lr_warmup_epochs, c.epochs))
                stats["local_steps"] += 1
                since += 1
                if since == spec.merge_interval:
                    exchange()
            end = e + 1
            ck = bool(spec.checkpoint_every_epochs) and end % spec.checkpoint_every_epochs == 0
            mk = masked and bool(spec.mask_every_epochs) and (end - warm) % spec.mask_every_epochs == 0 and end < c.epochs
            if since and (ck or mk or end == c.epochs):
                exchange()  # checkpoints, new masks and the end need the ranks in agreement
            self._checkpoint(r, end, opt, average=True)
            if mk:
                opt = new_mask()
        stats["buffer_bytes"] += self._average_buffers(model)
        a = avg.stats()
        stats.update({key: a[key] for key in ("k", "k_exchanged", "numel", "dense_exchanges", "bytes_per_exchange",
                                              "dense_bytes_per_exchange", "sparse_bytes_sent", "dense_bytes_sent",
                                              "mask_bytes_sent", "bytes_sent")}, sparse_exchanges=a["exchanges"])
        r.result.update(k=avg.k if masked else r.numel, world_size=self.world, steps_per_epoch=spe,
                        local_steps_total=total_steps, warmup_broadcast_bytes=4 * r.numel if warm and self.world > 1 else 0)

    def _finish(self, r: _Run) -> dict[str, Any] | None:
        """Gather every rank's counters; rank 0 evaluates and builds the run's record."""
        if self.cfg.save_states and r.run_dir is not None:
            self._save_states(r.run_dir, r.model, None, f"final_rank{self.rank}")
        r.stats["seconds"] = time.perf_counter() - r.t_start
        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, r.stats)
        if self.rank != 0:
            return None
        result = r.result
        result.update(self.evaluate(r.model))
        result["ranks"] = gathered
        result["seconds"] = max(s["seconds"] for s in gathered)
        if r.spec.method != "standard":
            result["bytes_per_worker"] = statistics.mean(s["bytes_sent"] + s["mask_bytes_sent"] for s in gathered)
            result["model_copies_per_worker"] = result["bytes_per_worker"] / (4 * r.numel)
            result["exchanges"] = gathered[0]["exchanges"]
        if r.mask is not None:
            result["mask_digest"] = r.mask.digest
            if r.run_dir is not None:
                r.run_dir.mkdir(parents=True, exist_ok=True)
                r.mask.save(r.run_dir / "mask.safetensors", overwrite=True)
        if r.ckpt is not None:
            sizes, entries = r.ckpt.sizes(), r.ckpt.checkpoints
            result["checkpoints"] = {
                "count": len(entries),
                "bytes_written": sizes["total_checkpoint_bytes"],
                "bytes_per_checkpoint": sizes["checkpoint_bytes"],
                "changed_entries": [e["changed"] for e in entries],
                "full_state_dict_bytes": sizes["dense_bytes"],
                # a dense checkpoint of the weights (state_dict) plus SGD's dense momentum buffer
                "full_bytes": len(entries) * (sizes["dense_bytes"] + (4 * r.numel if self.cfg.momentum else 0)),
                "base_bytes": sizes["base_bytes"],
                "composition": _checkpoint_composition(r.ckpt.directory, [e["file"] for e in entries]),
            }
        return result

    def _save_states(self, run_dir: Path, model, mask, name: str) -> None:
        import torch

        d = run_dir / "states"
        d.mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().cpu().clone() for n, p in model.named_parameters()}, d / f"{name}.pt")
        if mask is not None and self.rank == 0:
            mask.save(d / f"{name}_mask.safetensors", overwrite=True)


def _checkpoint_composition(directory: str, files: list[str]) -> dict[str, int]:
    """Bytes of a chain's checkpoint files by content (from the safetensors headers, no data read):
    weights (changed values + their indices + tensors stored whole), mask, optimizer, rng, and
    the rest (header and metadata)."""
    import torch

    from safetensors import safe_open

    out = {"weights": 0, "mask": 0, "optimizer": 0, "rng": 0, "other": 0}
    part = {"indices": "weights", "values": "weights", "dense": "weights", "mask": "mask", "optim": "optimizer",
            "rng": "rng"}
    for f in files:
        path = os.path.join(directory, f)
        tensors = 0
        with safe_open(path, "pt") as st:
            for key in st.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                sl = st.get_slice(key)
                n = math.prod(sl.get_shape()) * torch.empty((), dtype=getattr(torch, _ST_DTYPES[sl.get_dtype()])).element_size()
                out[part.get(key.split("/")[0], "other")] += n
                tensors += n
        out["other"] += os.path.getsize(path) - tensors
    return out


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
              "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


# --------------------------------------------------------------------------- processes and launch
def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def _device_for(cfg: CifarConfig, local_rank: int) -> torch.device:
    import torch

    name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return dev


def _set_threads(cfg: CifarConfig, world: int) -> None:
    import torch

    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))


def _work(cfg: CifarConfig, data, rank: int, world: int, device, specs, artifacts, log) -> list[dict] | None:
    worker = _Worker(cfg, data, rank, world, device, artifacts)
    results = []
    for i, spec in enumerate(specs):
        res = worker.run(spec)
        if rank == 0:
            results.append(res)
            if log:
                extra = "" if spec.method == "standard" else (f", {res['exchanges']} exchanges, "
                                                             f"{fmt_bytes(res['bytes_per_worker'])}/worker")
                print(f"[{i + 1}/{len(specs)}] {spec.name}: accuracy {100 * res['accuracy']:.1f}%{extra}, "
                      f"{res['seconds']:.1f} s", file=sys.stderr, flush=True)
    return results if rank == 0 else None


def _spawn_entry(rank: int, world: int, tmp: str, cfg: CifarConfig, specs: list[RunSpec], artifacts: str | None) -> None:
    """Entry point of a spawned worker: gloo (CPU) / NCCL (CUDA) through a FileStore in ``tmp``."""
    import torch

    import torch.distributed as dist

    try:
        _set_threads(cfg, world)
        device = _device_for(cfg, rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.timeout))
        data = torch.load(Path(tmp) / "data.pt", mmap=True, weights_only=True)
        results = _work(cfg, data, rank, world, device, specs, Path(artifacts) if artifacts else None,
                        log=cfg.progress and rank == 0)
        if rank == 0:
            write_json_atomic(Path(tmp) / "results.json", results)
        _close_group()
    except BaseException as e:
        write_json_atomic(Path(tmp) / f"error_rank{rank}.json",
                          {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()})
        raise


def _close_group() -> None:
    """Tear the process group down on every rank together. Objects of finished runs (averagers,
    which hold the gloo backend) are collected first: one left to die at interpreter exit made
    about 1 spawned worker in 10 abort ("terminate called without an active exception")."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


_MAPPED = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError, "FileNotFoundError": FileNotFoundError,
           "FileExistsError": FileExistsError}


def execute(cfg: CifarConfig, data: dict[str, Any], specs: list[RunSpec], artifacts: Path | None) -> list[dict] | None:
    """Run the specs on M workers: the current torchrun group (every rank calls this; rank 0 gets
    the results, the others None), or ``cfg.workers`` processes spawned here (default 2; 1 runs in
    this process). A worker's error is raised here with its type (ValueError, ...) and message."""
    import torch

    import torch.distributed as dist

    if _under_torchrun():
        from ..distributed import init_from_env

        device = _device_for(cfg, int(os.environ["LOCAL_RANK"]))
        ours = not dist.is_initialized()
        info = init_from_env("nccl" if device.type == "cuda" else "gloo", timeout=cfg.timeout)
        if cfg.workers is not None and cfg.workers != info.world_size:
            raise ValueError(f"--workers {cfg.workers} under torchrun, which started {info.world_size} processes")
        results = _work(cfg, data, info.rank, info.world_size, device, specs, artifacts, log=cfg.progress and info.rank == 0)
        if ours:
            _close_group()
        return results
    world = 1 if all(s.method == "standard" for s in specs) else (cfg.workers or 2)
    with tempfile.TemporaryDirectory(prefix="fishkern-cifar-") as tmp:
        torch.save(data, Path(tmp) / "data.pt")
        args = (world, tmp, cfg, specs, str(artifacts) if artifacts else None)
        if world == 1:
            if dist.is_initialized():
                raise RuntimeError("a torch.distributed process group already exists in this process")
            threads = torch.get_num_threads()
            try:
                _spawn_entry(0, *args)
            finally:
                torch.set_num_threads(threads)
                if dist.is_initialized():
                    dist.destroy_process_group()
        else:
            import torch.multiprocessing as mp

            try:
                mp.start_processes(_spawn_entry, args=args, nprocs=world, join=True, start_method="spawn")
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                errors = sorted(Path(tmp).glob("error_rank*.json"))
                if not errors:
                    raise RuntimeError(f"a worker failed: {e}") from None
                info = json.loads(errors[0].read_text())
                raise _MAPPED.get(info["type"], RuntimeError)(
                    f"worker {errors[0].stem.split('rank')[-1]}: {info['message']}") from None
        return json.loads((Path(tmp) / "results.json").read_text())


# ---------------------------------------------------------------------------------------- runs
def _environment(device: str) -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "git": git_revision(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None}


def _check_out(out: Path, names: list[str], overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    existing = [str(out / n) for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite or another --out-dir")


def _check_chains(out: Path, specs: list[RunSpec], overwrite: bool) -> None:
    """Before any training: a run that writes checkpoints must not append to the chain an earlier
    (e.g. interrupted) run left in its directory."""
    if overwrite:
        return
    for s in specs:
        manifest = out / s.name / "checkpoints" / "manifest.json"
        if s.checkpoint_every_epochs and manifest.exists():
            raise FileExistsError(f"{manifest.parent} holds the checkpoint chain of an earlier run of {s.name}; "
                                  "pass --overwrite to start new chains, or another --out-dir")


def run_cifar(cfg: CifarConfig) -> dict[str, Any] | None:
    """Train the runs of ``cfg`` (``plan_runs``) and write results.json and report.md (and
    accuracy_vs_bytes.png when several distributed runs are compared) to ``cfg.out_dir``. Under
    torchrun only rank 0 writes and returns the report."""
    cfg.check()
    check_device(cfg.device)  # before the data are loaded
    out = Path(cfg.out_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0 if _under_torchrun() else True
    if rank0:
        _check_out(out, ["results.json", "report.md"], cfg.overwrite)
        _check_chains(out, plan_runs(cfg), cfg.overwrite)
    data = load_data(cfg)
    check_budget(cfg, build_model(cfg, data, 0))
    specs = plan_runs(cfg)
    t0 = time.perf_counter()
    with MachineLoad() as load:  # the workers are children: their CPU counts as ours (not under torchrun)
        results = execute(cfg, data, specs, out)
    if results is None:
        return None
    report = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "data": {"name": data["name"], "source": data["source"], "train": int(data["y_train"].numel()),
                 "test": int(data["y_test"].numel()), "shape": list(data["x_train"].shape[1:])},
        "model": build_model(cfg, data, 0).describe(),
        "runs": results,
        "seconds": time.perf_counter() - t0,
        # under torchrun the other ranks are not this process's children: not measurable here
        "machine_load": None if _under_torchrun() else load.result,
        "environment": _environment(str(_device_for(cfg, 0))),
    }
    write_json_atomic(out / "results.json", report)
    write_text_atomic(out / "report.md", render_runs(report))
    if sum(r["method"] != "standard" for r in results) > 1:
        plot_accuracy_vs_bytes(results, out / "accuracy_vs_bytes.png", title=f"{data['name']}: accuracy vs communication")
    return report


def render_runs(report) -> str:
    lines = [f"# fishkern cifar: {report['data']['name']} ({report['model']})", "",
             "| run | trained k | workers | exchanges | bytes sent / worker | model copies | test accuracy | time |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_run_row(r) for r in report["runs"]]
    warning = load_warning({"the runs": report.get("machine_load")}, what="the times")
    lines += ["", warning] if warning else []
    lines += ["", f"Total {report['seconds']:.0f} s; torch {report['environment']['torch']}, "
              f"device {report['environment']['device']}, git {report['environment']['git']}.", ""]
    return "\n".join(lines)


def _run_row(r) -> str:
    d = r["method"] != "standard"
    ck = r.get("checkpoints")
    cks = f"; checkpoints {fmt_bytes(ck['bytes_written'])} vs {fmt_bytes(ck['full_bytes'])} full" if ck else ""
    return (f"| {r['name']} | {r['k']:,} ({100 * r['k'] / r['numel']:.3g}%) | {r['world_size']} | "
            f"{r.get('exchanges', '') if d else ''} | {fmt_bytes(r['bytes_per_worker']) if d else ''} | "
            f"{format(r['model_copies_per_worker'], '.3g') if d else ''} | {100 * r['accuracy']:.2f}% | "
            f"{r['seconds']:.0f} s{cks} |")


# ------------------------------------------------------------------------------------- figures
_STYLE = {"dense": ("Dense updates", "tab:gray", "s"), "fish": ("FISH mask", "tab:blue", "o"),
          "random": ("Random mask", "tab:orange", "^")}


def _series(runs) -> dict[tuple, list[dict]]:
    """(method, density, H) -> the runs of every seed."""
    out: dict[tuple, list[dict]] = {}
    for r in runs:
        out.setdefault((r["method"], r.get("density"), r.get("merge_interval")), []).append(r)
    return out


def plot_accuracy_vs_bytes(runs, path, title: str) -> None:
    """The paper's Figure 3: test accuracy against bytes sent per worker (log scale), one line per
    method and density through the merge intervals (mean over seeds, bars: min..max); standard
    training as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines: dict[tuple, list] = {}
    for (m, d, h), rows in _series(runs).items():
        if m != "standard":
            lines.setdefault((m, d), []).append(rows)
    for (m, d), groups in sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1] or 1.0)):
        label, color, marker = _STYLE[m]
        pts = sorted((statistics.mean(r["bytes_per_worker"] for r in g), [100 * r["accuracy"] for r in g]) for g in groups)
        x = [p[0] for p in pts]
        y = [statistics.mean(p[1]) for p in pts]
        err = [[yy - min(p[1]) for yy, p in zip(y, pts)], [max(p[1]) - yy for yy, p in zip(y, pts)]]
        style = "-" if m != "fish" or d is None or d >= 0.05 else "--"
        ax.errorbar(x, y, yerr=err, fmt=marker + style, color=color, capsize=3,
                    label=label + ("" if d is None else f", {100 * d:g}%"),
                    alpha=1.0 if m != "fish" or d is None or d >= 0.05 else 0.7)
    std = [100 * r["accuracy"] for r in runs if r["method"] == "standard"]
    if std:
        draw_baseline(ax, "standard", statistics.mean(std), f"Standard training ({statistics.mean(std):.1f}%)")
    ax.set_xscale("log")
    bytes_log_axis(ax.xaxis)
    ax.set_xlabel("bytes sent per worker (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_checkpoints(rows, path, title: str) -> None:
    """Table 4 as two bar panels: test accuracy (mean, min..max) and bytes written for the chain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"standard": "black", "fish": "tab:blue", "random": "tab:orange"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 0.42 * len(rows) + 1.4), sharey=True)
    y = list(range(len(rows)))[::-1]
    c = [colors[r["method"]] for r in rows]
    acc = [100 * r["accuracy_mean"] for r in rows]
    err = [[a - 100 * r["accuracy_min"] for a, r in zip(acc, rows)], [100 * r["accuracy_max"] - a for a, r in zip(acc, rows)]]
    a1.barh(y, acc, xerr=err, color=c, alpha=0.8, capsize=3)
    a1.set_xlim(min(100 * r["accuracy_min"] for r in rows) - 2, 100)
    a1.set_yticks(y, [r["label"] for r in rows], fontsize=8)
    a1.set_xlabel("test accuracy (%)")
    a2.barh(y, [r["bytes_written_mean"] / 1e6 for r in rows], color=c, alpha=0.8)
    a2.axvline(rows[0]["full_bytes"] / 1e6, ls=":", color="black")
    a2.set_xlabel("MB written, all checkpoints (dotted: full)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------ miniature
MINIATURE_FILES = ("report.md", "results.json", "figure3_accuracy_vs_bytes.png", "table4_checkpoints.png")
NEVER = 10**9  # a merge interval no run reaches: exchanges happen at epoch ends only


@dataclass(frozen=True)
class MiniaturePlan:
    """What ``fishkern cifar --miniature`` runs (Figure 3 and Table 4 of the paper, in miniature)."""

    seeds: tuple[int, ...] = (0, 1)
    fig3_intervals: tuple[int, ...] = (4, 16, 64, 256)
    fig3_masked: tuple[tuple[str, float], ...] = (("fish", 0.02), ("fish", 0.1), ("random", 0.1))
    table4_densities: tuple[float, ...] = (0.02, 0.1)
    table4_mask_every: tuple[int, ...] = (1, 2, 4, 0)  # epochs; 0 = fixed
    epochs: int = 12
    train_samples: int | None = None  # None: all 1,437 (fewer: smoke tests)


def miniature_config(cfg: CifarConfig, plan: MiniaturePlan = MiniaturePlan()) -> CifarConfig:
    """The miniature's settings (the CIFAR recipe scaled to 8×8 digits on a 2-core CPU)."""
    return replace(
        cfg, dataset="digits", data_dir=None, epochs=plan.epochs, batch_size=32, lr=0.1, lr_warmup_epochs=2,
        dense_warmup_epochs=1, num_samples=256, workers=cfg.workers or 2, threads=cfg.threads or 1,
        device=cfg.device or "cpu", blocks=cfg.blocks or (1, 1, 1, 1), widths=cfg.widths or (8, 16, 32, 64),
        crop_padding=1 if cfg.crop_padding is None else cfg.crop_padding, flip=bool(cfg.flip),
        cutout=0 if cfg.cutout is None else cfg.cutout, mask_every_exchanges=0, mask_every_epochs=0,
        checkpoint_every_epochs=0, max_train_samples=plan.train_samples, max_test_samples=None,
        methods=("standard", "dense", "fish", "random"),
    )


def miniature_specs(plan: MiniaturePlan) -> list[RunSpec]:
    specs = []
    for s in plan.seeds:
        specs.append(RunSpec(f"standard_s{s}", "standard", s, checkpoint_every_epochs=1, group="both"))
        for h in plan.fig3_intervals:
            specs.append(RunSpec(f"dense_h{h}_s{s}", "dense", s, None, h, group="figure3"))
        for m, d in plan.fig3_masked:
            for h in plan.fig3_intervals:
                specs.append(RunSpec(f"{m}_d{d:g}_h{h}_s{s}", m, s, d, h, group="figure3"))
        for d in plan.table4_densities:
            for e in plan.table4_mask_every:
                specs.append(RunSpec(f"ckpt_fish_d{d:g}_m{e or 'fixed'}_s{s}", "fish", s, d, NEVER,
                                     mask_every_epochs=e, checkpoint_every_epochs=1, group="table4"))
            specs.append(RunSpec(f"ckpt_random_d{d:g}_m1_s{s}", "random", s, d, NEVER, mask_every_epochs=1,
                                 checkpoint_every_epochs=1, group="table4"))
    return specs


def _agg(rows, key) -> tuple[float, float, float]:
    v = [r[key] for r in rows]
    return statistics.mean(v), min(v), max(v)


def summarize_miniature(cfg: CifarConfig, plan: MiniaturePlan, data, results, seconds) -> dict[str, Any]:
    fig3 = []
    for (m, d, h), rows in sorted(_series([r for r in results if r["group"] in ("figure3", "both")]).items(),
                                  key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1] or 0, kv[0][2] or 0)):
        acc = _agg(rows, "accuracy")
        row = {"method": m, "density": d, "merge_interval": h, "k": rows[0]["k"], "numel": rows[0]["numel"],
               "seeds": [r["seed"] for r in rows], "accuracy_mean": acc[0], "accuracy_min": acc[1], "accuracy_max": acc[2]}
        if m != "standard":
            row.update(exchanges=rows[0]["exchanges"], bytes_per_worker=statistics.mean(r["bytes_per_worker"] for r in rows),
                       model_copies_per_worker=statistics.mean(r["model_copies_per_worker"] for r in rows),
                       bytes_per_exchange=rows[0]["ranks"][0]["bytes_per_exchange"] if m != "dense"
                       else rows[0]["ranks"][0]["dense_bytes_per_exchange"])
        fig3.append(row)
    table4 = []
    t4 = [r for r in results if r["group"] in ("table4", "both")]
    keys = sorted({(r["method"], r.get("density"), r["mask_every_epochs"]) for r in t4},
                  key=lambda k: (k[1] or 0, ["standard", "random", "fish"].index(k[0]), k[2] or 99))
    for m, d, e in keys:
        rows = [r for r in t4 if (r["method"], r.get("density"), r["mask_every_epochs"]) == (m, d, e)]
        acc = _agg(rows, "accuracy")
        ck = rows[0]["checkpoints"]
        written = statistics.mean(r["checkpoints"]["bytes_written"] for r in rows)
        weights = statistics.mean(r["checkpoints"]["composition"]["weights"] for r in rows)
        label = "standard (dense)" if m == "standard" else \
            f"{'FISH' if m == 'fish' else 'random'} {100 * d:g}%, " + (f"mask every {e} ep." if e else "fixed mask")
        table4.append({"method": m, "density": d, "mask_every_epochs": e, "label": label, "seeds": [r["seed"] for r in rows],
                       "accuracy_mean": acc[0], "accuracy_min": acc[1], "accuracy_max": acc[2],
                       "checkpoints": ck["count"], "bytes_written_mean": written, "full_bytes": ck["full_bytes"],
                       "full_state_dict_bytes": ck["full_state_dict_bytes"], "weights_bytes_mean": weights,
                       "weights_ratio": weights / (ck["count"] * ck["full_state_dict_bytes"]),
                       "composition_seed0": ck["composition"],
                       "mask_recomputes": rows[0]["ranks"][0]["mask_recomputes"],
                       "bytes_per_checkpoint_seed0": ck["bytes_per_checkpoint"],
                       "changed_entries_seed0": ck["changed_entries"]})
    return {
        "what": "fishkern cifar --miniature: the paper's Figure 3 (distributed) and Table 4 (checkpoints) on 8x8 digits",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "plan": asdict(plan),
        "data": {"name": data["name"], "source": data["source"], "train": int(data["y_train"].numel()),
                 "test": int(data["y_test"].numel()), "shape": list(data["x_train"].shape[1:])},
        "model": build_model(cfg, data, 0).describe(),
        "figure3": fig3,
        "table4": table4,
        "runs": results,
        "seconds": seconds,
        "environment": _environment(cfg.device or "cpu"),
    }


def run_miniature(cfg: CifarConfig, plan: MiniaturePlan = MiniaturePlan()) -> dict[str, Any]:
    """The offline miniature (minutes on a 2-core CPU): 2 gloo workers, a small ResNet on
    scikit-learn's digits; writes report.md, results.json and two PNGs to ``cfg.out_dir``."""
    cfg = miniature_config(cfg, plan)
    cfg.check()
    check_device(cfg.device)
    out = Path(cfg.out_dir)
    _check_out(out, list(MINIATURE_FILES), cfg.overwrite)
    data = load_data(cfg)
    specs = miniature_specs(plan)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fishkern-miniature-") as tmp, MachineLoad() as load:
        results = execute(cfg, data, specs, Path(tmp))  # checkpoints are measured, then dropped
    report = summarize_miniature(cfg, plan, data, results, time.perf_counter() - t0)
    report["machine_load"] = load.result
    write_json_atomic(out / "results.json", report)
    plot_accuracy_vs_bytes([r for r in results if r["group"] in ("figure3", "both")],
                           out / "figure3_accuracy_vs_bytes.png",
                           title="Digits 8x8, small ResNet, 2 workers: accuracy vs communication")
    plot_checkpoints(report["table4"], out / "table4_checkpoints.png",
                     title="Digits 8x8: accuracy vs checkpoint bytes (1 checkpoint / epoch)")
    write_text_atomic(out / "report.md", render_miniature(report))
    return report


def _shares(workers: int) -> str:
    if workers == 1:
        return "on the whole training set"
    return f"each on its own {'half' if workers == 2 else f'1/{workers}'} of the training set"


def render_miniature(rep) -> str:
    c = rep["config"]
    numel = rep["figure3"][0]["numel"]
    lines = [
        "# FISH mask, distributed training and sparse checkpoints: the CIFAR-10 recipe in miniature",
        "",
        f"`fishkern cifar --miniature` — the paper's Figure 3 and Table 4 (ResNet-34 on CIFAR-10) scaled down to run "
        f"offline on a 2-core CPU in minutes: scikit-learn's 8×8 handwritten digits ({rep['data']['train']:,} train / "
        f"{rep['data']['test']:,} test images, a stratified split) and {rep['model']}.",
        "",
        f"Recipe (the paper's, scaled): {plural(c['epochs'], 'epoch')}, batch {c['batch_size']} per worker, Nesterov SGD momentum "
        f"{c['momentum']}, weight decay {c['weight_decay']:g} on the trained entries only (MaskedSGD), learning rate "
        f"piecewise linear 0 → {c['lr']:g} at epoch {c['lr_warmup_epochs']:g} → 0; augmentation: pad {c['crop_padding']} "
        f"(reflect) + random 8×8 crop, no flip (digits are not mirror-symmetric), no cutout; {plural(c['dense_warmup_epochs'], 'epoch')} "
        f"of dense standard training before the distributed phase; FISH masks from rank 0's empirical Fisher "
        f"over {c['num_samples']} of its training images, the `fc` head forced in (counted in k). "
        f"{plural(c['workers'], 'real gloo worker process', 'real gloo worker processes')} "
        f"({plural(c['threads'], 'thread')} each), {_shares(c['workers'])}; `SparseAverager` averages the k masked "
        f"values (FISH, random) or all {numel:,} parameters (dense) every H local steps and at the end; its counters "
        f"give the bytes. Seeds {', '.join(map(str, rep['plan']['seeds']))}: mean [min, max].",
        "",
        "## Figure 3 in miniature: accuracy against communication",
        "",
        "| method | trained k | H (local steps) | exchanges | bytes / exchange | bytes sent / worker | model copies | test accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["figure3"]:
        acc = f"{100 * r['accuracy_mean']:.1f} [{100 * r['accuracy_min']:.1f}, {100 * r['accuracy_max']:.1f}]"
        if r["method"] == "standard":
            lines.append(f"| standard (1 process, dense) | {r['k']:,} (100%) | – | – | – | – | – | {acc} |")
            continue
        name = {"dense": "dense updates", "fish": "FISH mask", "random": "random mask"}[r["method"]]
        lines.append(f"| {name} | {r['k']:,} ({100 * r['k'] / r['numel']:.3g}%) | {r['merge_interval']} | {r['exchanges']} | "
                     f"{fmt_bytes(r['bytes_per_exchange'])} | {fmt_bytes(r['bytes_per_worker'])} | "
                     f"{r['model_copies_per_worker']:.3g} | {acc} |")
    lines += [
        "",
        "![accuracy against bytes sent per worker](figure3_accuracy_vs_bytes.png)",
        "",
        "Bytes sent per worker: the payload each worker hands to the exchanges (`SparseAverager` counters: 4·k per "
        "exchange for a mask, 4·|θ| dense) plus rank 0's mask broadcast, averaged over the workers; \"model copies\" "
        "divides by 4·|θ|. Not counted (as in the paper): the broadcast of the warmed-up model to the workers, and the "
        "averaging of BatchNorm running statistics before evaluation.",
        "",
        "## Table 4 in miniature: sparse checkpoints every epoch",
        "",
        "Same recipe and workers; the workers exchange once per epoch and rank 0 writes a `SparseCheckpointer` checkpoint "
        "after every epoch (model, mask, MaskedSGD state and RNG states: resumable), holding the entries changed since "
        "the previous one. The mask is recomputed every 1, 2 or 4 epochs (FISH: Fisher on rank 0; random: a new draw) "
        "or fixed after the warm-up. \"Full\" is what the same number of dense checkpoints of the weights, BatchNorm "
        "statistics and SGD momentum would hold; the standard row is measured (its checkpoints store every tensor whole).",
        "",
        "| run | mask recomputed | test accuracy | checkpoints | bytes written | full checkpoints | written / full "
        "| weights written / full weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["table4"]:
        acc = f"{100 * r['accuracy_mean']:.1f} [{100 * r['accuracy_min']:.1f}, {100 * r['accuracy_max']:.1f}]"
        every = "–" if r["method"] == "standard" else (f"every {plural(r['mask_every_epochs'], 'epoch')} ({plural(r['mask_recomputes'], 'mask')})"
                                                     if r["mask_every_epochs"] else "fixed (1 mask)")
        lines.append(f"| {r['label'].split(',')[0]} | {every} | {acc} | {r['checkpoints']} | "
                     f"{fmt_bytes(r['bytes_written_mean'])} | {fmt_bytes(r['full_bytes'])} | "
                     f"{r['bytes_written_mean'] / r['full_bytes']:.2f} | {r['weights_ratio']:.2f} |")
    lines += [
        "",
        "![accuracy against checkpoint bytes](table4_checkpoints.png)",
        "",
        "\"Weights\" counts the model's part of the files (changed values, their int32 indices, and small tensors "
        "that changed almost everywhere — BatchNorm statistics — stored whole) against the raw `state_dict()` of a full "
        "checkpoint: the paper's measure (values + indices: 2·k·4 bytes against 4·|θ|). The rest of a file is the new "
        "mask's indices (when it changed), the optimizer state (MaskedSGD: 4·k bytes of momentum), the RNG states "
        "and metadata. Checkpoint 1 (the dense warm-up epoch) changes every weight, so every chain starts with one "
        "full-size link. Per-checkpoint bytes, changed entries and the composition are in results.json (`table4`).",
        "",
        *([w, ""] if (w := load_warning({"the runs": rep.get("machine_load")}, what="the times")) else []),
        f"Total {rep['seconds']:.0f} s on {rep['environment']['cpus']} CPU cores; torch {rep['environment']['torch']}, "
        f"git {rep['environment']['git']}. Reproduce: `fishkern cifar --miniature --out-dir DIR`.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ benchmark
def run_benchmark(cfg: CifarConfig) -> dict[str, Any]:
    """Time the training step (augmentation, forward, backward, optimizer step) of the configured
    model at ``cfg.batch_size`` for ``cfg.benchmark_steps`` steps after 5 warm-up steps: standard
    dense Nesterov SGD against MaskedSGD with a FISH (and/or random) mask at each density. Synthetic
    normal images (CIFAR-10 or digits shape; never zeros). CUDA: CUDA events per step, peak memory.
    Writes benchmark.json and benchmark.md to ``cfg.out_dir``."""
    import numpy as np
    import torch

    from ..fisher import fisher_mask
    from ..mask import FishMask

    check_device(cfg.device)
    out = Path(cfg.out_dir)
    _check_out(out, ["benchmark.json", "benchmark.md"], cfg.overwrite)
    device = _device_for(cfg, 0)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    channels, size = (3, 32) if cfg.dataset == "cifar10" else (1, 8)
    model = build_model(cfg, (channels, 10), 0).to(device)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    numel = sum(p.numel() for p in model.parameters())
    b = cfg.batch_size
    g = torch.Generator().manual_seed(0)
    pool = [(torch.randn(b, channels, size, size, generator=g).to(device), torch.randint(0, 10, (b,), generator=g).to(device))
            for _ in range(4)]
    aug = cfg.augment()
    gen = torch.Generator().manual_seed(1)
    cases = [("standard", None)] + [(m, d) for m in cfg.methods if m in ("fish", "random") for d in cfg.densities]
    cuda = device.type == "cuda"
    rows = []
    for method, density in cases:
        model.load_state_dict(init)
        mask, fisher_s = None, None
        if method == "fish":
            t0 = time.perf_counter()
            mask = fisher_mask(model, pool, density, min(cfg.num_samples, 4 * b), force=HEAD if cfg.force_head else (),
                               progress=False)
            fisher_s = time.perf_counter() - t0
        elif method == "random":
            mask = FishMask.random(model, density, seed=0, force=HEAD if cfg.force_head else ())
        opt = make_optimizer(cfg, model, mask)
        for grp in opt.param_groups:
            grp["lr"] = 0.01
        with MachineLoad() as load:
            step_t, opt_t, wall = _time_steps(model, opt, pool, lambda x: aug(x, gen), cfg.benchmark_steps, cuda)
        state = opt.state_bytes() if mask is not None else 4 * numel * (cfg.momentum > 0)
        rows.append({
            "method": method, "density": density, "k": mask.k if mask is not None else numel,
            "step_ms_median": float(np.median(step_t)), "step_ms_p20": float(np.percentile(step_t, 20)),
            "step_ms_p80": float(np.percentile(step_t, 80)), "optimizer_step_ms_median": float(np.median(opt_t)),
            "images_per_s": b * cfg.benchmark_steps / wall,
            "optimizer_state_bytes": int(state), "fisher_seconds": fisher_s,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "machine_load": load.result,
        })
    rep = {"what": "training-step timing, standard vs masked SGD", "model": model.describe(), "batch_size": b,
           "steps": cfg.benchmark_steps, "input": [channels, size, size], "rows": rows,
           "command": " ".join(sys.argv), "environment": _environment(str(device)),
           "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}}
    write_json_atomic(out / "benchmark.json", rep)
    write_text_atomic(out / "benchmark.md", render_benchmark(rep))
    return rep


def _time_steps(model, opt, pool, augment, steps: int, cuda: bool) -> tuple[list[float], list[float], float]:
    """5 untimed warm-up steps, then ``steps`` timed ones: (ms per step, ms per optimizer step,
    wall seconds of the timed steps). CUDA: events around each step and each ``opt.step()``."""
    import torch
    import torch.nn.functional as F

    events = []
    step_t, opt_t = [], []
    for i in range(5 + steps):
        timed = i >= 5
        if i == 5 and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if i == 5:
            t_all = time.perf_counter()
        x, y = pool[i % len(pool)]
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if timed and cuda else None
        if ev:
            ev[0].record()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(augment(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ev:
            ev[1].record()
        t1 = time.perf_counter()
        opt.step()
        if ev:
            ev[2].record()
            events.append(ev)
        elif timed:
            t2 = time.perf_counter()
            step_t.append(1e3 * (t2 - t0))
            opt_t.append(1e3 * (t2 - t1))
    if cuda:
        torch.cuda.synchronize()
        step_t = [a.elapsed_time(c) for a, _, c in events]
        opt_t = [b.elapsed_time(c) for _, b, c in events]
    return step_t, opt_t, time.perf_counter() - t_all


def render_benchmark(rep) -> str:
    env = rep["environment"]
    lines = [f"# Training step, {rep['model']}, batch {rep['batch_size']}, {rep['steps']} timed steps",
             "", f"Device {env['gpu'] or env['device']}, torch {env['torch']}, git {env['git']}.", "",
             "| method | trained k | step (median [p20, p80]) | optimizer step | images/s | optimizer state | peak memory | Fisher |",
             "|---|---|---|---|---|---|---|---|"]
    base = rep["rows"][0]["step_ms_median"]
    loads = {}
    for r in rep["rows"]:
        name = r["method"] + ("" if r["density"] is None else f" {100 * r['density']:g}%")
        loads[name] = r.get("machine_load")
        lines.append(f"| {name} | {r['k']:,} | {r['step_ms_median']:.2f} ms [{r['step_ms_p20']:.2f}, {r['step_ms_p80']:.2f}] "
                     f"({base / r['step_ms_median']:.2f}×) | {r['optimizer_step_ms_median']:.3f} ms | "
                     f"{r['images_per_s']:,.0f} | {fmt_bytes(r['optimizer_state_bytes'])} | "
                     f"{fmt_bytes(r['peak_memory_bytes'])} | "
                     f"{'' if r['fisher_seconds'] is None else format(r['fisher_seconds'], '.2f') + ' s'} |")
    # on a GPU too: the host runs augmentation, Python and the kernel launches
    warning = load_warning(loads, what="these step times")
    return "\n".join(lines + (["", warning] if warning else []) + [""])


# ------------------------------------------------------------------------------------------ CLI
def _non_negative_int(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def add_parser(sub, add_common) -> None:
    """The ``fishkern cifar`` subcommand (called by ``fishkern.cli.build_parser``)."""
    import argparse

    from ..cli import _fraction, _positive_float, _positive_int, add_out_dir

    d = CifarConfig()
    p = sub.add_parser(
        "cifar",
        help="the paper's ResNet-34 / CIFAR-10 distributed and checkpointing recipe (Figure 3, Table 4); --miniature: offline",
        description="Train a CIFAR ResNet (ResNet-34 by default) from scratch: standard (1 process, dense), dense "
        "distributed, FISH or random masks on M real torch.distributed workers (torchrun, or --workers M spawned here) "
        "exchanging k values every H local steps; optional mask recomputation and sparse per-epoch checkpoints. "
        "Defaults are the paper's (batch 512, Nesterov SGD 0.9, wd 5e-4, 5-epoch warm-ups, 100 epochs, N=256). "
        "--miniature runs the offline miniature on scikit-learn's digits (report.md, results.json, PNGs); "
        "--benchmark-steps N times standard vs FISH training steps (for a GPU: --device cuda). "
        "Needs: pip install 'fishkern[cifar]'. Under torchrun: "
        "torchrun --standalone --nproc-per-node G -m fishkern cifar ... (one process per GPU).",
    )
    p.add_argument("--miniature", action="store_true", help="the offline miniature of Figure 3 and Table 4 on 8x8 digits "
                   "(2 gloo workers, a few minutes on a CPU); uses its own recipe (only --out-dir, --seeds, --workers, "
                   "--threads, --overwrite, --no-progress apply)")
    p.add_argument("--benchmark-steps", type=_positive_int, default=0, metavar="N",
                   help="time N training steps of standard vs --methods masks at --density (no training run)")
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="default: %(default)s")
    p.add_argument("--data-dir", default=None, help="local CIFAR-10: a saved DatasetDict directory (train/test, columns "
                   "img/image + label) or an .npz file (x_train, y_train, x_test, y_test) (default: download uoft-cs/cifar10)")
    add_out_dir(p, d.out_dir)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(d.methods), help="default: fish")
    p.add_argument("--density", type=_fraction, nargs="+", default=list(d.densities),
                   help="mask densities as fractions (default: 0.1; the paper: 0.005 0.02 0.1)")
    p.add_argument("--merge-interval", type=_positive_int, nargs="+", default=list(d.merge_intervals), metavar="H",
                   help="local steps between exchanges (default: 100; the paper: 100 500 2500)")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="M",
                   help="spawn M local worker processes (default 2; under torchrun: its processes)")
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help="total epochs, warm-up included (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="per worker (default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--lr-warmup-epochs", type=float, default=d.lr_warmup_epochs, help="default: %(default)s")
    p.add_argument("--momentum", type=float, default=d.momentum, help="default: %(default)s")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=d.nesterov, help="default: on")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="on the trained entries (default: %(default)s)")
    p.add_argument("--dense-warmup-epochs", type=_non_negative_int, default=d.dense_warmup_epochs,
                   help="epochs of standard training before the distributed phase and the mask (default: %(default)s)")
    p.add_argument("--num-samples", type=_positive_int, default=d.num_samples, help="Fisher samples N (default: %(default)s)")
    p.add_argument("--mask-every-exchanges", type=_non_negative_int, default=0, metavar="R",
                   help="recompute the mask every R exchanges (default: 0 = fixed)")
    p.add_argument("--mask-every-epochs", type=_non_negative_int, default=0, metavar="E",
                   help="recompute the mask every E epochs (default: 0 = fixed)")
    p.add_argument("--checkpoint-every-epochs", type=_non_negative_int, default=0, metavar="E",
                   help="write a sparse checkpoint (SparseCheckpointer) every E epochs (default: 0 = none)")
    p.add_argument("--no-force-head", dest="force_head", action="store_false", help="do not force the fc head into the mask")
    p.add_argument("--blocks", type=_positive_int, nargs="+", default=None, help="blocks per stage (default: 3 4 6 3; digits 1 1 1 1)")
    p.add_argument("--widths", type=_positive_int, nargs="+", default=None,
                   help="channels per stage (default: 64 128 256 512; digits 8 16 32 64)")
    p.add_argument("--crop-padding", type=_non_negative_int, default=None, help="default: 4 (digits 1)")
    p.add_argument("--cutout", type=_non_negative_int, default=None, help="cutout square side (default: 8; digits 0)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="default: on (digits off)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 (miniature: 0 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1… (default: cuda when available); one this "
                   "machine lacks is refused at once")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--max-train-samples", type=_positive_int, default=None, help="use only the first N training images")
    p.add_argument("--max-test-samples", type=_positive_int, default=None, help="use only the first N test images")
    p.add_argument("--verify-sync", action="store_true", help="check that all workers hold identical parameters after every exchange")
    p.add_argument("--save-states", action="store_true", help="write each run's parameters at the start of the "
                   "distributed phase and every rank's at the end (OUT_DIR/RUN/states/)")
    p.add_argument("--timeout", type=_positive_float, default=d.timeout, help="seconds for any collective (default: %(default)s)")
    add_common(p)
    p.set_defaults(run=_run_cli)


def _run_cli(args) -> int:
    cfg = CifarConfig(
        out_dir=args.out_dir, dataset=args.dataset, data_dir=args.data_dir, methods=tuple(args.methods),
        densities=tuple(args.density), merge_intervals=tuple(args.merge_interval), workers=args.workers,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_warmup_epochs=args.lr_warmup_epochs,
        momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        dense_warmup_epochs=args.dense_warmup_epochs, num_samples=args.num_samples,
        mask_every_exchanges=args.mask_every_exchanges, mask_every_epochs=args.mask_every_epochs,
        checkpoint_every_epochs=args.checkpoint_every_epochs, force_head=args.force_head,
        blocks=tuple(args.blocks) if args.blocks else None, widths=tuple(args.widths) if args.widths else None,
        crop_padding=args.crop_padding, cutout=args.cutout, flip=args.flip, seeds=tuple(args.seeds or (0,)),
        device=args.device, threads=args.threads, max_train_samples=args.max_train_samples,
        max_test_samples=args.max_test_samples, verify_sync=args.verify_sync, save_states=args.save_states,
        timeout=args.timeout, benchmark_steps=args.benchmark_steps, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    try:
        (miniature_config(cfg) if args.miniature else cfg).check()
    except ValueError as e:
        print(f"fishkern cifar: error: {e}", file=sys.stderr)
        return 2
    if args.miniature:
        plan = MiniaturePlan(seeds=tuple(args.seeds)) if args.seeds else MiniaturePlan()
        rep = run_miniature(cfg, plan)
        print(render_miniature(rep))
        print(f"wrote {cfg.out_dir}/{', '.join(MINIATURE_FILES)} ({rep['seconds']:.0f} s)")
        return 0
    if args.benchmark_steps:
        rep = run_benchmark(cfg)
        print(render_benchmark(rep))
        print(f"wrote {cfg.out_dir}/benchmark.json, benchmark.md")
        return 0
    rep = run_cifar(cfg)
    if rep is not None:
        print(render_runs(rep))
        print(f"wrote {cfg.out_dir}/results.json, report.md")
    return 0
