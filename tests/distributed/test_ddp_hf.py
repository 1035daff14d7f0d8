"""FishTrainer with 2 processes under torchrun and under accelerate launch (issue 11): one mask
(the Fisher pass split across the ranks, summed, selected once), the same parameters as one process
over the same global batch, only k values all-reduced per step, files written once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_bert import WORDS, free_port, save_tiny_bert

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fishkern.diff import SparseDiff  # noqa: E402
from fishkern.integrations import load_task_file  # noqa: E402

WORKER = Path(__file__).with_name("_hf_ddp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_ddp")
    save_tiny_bert(d / "model")
    texts = [f"a {WORDS[i % 12]} film {i}" for i in range(32)]
    labels = [int(i % 12 % 2 == 0) for i in range(32)]
    (d / "data.json").write_text(json.dumps({"texts": texts, "labels": labels}))
    return d


def _run(inputs: Path, out: Path, launcher: list[str]) -> dict[int, dict]:
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = launcher + [str(WORKER), str(inputs / "model"), str(inputs / "data.json"), str(out)]
    p = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{(p.stdout + p.stderr)[-4000:]}"
    return {int(f.stem[4:]): torch.load(f, weights_only=False) for f in out.glob("rank*.pt")}


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port())]
    return {
        "one": (_run(inputs, base / "one", [sys.executable]), base / "one"),
        "torchrun": (_run(inputs, base / "torchrun", torchrun), base / "torchrun"),
        "accelerate": (_run(inputs, base / "accelerate", accelerate), base / "accelerate"),
    }


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_like_one(runs, launcher):
    one = runs["one"][0][0]
    ranks, _ = runs[launcher]
    assert sorted(ranks) == [0, 1]
    for r in (0, 1):
        assert ranks[r]["wrapped"] == "DistributedDataParallel"
        assert ranks[r]["mask_digest"] == one["mask_digest"]  # the split Fisher pass gives the same mask
        assert ranks[r]["provenance"]["fisher_world_size"] == 2 and ranks[r]["provenance"]["fisher_samples"] == 16
        for n, v in one["final"].items():
            assert torch.equal(ranks[r]["final"][n], ranks[0]["final"][n]), (r, n)
            assert (ranks[r]["final"][n] - v).abs().max().item() <= 1e-6, (r, n)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_only_the_masked_entries_are_all_reduced(runs, launcher):
    ranks, _ = runs[launcher]
    for r in (0, 1):
        comm = ranks[r]["comm"]
        steps = 8  # 32 samples, global batch 8, 2 epochs
        assert comm["bytes_sent"] == 4 * ranks[r]["k"] * steps
        assert comm["dense_bytes"] > 40 * comm["bytes_sent"]  # 2% of the model


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_task_file_and_checkpoints_written_once_by_the_main_process(inputs, runs, launcher):
    ranks, out = runs[launcher]
    assert ranks[0]["task_bytes"] > 0 and ranks[1]["task_bytes"] == 0
    diff = SparseDiff.load(out / "task.safetensors")
    assert diff.k == ranks[0]["k"]
    ckpts = sorted((out / "trainer").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    for c in ckpts:  # sparse: the mask, the k trained values and the k-sized optimizer state, no dense model
        assert (c / "fish_mask.safetensors").is_file() and (c / "fish_model.safetensors").is_file()
        assert (c / "optimizer.pt").is_file() and not (c / "model.safetensors").exists()
    # the last checkpoint holds the final parameters of the run
    torch.manual_seed(1)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(inputs / "model"), num_labels=2)
    load_task_file(ckpts[-1] / "fish_model.safetensors", model)
    for n, p in model.named_parameters():
        assert torch.equal(p, ranks[0]["final"][n]), n
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
