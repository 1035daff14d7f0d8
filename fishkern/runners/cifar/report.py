"""What `fishkern cifar` writes: the output directory checks, the environment record, report.md
tables and the figures (accuracy against bytes, checkpoint bars)."""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any

from ...reporting import bytes_log_axis, draw_baseline, fmt_bytes, git_revision, load_warning, save_figure
from .config import RunSpec


def environment(device: str) -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "git": git_revision(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None}


def check_out_dir(out: Path, names: list[str], overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    existing = [str(out / n) for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite or another --out-dir")


def check_chains(out: Path, specs: list[RunSpec], overwrite: bool) -> None:
    """Before any training: a run that writes checkpoints must not append to the chain an earlier
    (e.g. interrupted) run left in its directory."""
    if overwrite:
        return
    for s in specs:
        manifest = out / s.name / "checkpoints" / "manifest.json"
        if s.checkpoint_every_epochs and manifest.exists():
            raise FileExistsError(f"{manifest.parent} holds the checkpoint chain of an earlier run of {s.name}; "
                                  "pass --overwrite to start new chains, or another --out-dir")


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


def series(runs) -> dict[tuple, list[dict]]:
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
    for (m, d, h), rows in series(runs).items():
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
