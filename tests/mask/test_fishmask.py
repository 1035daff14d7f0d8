"""FishMask: budget rule, forced head, builders, conversions, digest, files, bad input."""
import math
import os

import pytest
import torch

from fishkern import FishMask, MaskedAdamW
from fishkern._native import native_available
from fishkern.topk import global_topk_reference

needs_native = pytest.mark.skipif(not native_available(), reason="fishkern's native extension is not built")


def tiny_model(seed=0, classes=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(50, 16),
        torch.nn.Linear(16, 32),
        torch.nn.LayerNorm(32),
        torch.nn.Linear(32, classes),
    )


def scores_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) ** 4 for n, p in model.named_parameters()}


@needs_native
def test_fish_budget_rule_with_forced_head():
    model = tiny_model()
    scores = scores_for(model)
    total = sum(p.numel() for p in model.parameters())
    mask = FishMask.from_scores(scores, 0.1, force="3")  # "3" = the classifier Linear(32, 3)
    assert mask.k == math.floor(0.1 * total)
    assert mask.forced == ("3.weight", "3.bias")
    assert mask.k_of("3.weight") == 96 and mask.k_of("3.bias") == 3
    # the rest of the budget is the global top-k of the other parameters' scores
    others = [n for n in scores if not n.startswith("3.")]
    want = global_topk_reference([scores[n] for n in others], mask.k - 99)
    for n, w in zip(others, want):
        got = mask.indices.get(n, torch.empty(0, dtype=torch.int64))
        assert torch.equal(got.long(), w)
        assert got.dtype == torch.int32 or got.numel() == 0
    assert mask.provenance["method"] == "fish"
    assert mask.density == mask.k / total


@needs_native
def test_exclude_patterns_and_k_argument():
    model = tiny_model()
    mask = FishMask.from_scores(scores_for(model), k=200, exclude=["0.*", "*.bias"])
    assert mask.k == 200
    assert all(not n.startswith("0.") and not n.endswith("bias") for n in mask.indices)
    with pytest.raises(ValueError, match="both forced in and excluded"):
        FishMask.from_scores(scores_for(model), 0.5, force="3", exclude="3.weight")
    with pytest.raises(ValueError, match="more than the whole budget"):
        FishMask.from_scores(scores_for(model), 0.001, force="3")
    with pytest.raises(ValueError, match="exactly one of density"):
        FishMask.from_scores(scores_for(model))
    with pytest.raises(ValueError, match="density must be a fraction"):
        FishMask.from_scores(scores_for(model), 1.5)


