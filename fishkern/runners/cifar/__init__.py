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

The package, in the order of the data path (each module imports only those above it):

- ``config``: `CifarConfig`, `RunSpec`, `plan_runs`, the learning-rate schedule `lr_at`, `steps_per_epoch`
- ``data``: CIFAR-10 / digits loading and validation (`load_data`, `load_cifar10`, `make_image_data`)
- ``build``: the model, the optimizer and the mask of a run (`build_model`, `make_optimizer`, `make_mask`)
- ``worker``: one rank's training, exchanges, masks and checkpoints (`Worker`)
- ``launch``: torchrun or spawned processes (`execute`)
- ``report``: output checks, the environment record, report.md tables and figures
- ``run``: `run_cifar`; ``miniature``: `run_miniature`; ``benchmark``: `run_benchmark`
- ``command``: the ``fishkern cifar`` subcommand (`add_parser`)

The names below are re-exported here (``from fishkern.runners import cifar; cifar.run_cifar(...)``).
To replace a function in a test, patch it in the module that calls it (e.g.
``fishkern.runners.cifar.run.load_data``): a name re-exported here is a second reference.
"""

from __future__ import annotations

from .benchmark import render_benchmark, run_benchmark
from .build import build_model, check_budget, make_mask, make_optimizer
from .command import add_parser
from .config import DATASETS, HEAD, HUB_NAME, METHODS, CifarConfig, RunSpec, lr_at, plan_runs, steps_per_epoch
from .data import load_cifar10, load_data, load_digits_data, make_image_data
from .launch import execute
from .miniature import (
    MINIATURE_FILES,
    NEVER,
    MiniaturePlan,
    miniature_config,
    miniature_specs,
    render_miniature,
    run_miniature,
    summarize_miniature,
)
from .report import plot_accuracy_vs_bytes, plot_checkpoints, render_runs
from .run import run_cifar

__all__ = [
    "DATASETS", "HEAD", "HUB_NAME", "METHODS", "MINIATURE_FILES", "NEVER", "CifarConfig", "MiniaturePlan", "RunSpec",
    "add_parser", "build_model", "check_budget", "execute", "load_cifar10", "load_data", "load_digits_data", "lr_at",
    "make_image_data", "make_mask", "make_optimizer", "miniature_config", "miniature_specs", "plan_runs",
    "plot_accuracy_vs_bytes", "plot_checkpoints", "render_benchmark", "render_miniature", "render_runs", "run_benchmark",
    "run_cifar", "run_miniature", "steps_per_epoch", "summarize_miniature",
]
