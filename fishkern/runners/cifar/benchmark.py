"""`fishkern cifar --benchmark-steps N`: the training step, standard against masked SGD (for a GPU)."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import check_device
from ...reporting import MachineLoad, fmt_bytes, load_warning, write_json_atomic, write_text_atomic
from .build import build_model, make_mask, make_optimizer
from .config import CifarConfig
from .launch import device_for
from .report import check_out_dir, environment


def run_benchmark(cfg: CifarConfig) -> dict[str, Any]:
    """Time the training step (augmentation, forward, backward, optimizer step) of the configured
    model at ``cfg.batch_size`` for ``cfg.benchmark_steps`` steps after 5 warm-up steps: standard
    dense Nesterov SGD against MaskedSGD with a FISH (and/or random) mask at each density. Synthetic
    normal images (CIFAR-10 or digits shape; never zeros). CUDA: CUDA events per step, peak memory.
    Writes benchmark.json and benchmark.md to ``cfg.out_dir``."""
    import numpy as np
    import torch

    check_device(cfg.device)
    out = Path(cfg.out_dir)
    check_out_dir(out, ["benchmark.json", "benchmark.md"], cfg.overwrite)
    device = device_for(cfg, 0)
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
            mask = make_mask(cfg, model, "fish", density, pool, min(cfg.num_samples, 4 * b), seed=0)
            fisher_s = time.perf_counter() - t0
        elif method == "random":
            mask = make_mask(cfg, model, "random", density, None, 0, seed=0)
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
           "command": " ".join(sys.argv), "environment": environment(str(device)),
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
