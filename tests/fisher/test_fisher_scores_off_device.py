"""Scores kept off the parameters' device (``scores_device``) or in a memory-mapped file
(``scores_file``): the same scores, the scratch-buffer path exercised on CPU, files never
overwritten."""
from __future__ import annotations

import pytest
import torch

from fishkern.fisher import estimate_fisher, fisher_mask
from fishkern.fisher import estimator
from tests._tiny_lms import assert_scores_close, lm_batches, tiny_lm

pytest.importorskip("transformers")


def scores(model, data, **kw):
    return estimate_fisher(model, data, 8, progress=False, **kw).scores


@pytest.fixture
def staged(monkeypatch):
    """Every score reached through the per-layer scratch buffer, as for CUDA parameters with CPU
    scores (the scratch lives on the parameter's device: here the CPU too)."""
    seen = []

    def always(params, acc):
        seen.append(True)
        return True

    monkeypatch.setattr(estimator, "_needs_staging", always)
    return seen


@pytest.mark.parametrize("family", ["llama_tied", "gpt2_tied"])
def test_the_scratch_path_gives_the_same_scores(family, staged):
    model = tiny_lm(family)
    data = lm_batches()
    ref = estimate_fisher(model, data, 8, progress=False, implementation="loop").scores
    got = scores(model, data, scores_device="cpu")
    assert staged
    assert_scores_close(got, ref, 1e-10)


def test_a_generic_module_goes_through_the_scratch_path_too(staged):
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(5))

        def forward(self, x):
            return x * self.w

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), Scale(), torch.nn.Linear(5, 2)).double()
    data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
    with pytest.warns(UserWarning, match="generic"):
        got = scores(model, data, scores_device="cpu")
    ref = estimate_fisher(model, data, 8, progress=False, implementation="loop").scores
    assert_scores_close(got, ref, 1e-10)


def test_scores_in_a_memory_mapped_file(tmp_path):
    model = tiny_lm("qwen2_tied", dtype=torch.float32)
    data = lm_batches()
    ref = scores(model, data)
    path = tmp_path / "scores.f32"
    got = scores(model, data, scores_file=path)
    assert path.stat().st_size == 4 * sum(p.numel() for p in model.parameters())
    on_disk = torch.from_file(str(path), shared=False, size=path.stat().st_size // 4, dtype=torch.float32)
    offset = 0
    for n, v in ref.items():
        assert torch.equal(got[n], v), n
        assert torch.equal(on_disk[offset:offset + v.numel()].view(v.shape), v), n
        offset += v.numel()
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwrites"):
        scores(model, data, scores_file=path)
    assert path.read_bytes() == before
    mask = fisher_mask(model, data, density=0.01, num_samples=8, progress=False, scores_file=tmp_path / "m.f32")
    assert mask.k == int(0.01 * sum(p.numel() for p in model.parameters()))


def test_bad_score_locations_are_clear_errors(tmp_path):
    model = tiny_lm("llama")  # float64
    data = lm_batches(n_batches=1)
    with pytest.raises(ValueError, match="float32 scores"):
        scores(model, data, scores_file=tmp_path / "x.f32")
    assert not (tmp_path / "x.f32").exists()
    with pytest.raises(ValueError, match="scores_device must name a device"):
        scores(model, data, scores_device="gpu0")
    with pytest.raises(ValueError, match="contradicts"):
        scores(model, data, scores_device="cuda", scores_file=tmp_path / "y.f32")
