"""Start M worker processes as the ranks of a gloo group (rendezvous through a FileStore in a
temporary directory, so no ports are involved) and collect what each saved to TMP/rank{r}.pt."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_ranks(worker: Path, tmp: Path, world: int, scenarios: str, *, wait_for=None, limit: float = 120.0,
              env: dict | None = None, cwd: Path | None = None):
    """Run ``world`` ranks of ``worker SCENARIOS TMP``; wait for the ranks in ``wait_for`` (default
    all) and kill the others (they may hang on purpose). Returns ({rank: exit code}, {rank: output},
    {rank: saved dict or None}, {rank: wall seconds}) for the waited ranks; asserts nothing."""
    base = dict(os.environ)
    base.update(
        WORLD_SIZE=str(world),
        FISHKERN_TEST_INIT=f"file://{tmp}/store",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(x for x in (str(ROOT), base.get("PYTHONPATH")) if x),
        **(env or {}),
    )
    procs, started = [], time.monotonic()
    for r in range(world):
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), scenarios, str(tmp)],
                env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                cwd=str(cwd or ROOT),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    wait_for = range(world) if wait_for is None else wait_for
    codes, logs, walls = {}, {}, {}
    try:
        for r in wait_for:
            try:
                logs[r], _ = procs[r].communicate(timeout=max(1.0, limit - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} of {world} ({scenarios}) did not finish within {limit:.0f} s")
            walls[r], codes[r] = time.monotonic() - started, procs[r].returncode
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    records = {}
    for r in wait_for:
        f = tmp / f"rank{r}.pt"
        records[r] = torch.load(f, weights_only=False) if f.exists() else None
    return codes, logs, records, walls


def launch(worker: Path, tmp: Path, world: int, scenarios: str, *, wait_for=None, limit: float = 120.0,
           ok_codes=(0,), env: dict | None = None):
    """``run_ranks`` that fails the test when a waited rank exits with a code not in ``ok_codes``.
    Returns ({rank: saved dict or None}, {rank: wall seconds})."""
    codes, logs, records, walls = run_ranks(worker, tmp, world, scenarios, wait_for=wait_for, limit=limit, env=env)
    for r, code in codes.items():
        assert code in ok_codes, f"rank {r} of {world} ({scenarios}) failed:\n{logs[r][-4000:]}"
    return records, walls
