"""Start M worker processes as the ranks of a gloo group (rendezvous through a FileStore in a
temporary directory, so no ports are involved) and collect what each saved."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def launch(worker: Path, tmp: Path, world: int, scenarios: str, *, wait_for=None, limit: float = 120.0,
           ok_codes=(0,), env: dict | None = None):
    """Run ``world`` ranks of ``worker SCENARIOS TMP``; wait for the ranks in ``wait_for`` (default
    all) and kill the others (they may hang on purpose). Returns ({rank: saved dict or None},
    {rank: wall seconds})."""
    base = dict(os.environ)
    base.update(
        WORLD_SIZE=str(world),
        FISHKERN_TEST_INIT=f"file://{tmp}/store",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=str(ROOT) + os.pathsep + base.get("PYTHONPATH", ""),
        **(env or {}),
    )
    procs, started = [], time.monotonic()
    for r in range(world):
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), scenarios, str(tmp)],
                env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                cwd=str(ROOT),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    wait_for = range(world) if wait_for is None else wait_for
    walls = {}
    try:
        for r in wait_for:
            left = max(1.0, limit - (time.monotonic() - started))
            try:
                out, err = procs[r].communicate(timeout=left)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} of {world} ({scenarios}) did not finish within {limit:.0f} s")
            walls[r] = time.monotonic() - started
            assert procs[r].returncode in ok_codes, f"rank {r} of {world} ({scenarios}) failed:\n{(out + err)[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    results = {}
    for r in wait_for:
        f = tmp / f"rank{r}.pt"
        results[r] = torch.load(f, weights_only=False) if f.exists() else None
    return results, walls
