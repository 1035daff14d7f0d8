"""`torchrun --nproc-per-node 2 -m fishkern glue ...` (issue 11's recipe) against the same command in
one process: the same masks, the same metrics and trained entries within rounding, files written once.
Two densities: the second FISH mask comes from the first run's Fisher scores (one pass per N), on
one process and split over two ranks alike."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_bert import WORDS, free_port, save_tiny_bert

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from fishkern import FishMask  # noqa: E402
from fishkern.diff import SparseDiff  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def glue_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("glue_ddp")
    save_tiny_bert(d / "model")
    data = d / "data"
    data.mkdir()
    for split, n in (("train", 29), ("validation", 12)):  # 29: a last batch of 5 rows splits 2 + 3
        with open(data / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence", "label", "idx"])
            for i in range(n):
                word = WORDS[(i * 7) % 12]
                w.writerow([f"a {word} film", int(WORDS.index(word) % 2 == 0), i])
    return d


def _glue(inputs: Path, out: Path, launcher: list[str]) -> dict:
    argv = ["glue", "sst2", "--model", str(inputs / "model"), "--data-dir", str(inputs / "data"), "--out-dir", str(out),
            "--methods", "fish", "dense", "--density", "0.02", "0.05", "--num-samples", "12", "--epochs", "2",
            "--batch-size", "8", "--lr", "1e-3", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(launcher + ["-m", "fishkern"] + argv, env=env, cwd=str(ROOT), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return json.loads((out / "sst2" / "results.json").read_text())


@pytest.fixture(scope="module")
def glue_runs(glue_inputs, tmp_path_factory):
    base = tmp_path_factory.mktemp("glue_runs")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    return {
        "one": (_glue(glue_inputs, base / "one", [sys.executable]), base / "one"),
        "two": (_glue(glue_inputs, base / "two", torchrun), base / "two"),
    }


def test_torchrun_glue_matches_one_process(glue_runs):
    (one, d1), (two, d2) = glue_runs["one"], glue_runs["two"]
    assert one["world_size"] == 1 and two["world_size"] == 2
    runs = ["fish_d0.02_n12", "fish_d0.05_n12", "dense"]
    assert [r["run"] for r in one["runs"]] == [r["run"] for r in two["runs"]] == runs
    assert [r.get("fisher_reused") for r in two["runs"]] == [False, True, None]
    for a, b in zip(one["runs"], two["runs"]):
        assert a["trainable"] == b["trainable"]
        for e1, e2 in zip(a["history"], b["history"]):
            assert abs(e1["train_loss"] - e2["train_loss"]) < 1e-5
            assert e1["accuracy"] == e2["accuracy"]
    for run in runs[:2]:
        m1 = FishMask.load(d1 / "sst2" / run / "mask.safetensors")
        m2 = FishMask.load(d2 / "sst2" / run / "mask.safetensors")
        assert m1.digest == m2.digest  # the Fisher pass split over 2 ranks scores the same 12 samples (N not a
        assert m1.provenance["fisher_samples"] == m2.provenance["fisher_samples"] == 12  # multiple of the batch)
        assert m2.provenance["fisher_world_size"] == 2
        t1 = SparseDiff.load(d1 / "sst2" / run / "task.safetensors")
        t2 = SparseDiff.load(d2 / "sst2" / run / "task.safetensors")
        for n in t1.values:
            assert torch.equal(t1.indices[n], t2.indices[n])
            assert (t1.values[n].float() - t2.values[n].float()).abs().max().item() < 1e-5, n
    small = FishMask.load(d2 / "sst2" / runs[0] / "mask.safetensors")
    large = FishMask.load(d2 / "sst2" / runs[1] / "mask.safetensors")
    assert small.k < large.k


def test_torchrun_glue_writes_each_file_once(glue_runs):
    _, d2 = glue_runs["two"]
    files = sorted(p.relative_to(d2).as_posix() for p in d2.rglob("*") if p.is_file())
    fish = [f"sst2/{run}/{f}" for run in ("fish_d0.02_n12", "fish_d0.05_n12")
            for f in ("mask.safetensors", "result.json", "task.safetensors")]
    assert files == ["sst2/dense/result.json", *fish, "sst2/results.json", "sst2/sweep.png"]
