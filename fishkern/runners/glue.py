"""`fishkern glue`: the paper's GLUE recipe (Table 1 / Figure 2).

Defaults are the paper's: bert-large-cased-whole-word-masking, sequence 128, 7 epochs, lr 5e-5,
batch 16 (8 for RTE), density 0.5%, N = 1024 Fisher samples, weight decay 0, linear decay.
Data: `datasets.load_dataset("nyu-mll/glue", task)` with a network, or a local directory
(a saved DatasetDict, or CSV/TSV/JSON(L) files with the GLUE columns). Model: a hub name or a local
directory. One run per (method, density, N); each writes its mask, task file and result, and the
task's results.json collects them (plus a plot when density or N is swept).
"""
from __future__ import annotations

import itertools
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..finetune import METHODS, FinetuneConfig, finetune
from ._report import fmt_bytes, git_revision, save_figure, write_json_atomic

PAPER_MODEL = "bert-large-cased-whole-word-masking"


@dataclass
class GlueConfig:
    task: str
    model: str = PAPER_MODEL
    data_dir: str | None = None
    out_dir: str = "fishkern-glue"
    methods: tuple[str, ...] = ("fish",)
    densities: tuple[float, ...] = (0.005,)
    num_samples: tuple[int, ...] = (1024,)
    max_length: int = 128
    epochs: int = 7
    lr: float = 5e-5
    batch_size: int | None = None  # 16, or 8 for RTE
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    fisher_kind: str = "empirical"
    seed: int = 0
    device: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
        for d in self.densities:
            if not 0.0 < d <= 1.0:
                raise ValueError(f"density must be a fraction in (0, 1] (0.005 = 0.5%), got {d}")
        for n in self.num_samples:
            if n < 1:
                raise ValueError(f"the number of Fisher samples must be >= 1, got {n}")
        if self.epochs < 1 or self.lr <= 0 or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError("epochs and batch size must be >= 1 and lr > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")


def _runs(cfg: GlueConfig):
    """(method, density, N) for every run; density/N only vary where they matter."""
    for m in cfg.methods:
        if m == "fish":
            yield from ((m, d, n) for d, n in itertools.product(cfg.densities, cfg.num_samples))
        elif m == "random":
            yield from ((m, d, None) for d in cfg.densities)
        else:
            yield (m, None, None)


def _run_name(method, density, n) -> str:
    name = method
    if density is not None:
        name += f"_d{density:g}"
    if n is not None:
        name += f"_n{n}"
    return name


@torch.no_grad()
def evaluate_glue(model, loaders: dict[str, Any], task, device) -> dict[str, float]:
    from ..metrics import glue_metrics

    model.eval()
    out: dict[str, float] = {}
    for split, loader in loaders.items():
        preds, labels = [], []
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            y = batch.pop("labels")
            logits = model(**batch).logits
            preds.append((logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).float().cpu())
            labels.append(y.float().cpu())
        metric_task = task.name if split == "validation" else f"{task.name}_{split.split('_')[-1]}"
        metrics = glue_metrics(metric_task if task.name == "mnli" else task.name,
                               torch.cat(preds).numpy(), torch.cat(labels).numpy())
        prefix = "" if len(loaders) == 1 else split.replace("validation_", "") + "_"
        out.update({prefix + k: float(v) for k, v in metrics.items()})
    return out


