"""The CIFAR-10 recipe: the ResNets, tensor augmentation, the learning-rate schedule, the `fishkern
cifar` runner end to end on real gloo worker processes (scikit-learn's digits), its checkpoints,
the benchmark mode and the CLI's errors."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fishkern.cli import main
from fishkern.data.augment import Augment, crop, cutout, flip, pad
from fishkern.models import RESNET34_CIFAR10_PARAMS, CifarResNet, cifar_resnet, resnet34_cifar
from fishkern.runners import cifar as rc

ROOT = Path(__file__).resolve().parents[2]
HAS_GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
needs_gloo = pytest.mark.skipif(not HAS_GLOO, reason="torch.distributed with gloo is not available in this torch build")


def _benchmark_common():
    spec = importlib.util.spec_from_file_location("_bench_common", ROOT / "benchmarks" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------- models
def test_resnet34_is_the_paper_size_and_the_benchmarks_build_it():
    model = resnet34_cifar()
    n = sum(p.numel() for p in model.parameters())
    assert n == RESNET34_CIFAR10_PARAMS == 21_282_122
    bench = _benchmark_common()
    ref = bench.build_model("resnet34")
    # the benchmarks time the package's model (no second copy of the architecture)
    assert type(ref) is type(model) and bench.count_params(ref) == bench.RESNET34_PARAMS == n
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in resnet34_cifar(num_classes=100).parameters()) == n + 90 * 512 + 90


def test_small_resnets_shapes_and_errors():
    m = cifar_resnet(blocks=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10, in_channels=1)
    assert sum(p.numel() for p in m.parameters()) == 77_858
    for size in (8, 16, 32):
        assert m(torch.randn(3, 1, size, size)).shape == (3, 10)
    m2 = cifar_resnet(blocks=(2, 1), widths=(4, 8), num_classes=3)
    assert m2(torch.randn(2, 3, 9, 7)).shape == (2, 3)
    assert [n for n, _ in m2.named_parameters()][-2:] == ["fc.weight", "fc.bias"]
    assert isinstance(m2, CifarResNet) and f"{sum(p.numel() for p in m2.parameters()):,} parameters" in m2.describe()
    with pytest.raises(ValueError):
        cifar_resnet(blocks=(1, 1), widths=(8,))
    with pytest.raises(ValueError):
        cifar_resnet(blocks=(0,), widths=(8,))


def test_batched_fisher_is_exact_on_the_resnet():
    """Every parameter module runs once per forward, so the batched estimator needs no fallback and
    matches the per-sample loop."""
    from fishkern.fisher import estimate_fisher, fisher_reference

    torch.manual_seed(0)
    m = cifar_resnet(blocks=(1, 1), widths=(4, 8), num_classes=5, in_channels=1)
    m.train()
    m(torch.randn(16, 1, 8, 8))  # non-trivial BatchNorm running statistics
    data = [(torch.randn(5, 1, 8, 8), torch.randint(0, 5, (5,))) for _ in range(2)]
    res = estimate_fisher(m, data, 10, progress=False)
    assert res.implementation == "torch" and res.fallback_reason is None
    ref = fisher_reference(m, data, 10, progress=False)
    for n, s in res.scores.items():
        torch.testing.assert_close(s, ref[n], rtol=1e-4, atol=1e-9)


# --------------------------------------------------------------------------------- augmentation
def _batch(n=5, c=3, h=6, w=7, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_crop_is_a_window_per_image():
    x = torch.arange(4 * 2 * 9 * 10, dtype=torch.float32).view(4, 2, 9, 10)
    top, left = torch.tensor([0, 3, 1, 4]), torch.tensor([5, 0, 2, 3])
    out = crop(x, top, left, (5, 5))
    for i in range(4):
        assert torch.equal(out[i], x[i, :, top[i]: top[i] + 5, left[i]: left[i] + 5])
    with pytest.raises(ValueError):
        crop(x, torch.tensor([5, 0, 0, 0]), left, (5, 5))  # leaves the image


def test_pad_then_crop_at_the_padding_is_the_identity():
    x = _batch()
    for mode in ("reflect", "zeros", "replicate"):
        p = pad(x, 2, mode)
        assert p.shape == (5, 3, 10, 11)
        assert torch.equal(crop(p, torch.full((5,), 2), torch.full((5,), 2), (6, 7)), x)
    assert torch.equal(pad(x, 2, "reflect"), F.pad(x, (2, 2, 2, 2), mode="reflect"))
    assert torch.equal(pad(x, 1, "zeros")[:, :, 0], torch.zeros(5, 3, 9))


def test_flip_mirrors_only_the_chosen_images():
    x = _batch()
    which = torch.tensor([True, False, True, False, False])
    out = flip(x, which)
    for i in range(5):
        assert torch.equal(out[i], x[i].flip(-1) if which[i] else x[i])


def test_cutout_zeroes_exactly_the_square():
    x = _batch(n=3, h=6, w=6) + 10.0  # no zeros before
    out = cutout(x, torch.tensor([0, 2, 5]), torch.tensor([1, 4, 5]), 2)
    ref = x.clone()
    ref[0, :, 0:2, 1:3] = 0
    ref[1, :, 2:4, 4:6] = 0
    ref[2, :, 5:6, 5:6] = 0  # cut at the border
    assert torch.equal(out, ref)
    assert torch.equal(x[0, 0, 0, 1], torch.tensor(x[0, 0, 0, 1].item()))  # input untouched
    assert int((out == 0).sum()) == 3 * (4 + 4 + 1)


def test_augment_is_seeded_and_equals_the_explicit_transforms():
    x = _batch(n=6, h=8, w=8)
    aug = Augment(crop_padding=2, pad_mode="reflect", flip=True, cutout_size=3)
    a1 = aug(x, torch.Generator().manual_seed(7))
    a2 = aug(x, torch.Generator().manual_seed(7))
    a3 = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a1, a2) and not torch.equal(a1, a3) and a1.shape == x.shape
    # the documented draw order: crop top, crop left, flip, cutout top, cutout left
    g = torch.Generator().manual_seed(7)
    top, left = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    which = torch.rand(6, generator=g) < 0.5
    ct, cl = torch.randint(0, 6, (6,), generator=g), torch.randint(0, 6, (6,), generator=g)
    ref = cutout(flip(crop(F.pad(x, (2,) * 4, mode="reflect"), top, left, (8, 8)), which), ct, cl, 3)
    assert torch.equal(a1, ref)
    assert torch.equal(Augment(crop_padding=0, flip=False, cutout_size=0)(x, torch.Generator()), x)
    with pytest.raises(ValueError):
        Augment(cutout_size=9)(x, torch.Generator())
    with pytest.raises(ValueError):
        Augment(pad_mode="wrap")


# ------------------------------------------------------------------------------------ schedule
def test_learning_rate_schedule_values():
    def lr(t):
        return rc.lr_at(t, 0.4, 5, 100)

    assert lr(0) == 0.0
    assert lr(1) == pytest.approx(0.08)
    assert lr(2.5) == pytest.approx(0.2)
    assert lr(5) == pytest.approx(0.4)
    assert lr(52.5) == pytest.approx(0.2)
    assert lr(99) == pytest.approx(0.4 / 95)
    assert lr(100) == 0.0 and lr(120) == 0.0
    assert rc.lr_at(0, 0.1, 0, 10) == 0.1 and rc.lr_at(5, 0.1, 0, 10) == pytest.approx(0.05)
    assert rc.steps_per_epoch(50_000 // 2, 512) == 48 and rc.steps_per_epoch(10, 512) == 1


def test_plan_runs_grid():
    cfg = rc.CifarConfig(methods=("standard", "dense", "fish"), densities=(0.02, 0.1), merge_intervals=(100, 500),
                         seeds=(0, 1))
    names = [s.name for s in rc.plan_runs(cfg)]
    assert len(names) == 2 * (1 + 2 + 4) and len(set(names)) == len(names)
    assert "fish_d0.02_h500_s1" in names and "standard_s0" in names


# ---------------------------------------------------------------------------- end to end (gloo)
def _tiny(out, *extra):
    return ["cifar", "--dataset", "digits", "--max-train-samples", "48", "--max-test-samples", "40",
            "--batch-size", "8", "--epochs", "1", "--dense-warmup-epochs", "0", "--lr-warmup-epochs", "0",
            "--lr", "0.05", "--widths", "4", "8", "8", "8", "--num-samples", "16", "--out-dir", str(out),
            "--no-progress", *extra]


def _params(path):
    return torch.load(path, weights_only=True)


@needs_gloo
def test_two_gloo_workers_end_to_end(tmp_path):
    """2 spawned gloo workers, 24 digits each, 1 epoch of 3 local steps, exchanges every 2 steps (and at
    the end): the workers end bit-identical, only masked entries move, 4·k bytes per exchange."""
    out = tmp_path / "run"
    rc_ = main(_tiny(out, "--workers", "2", "--methods", "standard", "fish", "dense", "--density", "0.1",
                     "--merge-interval", "2", "--verify-sync", "--save-states", "--checkpoint-every-epochs", "1"))
    assert rc_ == 0
    rep = json.loads((out / "results.json").read_text())
    assert (out / "report.md").exists() and (out / "accuracy_vs_bytes.png").exists()
    runs = {r["method"]: r for r in rep["runs"]}
    numel = runs["fish"]["numel"]
    assert numel == sum(p.numel() for p in cifar_resnet((1, 1, 1, 1), (4, 8, 8, 8), 10, 1).parameters())
    for method in ("fish", "dense"):
        r = runs[method]
        assert r["world_size"] == 2 and r["steps_per_epoch"] == 3 and r["exchanges"] == 2
        ranks = r["ranks"]
        assert [s["rank"] for s in ranks] == [0, 1]
        for s in ranks:
            assert s["sync_checks"] == 2  # assert_in_sync passed after every exchange
            assert s["local_steps"] == 3
        d = tmp_path / "run" / r["name"] / "states"
        final = [_params(d / f"final_rank{i}.pt") for i in range(2)]
        assert all(torch.equal(final[0][n], final[1][n]) for n in final[0])
        if method == "dense":
            assert all(s["dense_bytes_sent"] == 2 * 4 * numel and s["sparse_bytes_sent"] == 0 for s in ranks)
            continue
        k = r["k"]
        assert k == int(0.1 * numel) and r["mask_digest"]
        for s in ranks:
            assert s["bytes_per_exchange"] == 4 * k
            assert s["sparse_bytes_sent"] == s["bytes_sent"] == 2 * 4 * k and s["dense_bytes_sent"] == 0
        assert ranks[0]["mask_bytes_sent"] > 0 and ranks[1]["mask_bytes_sent"] == 0
        assert r["bytes_per_worker"] == pytest.approx(2 * 4 * k + ranks[0]["mask_bytes_sent"] / 2)
        from fishkern import FishMask

        mask = FishMask.load(d / "start_mask.safetensors").to_boolean()
        start = _params(d / "start.pt")
        moved = 0
        for n, p in final[0].items():
            changed = p != start[n]
            assert not (changed & ~mask[n]).any(), f"{n}: an entry outside the mask changed"
            moved += int(changed.sum())
        assert moved > k // 2  # training moved the masked entries
        assert all(mask["fc.weight"].reshape(-1)) and all(mask["fc.bias"])  # the head is forced in
    # one sparse checkpoint per run; the chain rebuilds rank 0's final weights
    from fishkern.diff import SparseCheckpointer

    for method in ("fish", "standard"):
        r = runs[method]
        assert r["checkpoints"]["count"] == 1 and r["checkpoints"]["bytes_written"] > 0
        state = SparseCheckpointer(out / r["name"] / "checkpoints").rebuild(-1)
        if method == "fish":
            final0 = _params(out / r["name"] / "states" / "final_rank0.pt")
            assert all(torch.equal(state[n], final0[n]) for n in final0)
    assert runs["fish"]["checkpoints"]["bytes_written"] < runs["standard"]["checkpoints"]["bytes_written"]


@needs_gloo
def test_one_worker_in_process_recomputes_the_mask(tmp_path):
    out = tmp_path / "one"
    assert main(_tiny(out, "--workers", "1", "--methods", "random", "--density", "0.2", "--merge-interval", "1",
                      "--mask-every-exchanges", "2", "--epochs", "2")) == 0
    r = json.loads((out / "results.json").read_text())["runs"][0]
    s = r["ranks"][0]
    # one worker holds all 48 examples: 2 epochs of 6 steps, 12 exchanges; the first mask, then a new one after
    # exchanges 2, 4, 6, 8 and 10 (not after the last)
    assert r["world_size"] == 1 and r["exchanges"] == 12 and s["mask_recomputes"] == 6
    assert s["sparse_bytes_sent"] == 12 * 4 * r["k"] and s["local_steps"] == 12
    assert not torch.distributed.is_initialized()


def test_benchmark_mode_on_cpu(tmp_path):
    out = tmp_path / "bench"
    assert main(["cifar", "--benchmark-steps", "2", "--dataset", "digits", "--batch-size", "16", "--methods", "fish",
                 "random", "--density", "0.1", "--num-samples", "16", "--threads", "1", "--out-dir", str(out)]) == 0
    rep = json.loads((out / "benchmark.json").read_text())
    assert [r["method"] for r in rep["rows"]] == ["standard", "fish", "random"]
    assert all(r["step_ms_median"] > 0 and r["optimizer_step_ms_median"] > 0 for r in rep["rows"])
    assert rep["rows"][1]["optimizer_state_bytes"] == 4 * rep["rows"][1]["k"]  # momentum of the k entries
    assert "| fish 10% |" in (out / "benchmark.md").read_text()
    # the load of the machine is measured around every timed case (Linux /proc)
    assert all(set(r["machine_load"] or {}) <= {"wall_s", "other_cpu_s", "steal_s", "own_cpu_s", "busy"} for r in rep["rows"])


# ------------------------------------------------------------------------------------------ data
def _npz(path, n=12, **override):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "y_train": rng.integers(0, 10, n),
              "x_test": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), "y_test": np.arange(4)}
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_local_cifar_data_npz_and_datasetdict(tmp_path):
    d = rc.load_cifar10(str(_npz(tmp_path / "c.npz")))
    assert d["x_train"].shape == (12, 3, 32, 32) and d["x_train"].dtype == torch.uint8 and d["scale"] == 255.0
    assert d["num_classes"] >= 4 and d["y_test"].tolist() == [0, 1, 2, 3]
    assert rc.load_cifar10(str(tmp_path))["x_test"].shape == (4, 3, 32, 32)  # the one .npz in the directory
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    images = {s: [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)] for s, n in (("train", 6), ("test", 3))}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(  # the hub's format: PIL images and class labels
        {"img": [Image.fromarray(a) for a in ims], "label": list(range(len(ims)))}, features=features)
        for s, ims in images.items()})
    dd.save_to_disk(str(tmp_path / "dd"))
    d2 = rc.load_cifar10(str(tmp_path / "dd"))
    assert d2["x_train"].shape == (6, 3, 32, 32) and d2["y_train"].tolist() == list(range(6))
    assert torch.equal(d2["x_test"][2], torch.from_numpy(images["test"][2]).permute(2, 0, 1))
    digits = rc.load_digits_data()
    assert digits["x_train"].shape == (1437, 1, 8, 8) and digits["x_test"].shape[0] == 360


# ------------------------------------------------------------------------------------------- CLI
def test_cli_errors_and_exit_codes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cifar", "--no-such-option"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["cifar", "--density", "2"])
    assert e.value.code == 2
    assert main(["cifar", "--mask-every-exchanges", "1", "--mask-every-epochs", "1", "--out-dir", str(tmp_path / "a")]) == 2
    # missing data directory: 3
    assert main(["cifar", "--data-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "o1")]) == 3
    # invalid data: 4 (labels that do not match the images; a directory with no data; a density below the head)
    (tmp_path / "bad").mkdir()
    bad = _npz(tmp_path / "bad" / "c.npz", y_train=np.zeros(5, dtype=np.int64))
    assert main(["cifar", "--data-dir", str(bad), "--out-dir", str(tmp_path / "o2")]) == 4
    (tmp_path / "empty").mkdir()
    assert main(["cifar", "--data-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "o3")]) == 4
    assert main(_tiny(tmp_path / "o4", "--density", "0.001")) == 4
    err = capsys.readouterr().err
    assert "does not exist" in err and "labels" in err and "forced head" in err
    # results already there: 3 without --overwrite
    (tmp_path / "o5").mkdir()
    (tmp_path / "o5" / "results.json").write_text("{}")
    assert main(_tiny(tmp_path / "o5")) == 3


@needs_gloo
def test_miniature_smoke(tmp_path):
    """The miniature's machinery (Figure 3 and Table 4 tables, PNGs) on a toy plan, with one
    in-process worker (the 2-worker path is tested above)."""
    plan = rc.MiniaturePlan(seeds=(0,), fig3_intervals=(8,), fig3_masked=(("fish", 0.1),), table4_densities=(0.1,),
                            table4_mask_every=(1, 0), epochs=3, train_samples=128)
    cfg = rc.CifarConfig(out_dir=str(tmp_path / "mini"), workers=1, progress=False)
    rep = rc.run_miniature(cfg, plan)
    for f in rc.MINIATURE_FILES:
        assert (tmp_path / "mini" / f).exists()
    assert {r["method"] for r in rep["figure3"]} == {"standard", "dense", "fish"}
    assert [r["mask_every_epochs"] for r in rep["table4"]] == [0, 1, 1, 0]  # standard, random, FISH every 1, FISH fixed
    assert all(0 < r["weights_ratio"] for r in rep["table4"])
    text = (tmp_path / "mini" / "report.md").read_text()
    assert "Figure 3" in text and "Table 4" in text
    assert "Recipe (the paper's, scaled): 3 epochs," in text and "1 epoch of dense standard training" in text
    assert "every 1 epoch (2 masks)" in text and "epoch(s)" not in text  # after the warm-up epoch and after epoch 2
    assert "1 real gloo worker process (1 thread each), on the whole training set" in text
    assert "machine_load" in rep


def test_config_errors_count_epochs_in_words():
    with pytest.raises(ValueError, match=r"warm-up \(1 epoch\) must be shorter than the 1 epoch of training"):
        rc.CifarConfig(epochs=1, lr_warmup_epochs=1.0).check()
    with pytest.raises(ValueError, match=r"dense warm-up \(2 epochs\) leaves no epoch"):
        rc.CifarConfig(epochs=2, lr_warmup_epochs=1.0, dense_warmup_epochs=2).check()


def test_import_of_the_runner_is_light():
    """`fishkern cifar --help` builds its parser from this module: no torch or numpy at import."""
    import subprocess
    import sys

    code = "import sys, fishkern.runners.cifar; print([m for m in ('torch', 'numpy') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
