"""`fishkern cifar` itself: check, load the data, run the planned runs on the workers, write
results.json, report.md and the figure."""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import check_device
from ...reporting import MachineLoad, write_json_atomic, write_text_atomic
from .build import build_model, check_budget
from .config import CifarConfig, plan_runs
from .data import load_data
from .launch import device_for, execute, under_torchrun
from .report import check_chains, check_out_dir, environment, plot_accuracy_vs_bytes, render_runs


def run_cifar(cfg: CifarConfig) -> dict[str, Any] | None:
    """Train the runs of ``cfg`` (``plan_runs``) and write results.json and report.md (and
    accuracy_vs_bytes.png when several distributed runs are compared) to ``cfg.out_dir``. Under
    torchrun only rank 0 writes and returns the report."""
    cfg.check()
    check_device(cfg.device)  # before the data are loaded
    out = Path(cfg.out_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0 if under_torchrun() else True
    if rank0:
        check_out_dir(out, ["results.json", "report.md"], cfg.overwrite)
        check_chains(out, plan_runs(cfg), cfg.overwrite)
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
        "machine_load": None if under_torchrun() else load.result,
        "environment": environment(str(device_for(cfg, 0))),
    }
    write_json_atomic(out / "results.json", report)
    write_text_atomic(out / "report.md", render_runs(report))
    if sum(r["method"] != "standard" for r in results) > 1:
        plot_accuracy_vs_bytes(results, out / "accuracy_vs_bytes.png", title=f"{data['name']}: accuracy vs communication")
    return report