def _launched_ranks() -> tuple[int, int, bool]:
    """(rank, world size, whether we initialised the group) — under torchrun (WORLD_SIZE > 1) the
    default process group is initialised here (gloo on CPU, NCCL on CUDA) unless it already is."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0, 1, False
    created = not dist.is_initialized()
    if created:
        from ..distributed.launch import init_from_env

        init_from_env()
    return dist.get_rank(), dist.get_world_size(), created


def run_glue(cfg: GlueConfig) -> dict[str, Any]:
    """All runs of the config. Under ``torchrun --nproc-per-node W -m fishkern glue ...`` every
    rank trains on its share of each global batch (see fishkern.finetune); rank 0 writes the files."""
    cfg.check()
    rank, world, created = _launched_ranks()
    try:
        return _run_glue(cfg, rank, world)
    finally:
        if created:
            from ..distributed.launch import shutdown

            shutdown()


def _run_glue(cfg: GlueConfig, rank: int, world: int) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..data import GlueCollator, glue_task, load_glue, tokenize_glue
    from ..integrations.hf import head_names, save_task_file

    hf_logging.set_verbosity_error()
    task = glue_task(cfg.task)
    out = Path(cfg.out_dir) / task.name
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "results.json"
    if not cfg.overwrite:  # refuse before any work, not after the first run has trained
        for p in [summary_path] + [out / _run_name(*r) / f for r in _runs(cfg)
                                   for f in ("mask.safetensors", "task.safetensors", "result.json")]:
            if p.exists():
                raise FileExistsError(f"{p} exists; pass --overwrite or another --out-dir")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1 and device.type == "cuda" and device.index is None:
        import os

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    batch_size = cfg.batch_size or (8 if task.name == "rte" else 16)

    raw = load_glue(task.name, cfg.data_dir)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    enc = tokenize_glue(raw, tok, task.name, cfg.max_length)
    train_ds = enc[task.train_split]
    if cfg.max_train_samples:
        train_ds = train_ds.select(range(min(cfg.max_train_samples, len(train_ds))))
    val = {s: enc[s] for s in task.validation_splits if s in enc}
    if not val:
        raise ValueError(f"the data has no validation split for {task.name} (expected {task.validation_splits})")
    if cfg.max_eval_samples:
        val = {s: d.select(range(min(cfg.max_eval_samples, len(d)))) for s, d in val.items()}
    collate = GlueCollator(tok.pad_token_id or 0, regression=task.is_regression)

    from torch.utils.data import DataLoader

    def train_loader(seed):
        g = torch.Generator().manual_seed(seed)
        return DataLoader(train_ds.with_format("python"), batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate)

    val_loaders = {s: DataLoader(d.with_format("python"), batch_size=64, collate_fn=collate) for s, d in val.items()}

    results = []
    runs = list(_runs(cfg))
    for method, density, n in runs:
        name = _run_name(method, density, n)
        run_dir = out / name
        run_dir.mkdir(exist_ok=True)
        torch.manual_seed(cfg.seed)  # the new head's initialisation
        model = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=task.num_labels).to(device)
        base = {k: v.detach().clone() for k, v in model.named_parameters()}
        fc = FinetuneConfig(
            method=method, density=density or 0.005, num_samples=n or 1024, fisher_kind=cfg.fisher_kind,
            lr=cfg.lr, epochs=cfg.epochs, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
            head=tuple(_head_modules(head_names(model))), seed=cfg.seed,
        )
        t0 = time.perf_counter()
        res = finetune(model, train_loader(cfg.seed), lambda m: evaluate_glue(m, val_loaders, task, device), fc,
                       fisher_data=train_loader(cfg.seed + 1), progress=cfg.progress, desc=f"{task.name} {name}")
        row = res.summary()
        row.update(run=name, task=task.name, density_requested=density, num_samples_requested=n,
                   seconds=time.perf_counter() - t0)
        row["world_size"] = world
        if res.mask is not None and rank == 0:
            res.mask.save(run_dir / "mask.safetensors", overwrite=cfg.overwrite)
            row["task_file_bytes"] = save_task_file(model, base, res.mask, run_dir / "task.safetensors",
                                                    overwrite=cfg.overwrite, extra={"task": task.name, "run": name})
        if rank == 0:
            write_json_atomic(run_dir / "result.json", row)
        results.append(row)
        del model, base
    report = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "task": task.name,
        "batch_size": batch_size,
        "device": str(device),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "git": git_revision(),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "runs": results,
    }
    report["world_size"] = world
    if rank != 0:
        return report
    write_json_atomic(summary_path, report)
    if len(cfg.densities) > 1 or len(cfg.num_samples) > 1:
        plot_glue(report, out / "sweep.png")
    return report


def _head_modules(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[0] if "." in n else n for n in names})


def plot_glue(report, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..metrics import main_metric

    key = main_metric(report["task"])
    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    fish = [r for r in runs if r["method"] == "fish"]
    sweep_density = len({r["density_requested"] for r in fish}) > 1
    if sweep_density:
        for method in ("fish", "random"):
            rows = sorted((r for r in runs if r["method"] == method), key=lambda r: r["density_requested"])
            if rows:
                ax.plot([100 * r["density_requested"] for r in rows], [r["metrics"].get(key) for r in rows], "o-", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("density (% of parameters, log scale)")
    else:
        rows = sorted(fish, key=lambda r: r["num_samples_requested"])
        ax.plot([r["num_samples_requested"] for r in rows], [r["metrics"].get(key) for r in rows], "o-", label="fish")
        ax.set_xscale("log")
        ax.set_xlabel("Fisher samples N (log scale)")
    for r in runs:
        if r["method"] in ("dense", "bitfit"):
            ax.axhline(r["metrics"].get(key), ls="--", color="gray")
            ax.text(ax.get_xlim()[0], r["metrics"].get(key), f" {r['method']}", fontsize=8, va="bottom", color="gray")
    ax.set_ylabel(f"{report['task']} {key}")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def render_glue(report) -> str:
    lines = [f"GLUE {report['task']} ({report['device']}, batch {report['batch_size']})", ""]
    lines.append(f"{'run':<22} {'trained':>12} {'metrics':<48} {'opt. state':>10} {'step':>9} {'Fisher':>8}")
    for r in report["runs"]:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items() if k not in ("epoch", "train_loss"))
        fisher = f"{r['fisher_seconds']:.1f}s" if r.get("fisher_seconds") else ""
        lines.append(f"{r['run']:<22} {r['trainable']:>12,} {metrics:<48} {fmt_bytes(r['optimizer_state_bytes']):>10} "
                     f"{r['step_ms']:>7.1f}ms {fisher:>8}")
    return "\n".join(lines)
