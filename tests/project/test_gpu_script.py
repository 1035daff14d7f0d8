"""Cheap checks of the GPU validation script (scripts/gpu_check.sh) and its helpers, which only run in
full on a GPU machine: the stage budgets fit one device command, the driver records a pass, a
failure and a timeout and goes on, the test selection finds the Triton tests, and the comparisons
of the smoke run and the byte counts of the benchmark can tell right from wrong. The whole CPU half
runs in CI as `bash scripts/gpu_check.sh --dry-run` (.ci/run)."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def load(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem + "_under_test", ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_stage_budgets_fit_one_device_command_in_value_order():
    out = subprocess.run(["bash", str(SCRIPT), "--list"], check=True, capture_output=True, text=True).stdout.splitlines()
    stages = [line.split() for line in out if not line.startswith("total")]
    assert [s[1] for s in stages] == ["setup", "tests", "smoke", "sanitize", "bench", "fisher"]
    assert [s[0] for s in stages] == [f"{i:02d}" for i in range(1, len(stages) + 1)]
    budgets = [int(s[2]) for s in stages]
    assert all(b > 0 for b in budgets)
    assert sum(budgets) <= 480, f"the stages need {sum(budgets)} s, more than 8 minutes"
    # one log a stage + summary.txt + the benchmark's JSON: what the device tool brings back
    assert len(stages) + 2 <= 8


def test_driver_records_pass_failure_and_timeout_and_goes_on(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_SELFTEST="1", OUT=str(out), GPU_CHECK_WORK=str(tmp_path / "work"))
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = (out / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("01_pass rc=0 ") and lines[0].endswith(" ok")
    assert lines[1].startswith("02_fail rc=3 ") and "FAILED (it failed)" in lines[1]
    assert lines[2].startswith("03_hang rc=124 ") and "TIMEOUT" in lines[2]
    assert lines[3].startswith("plumbing rc=0 ") and lines[4].startswith("total rc=1 ")
    assert "a failing stage" in (out / "02_fail.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["01_pass.log", "02_fail.log", "03_hang.log", "summary.txt"]


def test_unknown_argument_is_refused():
    r = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr


def test_selection_lists_the_triton_tests_and_leaves_cpu_ones(tmp_path):
    listing = tmp_path / "ids.txt"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_tests.py"), "--list", "--out", str(listing),
                        "--paths", "tests/optim/test_masked_triton.py", "tests/optim/test_masked_errors.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split("\t") for line in listing.read_text().splitlines()]
    ids = {nodeid: why for nodeid, why in rows}
    triton_ids = [i for i in ids if i.startswith("tests/optim/test_masked_triton.py::")]
    assert triton_ids and all("marker:triton" in ids[i] for i in triton_ids)
    # test_masked_errors.py is mostly CPU argument checking: some of it is left out
    errors_ids = [i for i in ids if i.startswith("tests/optim/test_masked_errors.py::")]
    assert "deselected" in r.stdout and len(errors_ids) < 10


def test_smoke_comparisons_tell_right_from_wrong():
    smoke = load("scripts/gpu_smoke.py")
    scores = [torch.tensor([5.0, 4.0, 3.0, 3.00001, 1.0]), torch.tensor([2.0, 0.5])]
    k = 3  # 5, 4 and the near-tie at 3 / 3.00001
    a = [torch.tensor([0, 1, 3]), torch.tensor([], dtype=torch.int64)]
    near = [torch.tensor([0, 1, 2]), torch.tensor([], dtype=torch.int64)]
    far = [torch.tensor([0, 3]), torch.tensor([0])]
    assert smoke.selection_differences(scores, a, a, k, 1e-4) == (0, 0)
    assert smoke.selection_differences(scores, a, near, k, 1e-4) == (2, 0)
    assert smoke.selection_differences(scores, a, near, k, 0.0) == (2, 1)  # 3.00001 is the k-th itself
    assert smoke.selection_differences(scores, a, far, k, 1e-4)[1] == 2
    x = [torch.ones(4), torch.zeros(3)]
    assert smoke.close_error(x, x, 1e-4, 1e-4) == (0.0, 0)
    y = [torch.ones(4), torch.tensor([0.0, 1e-3, 0.0])]
    worst, bad = smoke.close_error(y, x, 1e-4, 1e-4)
    assert bad == 1 and math.isclose(worst, 1e-3, rel_tol=1e-6)
    err, where = smoke.max_scaled_error({"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([2.0, 1.1])})
    assert err == pytest.approx(0.05, rel=1e-5) and where == "w"
    assert smoke.max_scaled_error({"w": torch.tensor([1e-9])}, {"w": torch.tensor([0.0])})[0] == float("inf")
    # a tensor of rounding noise (BERT's key biases: true Fisher 0) is judged against the model's
    # largest score, not its own; a real error in a small but meaningful tensor still counts
    ref = {"big": torch.tensor([1e-2, 3e-3]), "noise": torch.tensor([1.8e-24, 0.0]), "small": torch.tensor([2e-7])}
    got = {"big": ref["big"].clone(), "noise": torch.tensor([0.9e-24, 1e-25]), "small": ref["small"].clone()}
    assert smoke.max_scaled_error(got, ref)[0] < 1e-12
    assert smoke.max_scaled_error(got, ref, floor=0.0) == (pytest.approx(0.5, rel=1e-6), "noise")
    got["small"] = torch.tensor([3e-7])
    err, where = smoke.max_scaled_error(got, ref)
    assert where == "small" and err == pytest.approx(0.5, rel=1e-6)


def test_benchmark_shapes_masks_and_peak():
    bench = load("benchmarks/bench_gpu_step.py")
    shapes = bench.model_shapes(tiny=False)  # shapes only: nothing is allocated
    assert len(shapes) == 393 and sum(math.prod(s) for _, s in shapes) == 335_143_938
    assert len({n for n, _ in shapes}) == len(shapes)
    params = [torch.zeros(s) for _, s in bench.model_shapes(tiny=True)]
    total = sum(p.numel() for p in params)
    masks, k = bench.random_mask(params, 5.0, seed=0, device=torch.device("cpu"))
    assert k == math.floor(0.05 * total) == sum(m.numel() for m in masks)
    for m, p in zip(masks, params):
        assert m.dtype == torch.int64 and (m.numel() == 0 or (0 <= int(m.min()) and int(m.max()) < p.numel()))
        assert torch.equal(m, m.unique())  # sorted, no duplicates
    # an H200's HBM3e: 3201 MHz memory clock, 6144-bit bus
    assert bench.peak_gbps_from(3201e6, 6144) == pytest.approx(4916.7, abs=0.1)
    assert bench.device_peak_gbps(torch.device("cpu"), None) == (None, "no GPU")
    assert bench.device_peak_gbps(torch.device("cpu"), 123.0) == (123.0, "--peak-gbps")


def test_peak_bandwidth_skips_sources_with_implausible_units(monkeypatch):
    bench = load("benchmarks/bench_gpu_step.py")
    cands = [(4.9e6, "torch device properties (MHz read as kHz)"), (None, "NVML: absent"), (4916.7, "CuPy")]
    monkeypatch.setattr(bench, "_peak_candidates", lambda device: iter(cands))
    peak, source = bench.device_peak_gbps(torch.device("cuda"), None)
    assert peak == 4916.7 and source.startswith("CuPy") and "implausible" in source and "NVML: absent" in source
    monkeypatch.setattr(bench, "_peak_candidates", lambda device: iter(cands[:2]))
    peak, source = bench.device_peak_gbps(torch.device("cuda"), None)
    assert peak is None and "--peak-gbps" in source
