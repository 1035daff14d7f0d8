"""`fishkern cifar --miniature`: the paper's Figure 3 and Table 4 on 8×8 digits, offline in minutes."""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .. import check_device
from ...reporting import MachineLoad, fmt_bytes, load_warning, plural, write_json_atomic, write_text_atomic
from .build import build_model
from .config import METHODS, CifarConfig, RunSpec
from .data import load_data
from .launch import execute
from .report import check_out_dir, environment, plot_accuracy_vs_bytes, plot_checkpoints, series


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
    for (m, d, h), rows in sorted(series([r for r in results if r["group"] in ("figure3", "both")]).items(),
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
        "environment": environment(cfg.device or "cpu"),
    }


def run_miniature(cfg: CifarConfig, plan: MiniaturePlan = MiniaturePlan()) -> dict[str, Any]:
    """The offline miniature (minutes on a 2-core CPU): 2 gloo workers, a small ResNet on
    scikit-learn's digits; writes report.md, results.json and two PNGs to ``cfg.out_dir``."""
    cfg = miniature_config(cfg, plan)
    cfg.check()
    check_device(cfg.device)
    out = Path(cfg.out_dir)
    check_out_dir(out, list(MINIATURE_FILES), cfg.overwrite)
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