@needs_native
def test_nan_scores_name_the_parameter():
    model = tiny_model()
    scores = scores_for(model)
    scores["1.weight"][3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN Fisher scores in \['1.weight'\]"):
        FishMask.from_scores(scores, 0.1)


@needs_native
def test_random_mask_is_seeded_and_exact():
    model = tiny_model()
    a = FishMask.random(model, 0.1, seed=3, force="3")
    b = FishMask.random(model, 0.1, seed=3, force="3")
    c = FishMask.random(model, 0.1, seed=4, force="3")
    total = sum(p.numel() for p in model.parameters())
    assert a == b and a.digest == b.digest
    assert a != c
    assert a.k == c.k == math.floor(0.1 * total)
    assert a.provenance["seed"] == 3
    assert a.provenance["model"] == {"class": "Sequential", "name_or_path": None, "num_parameters": total}


def test_bitfit_mask():
    model = tiny_model()
    mask = FishMask.bitfit(model, head="3")
    expect = {n for n, _ in model.named_parameters() if n.endswith("bias")} | {"3.weight"}
    assert set(mask.indices) == expect
    assert all(mask.k_of(n) == p.numel() for n, p in model.named_parameters() if n in expect)


def test_boolean_round_trip_and_model_indices():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    booleans = {n: torch.rand(p.shape, generator=g) < 0.2 for n, p in model.named_parameters()}
    booleans["2.bias"][:] = False
    mask = FishMask.from_boolean(booleans)
    back = mask.to_boolean()
    assert all(torch.equal(back[n], booleans[n]) for n in booleans)
    assert "2.bias" not in mask.indices
    idx = mask.mask_indices(model)
    assert len(idx) == len(list(model.parameters()))
    for (n, p), i in zip(model.named_parameters(), idx):
        assert torch.equal(i.long(), booleans[n].reshape(-1).nonzero().squeeze(1))
    assert FishMask.from_boolean(mask.to_boolean()) == mask


def test_mask_for_another_model_is_refused():
    mask = FishMask.bitfit(tiny_model(), head=())  # a Sequential has no head by name: biases only
    with pytest.raises(ValueError, match="has shape .* in the model"):
        mask.mask_indices(tiny_model(classes=5))
    with pytest.raises(ValueError, match="not in the model"):
        mask.mask_indices(torch.nn.Linear(3, 3))
    bigger = torch.nn.Sequential(*tiny_model(), torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="does not know"):
        mask.mask_indices(bigger)
    loose = mask.mask_indices(bigger, strict=False)
    assert len(loose) == 9 and loose[-1].numel() == 0 and loose[-2].numel() == 0  # the unknown Linear is frozen
    with pytest.raises(ValueError, match="another model"):
        MaskedAdamW(torch.nn.Linear(3, 3).named_parameters(), mask)


def test_digest_is_stable_and_independent_of_dtype_and_device():
    shapes = {"a": (2, 3), "b": (4,)}
    m1 = FishMask(shapes, {"a": torch.tensor([1, 4], dtype=torch.int32)})
    m2 = FishMask(shapes, {"a": torch.tensor([1, 4], dtype=torch.int64)})
    assert m1.digest == m2.digest
    # a golden value: changing the digest definition breaks saved masks and worker agreement
    assert m1.digest == "391fd7d04a03e59a250d4b5f82c0746748d1b59215b674bee2afaa5007af6148"
    assert FishMask(shapes, {"a": torch.tensor([1, 5])}).digest != m1.digest
    assert FishMask(shapes, {"b": torch.tensor([1, 3])}).digest != m1.digest


def test_invalid_mask_contents():
    with pytest.raises(ValueError, match="strictly increasing"):
        FishMask({"a": (5,)}, {"a": torch.tensor([3, 1])})
    with pytest.raises(ValueError, match="strictly increasing"):
        FishMask({"a": (5,)}, {"a": torch.tensor([1, 5])})
    with pytest.raises(ValueError, match="no shape"):
        FishMask({"a": (5,)}, {"b": torch.tensor([1])})
    with pytest.raises(TypeError, match="boolean"):
        FishMask.from_boolean({"a": torch.zeros(3)})


def test_save_load_round_trip_and_refusals(tmp_path):
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    mask = FishMask.from_boolean(
        {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()},
        forced=["3.bias"],
        provenance={"fisher": "empirical", "n_samples": 128, "seed": 7},
    )
    path = tmp_path / "mask.safetensors"
    mask.save(path)
    loaded = FishMask.load(path)
    assert loaded == mask and loaded.digest == mask.digest
    assert loaded.forced == ("3.bias",) and loaded.provenance["n_samples"] == 128
    assert loaded.shapes == mask.shapes
    with pytest.raises(FileExistsError, match="overwrite=True"):
        mask.save(path)
    mask.save(path, overwrite=True)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], "no temporary file may be left behind"

    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 20])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        FishMask.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        FishMask.load(garbage)
    with pytest.raises(FileNotFoundError):
        FishMask.load(tmp_path / "missing.safetensors")

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    small = FishMask({"a": (10,)}, {"a": torch.tensor([1, 3], dtype=torch.int32)})
    small.save(tmp_path / "small.safetensors")
    with safe_open(str(tmp_path / "small.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tampered = tmp_path / "tampered.safetensors"
    save_file({"indices/a": torch.tensor([2, 4], dtype=torch.int32)}, str(tampered), metadata=meta)
    with pytest.raises(ValueError, match="digest does not match"):
        FishMask.load(tampered)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="not a fishkern mask"):
        FishMask.load(foreign)


def test_optimizer_accepts_a_fishmask():
    m1, m2 = tiny_model(), tiny_model()
    mask = FishMask.bitfit(m1, head="3")
    o1 = MaskedAdamW(m1.named_parameters(), mask, lr=0.01)
    o2 = MaskedAdamW(m2.parameters(), mask.mask_indices(m2), lr=0.01)
    x = torch.randint(0, 50, (4, 6))
    for model, opt in ((m1, o1), (m2, o2)):
        model(x).sum().backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert o1.num_masked() == mask.k
    with pytest.raises(ValueError, match="named_parameters"):
        MaskedAdamW(m1.parameters(), mask)
