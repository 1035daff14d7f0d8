"""`fishkern glue`: the paper's GLUE recipe (Table 1 / Figure 2).

Defaults are the paper's: bert-large-cased-whole-word-masking, sequence 128, 7 epochs, lr 5e-5,
batch 16 (8 for RTE), density 0.5%, N = 1024 Fisher samples, weight decay 0, linear decay.
Data: `datasets.load_dataset("nyu-mll/glue", task)` with a network, or a local directory
(a saved DatasetDict, or CSV/TSV/JSON(L) files with the Hugging Face or the original GLUE columns).
Model: a hub name or a local directory. One run per (method, density, N); each writes its mask,
task file and result, and the task's results.json collects them (plus a plot when density or N
is swept). The Fisher pass runs once per N: every density's FISH mask is selected from the same
scores (the model is reloaded with the same seed for every run, so the scores would be the same).

torch, transformers and the training loop are imported when a run starts, not with this module.
"""
from __future__ import annotations

import itertools
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import PAPER_MODEL
from ..reporting import (MachineLoad, draw_baseline, fmt_bytes, git_revision, load_warning, percent_log_axis, plural,
                      save_figure, write_json_atomic)

__all__ = ["PAPER_MODEL", "GlueConfig", "chance_level", "check_model_path", "fish_masks", "glue_figure", "plot_glue",
           "render_glue", "run_glue"]
METHODS = ("dense", "fish", "random", "bitfit")  # fishkern.finetune.METHODS (checked equal in the tests)
NEAR_CHANCE = 0.01  # a run whose headline metric is within this of the chance level is flagged


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


# ------------------------------------------------------------------------------ inputs and outputs
def _looks_like_path(value: str) -> bool:
    """A --model value meant as a local directory rather than a hub id. Hub ids are ``name`` or
    ``namespace/name`` (one slash), so one '/' alone is not taken as a path; a leading '.', '/' or
    '~', a second '/', a trailing '/' or the platform's own separator (Windows '\\') are."""
    if value.startswith((".", "/", "~")) or value.endswith("/") or value.count("/") > 1:
        return True
    return os.sep != "/" and os.sep in value or bool(os.altsep and os.altsep != "/" and os.altsep in value)


def check_model_path(model: str) -> None:
    """A --model that looks like a local path must be a directory: say so, instead of Hugging Face's
    "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    path = Path(model).expanduser()
    if path.is_dir() or not (_looks_like_path(model) or path.exists()):
        return
    if path.exists():
        raise NotADirectoryError(f"--model {model}: {path} is a file, not a model directory")
    raise FileNotFoundError(f"no model directory at {path}")


def _check_out_dir(out: Path) -> None:
    """Refuse an output directory that cannot be made (a file in the way, no write permission)
    before any work, since the directories are only created when the first file is written."""
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(f"cannot create the output directory {out}: {p} is a file")
    if not os.access(p, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create the output directory {out}: {p} is not writable")


class _OutputDirs:
    """Creates directories when the first file goes into them and, if the run fails, removes the
    ones it created that are still empty — never a directory that existed before, never a file."""

    def __init__(self) -> None:
        self.created: list[Path] = []

    def ensure(self, d: Path) -> Path:
        missing = []
        p = d
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        d.mkdir(parents=True, exist_ok=True)
        self.created.extend(reversed(missing))
        return d

    def remove_empty(self) -> None:
        for d in reversed(self.created):  # deepest first
            try:
                d.rmdir()  # fails (and is left) unless empty
            except OSError:
                pass
        self.created.clear()


# ------------------------------------------------------------------------------ evaluation
def _split_metrics(task, split: str, preds, labels, num_splits: int) -> dict[str, float]:
    """glue_metrics of one validation split, prefixed (``matched_``…) when the task has several."""
    from ..metrics import glue_metrics

    metric_task = task.name if split == "validation" else f"{task.name}_{split.split('_')[-1]}"
    metrics = glue_metrics(metric_task if task.name == "mnli" else task.name, preds, labels)
    prefix = "" if num_splits == 1 else split.replace("validation_", "") + "_"
    return {prefix + k: float(v) for k, v in metrics.items()}


def evaluate_glue(model, loaders: dict[str, Any], task, device) -> dict[str, float]:
    import torch

    model.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        for split, loader in loaders.items():
            preds, labels = [], []
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                y = batch.pop("labels")
                logits = model(**batch).logits
                preds.append((logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).float().cpu())
                labels.append(y.float().cpu())
            out.update(_split_metrics(task, split, torch.cat(preds).numpy(), torch.cat(labels).numpy(), len(loaders)))
    return out


def headline_key(task_name: str, metric_keys) -> str:
    """The key of the task's main metric in a run's metrics (MNLI: the matched split's)."""
    from ..metrics import main_metric

    key = main_metric(task_name)
    if key not in metric_keys and f"matched_{key}" in metric_keys:
        return f"matched_{key}"
    return key


def chance_level(task, train_labels, val_labels: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of always predicting the training set's most frequent class (None for the
    regression task): what a run that learned nothing beyond the class balance scores."""
    import numpy as np

    from ..metrics import majority_class

    if task.is_regression:
        return None
    majority, share = majority_class(np.asarray(train_labels, dtype=np.int64))
    metrics: dict[str, float] = {}
    for split, labels in val_labels.items():
        labels = np.asarray(labels, dtype=np.int64)
        metrics.update(_split_metrics(task, split, np.full(labels.shape, majority), labels, len(val_labels)))
    return {"class_id": majority, "class": task.label_names[majority], "train_fraction": share, "metrics": metrics}


# ------------------------------------------------------------------------------ the runs
def _launched_ranks() -> tuple[int, int, bool]:
    """(rank, world size, whether we initialised the group) — under torchrun (WORLD_SIZE > 1) the
    default process group is initialised here (gloo on CPU, NCCL on CUDA) unless it already is."""
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
    from . import check_device

    check_device(cfg.device)  # the CLI checks too; this is for callers of the Python API
    check_model_path(cfg.model)
    rank, world, created = _launched_ranks()
    try:
        return _run_glue(cfg, rank, world)
    finally:
        if created:
            from ..distributed.launch import shutdown

            shutdown()


def fish_masks(model, fisher_data, num_samples: int, densities, *, head, kind: str = "empirical", seed: int = 0,
               progress: bool = True, rank: int = 0, world: int = 1):
    """One Fisher pass over ``num_samples`` samples, then the FISH mask at every density from those
    scores: ``({density: mask}, info)`` with ``info.seconds`` (the pass and the selections) and
    ``info.num_samples``. Each mask equals ``fishkern.finetune.select_mask(model, "fish", density,
    ...)`` (one process) or ``fisher_mask_distributed`` (W ranks, the pass split across them:
    ``fisher_data`` is the global batch stream, the same on every rank)."""
    from types import SimpleNamespace

    from ..fisher import estimate_fisher
    from ..fisher.mask import fisher_provenance, model_scores
    from ..mask.builders import from_scores
    from ..mask.heads import head_names

    t0 = time.perf_counter()
    head = head_names(model, head)  # the parameters select_mask forces in, for the same masks
    if world == 1:
        # make_mask's FISH branch, with the scores kept for every density
        result = estimate_fisher(model, fisher_data, num_samples, kind=kind, seed=seed, progress=progress)
        scores, frozen = model_scores(model, result)
        provenance = fisher_provenance(result)
        masks = {d: from_scores(scores, d, force=head, exclude=frozen, provenance=provenance) for d in densities}
        return masks, SimpleNamespace(seconds=time.perf_counter() - t0, num_samples=result.num_samples)
    return _fish_masks_distributed(model, fisher_data, num_samples, densities, head, kind, seed, progress, rank, world, t0)


def _fish_masks_distributed(model, fisher_data, num_samples, densities, head, kind, seed, progress, rank, world, t0):
    """fisher_mask_distributed's steps (each rank scores its block of the N samples, the scores are
    summed, rank 0 selects and broadcasts), with the summed scores kept for every density."""
    from types import SimpleNamespace

    import torch

    from ..distributed._comm import Comm
    from ..distributed.fisher import _all_reduce_scores, samples_of_rank
    from ..distributed.loop import FisherSamples
    from ..distributed.masks import broadcast_mask
    from ..fisher import estimate_fisher
    from ..mask.builders import from_scores

    comm = Comm()
    named = list(model.named_parameters())
    error, result = None, None
    try:  # everything that can fail on one rank only, before the first collective
        if num_samples < world:
            raise ValueError(f"num_samples={num_samples} is smaller than the {world} ranks: every rank needs a sample")
        local = FisherSamples(fisher_data, num_samples, rank, world)
        result = estimate_fisher(model, local, samples_of_rank(num_samples, rank, world), kind=kind, seed=seed,
                                 progress=progress)
    except Exception as e:  # noqa: BLE001 - re-raised on this rank, reported on the others
        error = e
    comm.agree_ok("fishkern glue: the Fisher pass", error)
    trained = [n for n, _ in named if n in result.scores]
    reduced = [result.scores[n].float() for n in trained]
    _all_reduce_scores(comm, reduced)
    seen = torch.tensor([result.num_samples], dtype=torch.float32)
    _all_reduce_scores(comm, [seen])
    scores = dict(zip(trained, reduced))
    frozen = [n for n, _ in named if n not in scores]
    for n, p in named:
        if n not in scores:
            scores[n] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    scores = {n: scores[n] for n, _ in named}
    provenance = {"fisher_kind": result.kind, "fisher_samples": int(seen.item()), "fisher_world_size": world,
                  "fisher_implementation": result.implementation, "fisher_seconds": round(result.seconds, 3)}
    masks = {}
    for d in densities:
        mask, error = None, None
        if rank == 0:
            try:
                mask = from_scores(scores, d, force=head, exclude=frozen, provenance=provenance)
            except (ValueError, TypeError) as e:  # e.g. NaN scores from any rank
                error = e
        comm.agree_ok("fishkern glue: the mask selection on rank 0", error)
        masks[d] = broadcast_mask(mask, src=0)
    return masks, SimpleNamespace(seconds=time.perf_counter() - t0, num_samples=int(seen.item()))


def _run_glue(cfg: GlueConfig, rank: int, world: int) -> dict[str, Any]:
    from ..data import glue_task

    task = glue_task(cfg.task)
    out = Path(cfg.out_dir) / task.name
    if not cfg.overwrite:  # refuse before any work, not after the first run has trained
        for p in [out / "results.json"] + [out / _run_name(*r) / f for r in _runs(cfg)
                                           for f in ("mask.safetensors", "task.safetensors", "result.json")]:
            if p.exists():
                raise FileExistsError(f"{p} exists; pass --overwrite or another --out-dir")
    if rank == 0:
        _check_out_dir(out)
    dirs = _OutputDirs()  # created when the first file is written: a failed run leaves no empty directory
    try:
        return _train_all(cfg, task, out, dirs, rank, world)
    except BaseException:
        dirs.remove_empty()
        raise


def _train_all(cfg: GlueConfig, task, out: Path, dirs: _OutputDirs, rank: int, world: int) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..data import GlueCollator, load_glue, tokenize_glue
    from ..finetune import FinetuneConfig, finetune
    from ..integrations.hf import head_names, save_task_file

    hf_logging.set_verbosity_error()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1 and device.type == "cuda" and device.index is None:
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
    chance = chance_level(task, train_ds["labels"], {s: d["labels"] for s, d in val.items()})

    def train_loader(seed):
        g = torch.Generator().manual_seed(seed)
        return DataLoader(train_ds.with_format("python"), batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate)

    val_loaders = {s: DataLoader(d.with_format("python"), batch_size=64, collate_fn=collate) for s, d in val.items()}

    results = []
    runs = list(_runs(cfg))
    fisher: dict[int, tuple[dict, Any]] = {}  # N -> (masks by density, info): one Fisher pass per N
    for method, density, n in runs:
        name = _run_name(method, density, n)
        run_dir = out / name
        torch.manual_seed(cfg.seed)  # the new head's initialisation: the same model for every run
        model = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=task.num_labels).to(device)
        base = {k: v.detach().clone() for k, v in model.named_parameters()}
        head = tuple(_head_modules(head_names(model)))
        fc = FinetuneConfig(
            method=method, density=density or 0.005, num_samples=n or 1024, fisher_kind=cfg.fisher_kind,
            lr=cfg.lr, epochs=cfg.epochs, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
            head=head, seed=cfg.seed,
        )
        t0 = time.perf_counter()
        mask, reused = None, None
        if method == "fish":
            reused = n in fisher
            if not reused:
                fisher[n] = fish_masks(model, train_loader(cfg.seed + 1), n, cfg.densities, head=head,
                                       kind=cfg.fisher_kind, seed=cfg.seed, progress=cfg.progress and rank == 0,
                                       rank=rank, world=world)
            masks, info = fisher[n]
            mask = masks[density]
        with MachineLoad() as load:
            res = finetune(model, train_loader(cfg.seed), lambda m: evaluate_glue(m, val_loaders, task, device), fc,
                           mask=mask, progress=cfg.progress, desc=f"{task.name} {name}")
        row = res.summary()
        row["machine_load"] = load.result
        if method == "fish":  # the pass ran once for this N (in the first of its runs)
            row.update(fisher_seconds=info.seconds, fisher_samples=info.num_samples, fisher_reused=reused)
        row.update(run=name, task=task.name, density_requested=density, num_samples_requested=n,
                   seconds=time.perf_counter() - t0)
        row["world_size"] = world
        if res.mask is not None and rank == 0:
            dirs.ensure(run_dir)
            res.mask.save(run_dir / "mask.safetensors", overwrite=cfg.overwrite)
            row["task_file_bytes"] = save_task_file(model, base, res.mask, run_dir / "task.safetensors",
                                                    overwrite=cfg.overwrite, extra={"task": task.name, "run": name})
        if rank == 0:
            write_json_atomic(dirs.ensure(run_dir) / "result.json", row)
        results.append(row)
        del model, base
    report = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "task": task.name,
        "batch_size": batch_size,
        "device": str(device),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "git": git_revision(),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "headline_metric": headline_key(task.name, results[0]["metrics"] if results else ()),
        "chance": chance,
        "runs": results,
    }
    report["world_size"] = world
    if rank != 0:
        return report
    write_json_atomic(dirs.ensure(out) / "results.json", report)
    if len(cfg.densities) > 1 or len(cfg.num_samples) > 1:
        plot_glue(report, out / "sweep.png")
    return report


def _head_modules(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[0] if "." in n else n for n in names})


# ------------------------------------------------------------------------------ report and plot
def _headline(report) -> str:
    return report.get("headline_metric") or headline_key(report["task"], report["runs"][0]["metrics"] if report["runs"] else ())


def glue_figure(report):
    """The sweep plot as a matplotlib figure: FISH (and random) against density in percent, or
    FISH against N; dense, BitFit and the chance level as horizontal lines, each in its own style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    key = _headline(report)
    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    fish = [r for r in runs if r["method"] == "fish"]
    sweep_density = len({r["density_requested"] for r in fish}) > 1 or not fish
    if sweep_density:
        xs = set()
        for method, marker in (("fish", "o-"), ("random", "s-")):
            rows = [r for r in runs if r["method"] == method]
            if method == "fish" and len({r["num_samples_requested"] for r in rows}) > 1:
                n_max = max(r["num_samples_requested"] for r in rows)  # the density curve at the largest N
                rows = [r for r in rows if r["num_samples_requested"] == n_max]
            rows.sort(key=lambda r: r["density_requested"])
            if rows:
                x = [100 * r["density_requested"] for r in rows]
                xs.update(x)
                ax.plot(x, [r["metrics"].get(key) for r in rows], marker, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("density (% of parameters, log scale)")
        percent_log_axis(ax.xaxis, sorted(xs))  # "0.1%", not 10⁻¹
    else:
        rows = sorted(fish, key=lambda r: r["num_samples_requested"])
        x = [r["num_samples_requested"] for r in rows]
        ax.plot(x, [r["metrics"].get(key) for r in rows], "o-", label="fish")
        ax.set_xscale("log")
        ax.set_xlabel("Fisher samples N (log scale)")
        ticks = sorted(set(x))
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{t:g}" for t in ticks]))
        ax.xaxis.set_minor_formatter(NullFormatter())
    for r in runs:
        if r["method"] in ("dense", "bitfit") and r["metrics"].get(key) is not None:
            draw_baseline(ax, r["method"], r["metrics"][key], "BitFit" if r["method"] == "bitfit" else "dense")
    chance = report.get("chance")
    if chance and chance["metrics"].get(key) is not None:
        draw_baseline(ax, "chance", chance["metrics"][key], f"chance (always '{chance['class']}')")
    ax.set_ylabel(f"{report['task']} {key}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_glue(report, path) -> None:
    save_figure(glue_figure(report), path)


def render_glue(report) -> str:
    cfg = report.get("config", {})
    key = _headline(report)
    chance = report.get("chance")
    level = chance["metrics"].get(key) if chance else None
    head = f"GLUE {report['task']} ({report['device']}, batch {report['batch_size']}"
    if cfg.get("epochs"):
        head += f", {plural(cfg['epochs'], 'epoch')}, lr {cfg['lr']:g}"
    lines = [head + ")", ""]
    lines.append(f"{'run':<22} {'trained':>12} {'metrics':<48} {'opt. state':>10} {'step':>9} {'Fisher':>8}")
    flagged = []
    for r in report["runs"]:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items() if k not in ("epoch", "train_loss"))
        if r.get("fisher_reused"):
            fisher = "reused"
        else:
            fisher = f"{r['fisher_seconds']:.1f}s" if r.get("fisher_seconds") else ""
        mark = ""
        value = r["metrics"].get(key)
        if level is not None and value is not None and value <= level + NEAR_CHANCE:
            mark = "  ≈ chance"
            flagged.append(r["run"])
        lines.append(f"{r['run']:<22} {r['trainable']:>12,} {metrics:<48} {fmt_bytes(r['optimizer_state_bytes']):>10} "
                     f"{r['step_ms']:>7.1f}ms {fisher:>8}{mark}")
    if any(r.get("fisher_reused") for r in report["runs"]):
        lines.append("")
        lines.append("Fisher: one pass per N; 'reused' runs took their mask from the scores of the first run with that N.")
    if chance:
        lines.append("")
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in chance["metrics"].items())
        lines.append(f"chance level: always predicting '{chance['class']}' (the most frequent training label, "
                     f"{100 * chance['train_fraction']:.1f}% of it) scores {metrics}.")
        if flagged:
            lines.append(f"{', '.join(flagged)}: {key} within {NEAR_CHANCE:g} of that level — "
                         "no better than predicting the majority class.")
    warning = load_warning({r["run"]: r.get("machine_load") for r in report["runs"]}, "the step and Fisher times")
    if warning:
        lines += ["", warning]
    return "\n".join(lines)
