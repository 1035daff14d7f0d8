"""Issue 10: random bit flips and truncations of every file type fishkern writes (mask, diff,
checkpoint link, checkpoint base, manifest). Each damaged file is either refused with a fishkern
error (``CorruptFileError`` / ``CheckpointChainError``) or loads with content identical to the
original: never changed content, never a bare Python exception. Bounded and seeded: a few hundred
mutations per type, seconds in all."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fishkern import FishMask, MaskedAdamW, SparseCheckpointer, SparseDiff
from fishkern.diff import CheckpointChainError, CorruptFileError
from test_hardening_files import model_mask as files_model_mask
from test_hardening_files import tiny_model

FLIPS, CUTS = 250, 50
REFUSALS = (CorruptFileError, CheckpointChainError)


def mutations(data: bytes, seed: int):
    rng = random.Random(seed)
    for _ in range(FLIPS):
        b = bytearray(data)
        at, bit = rng.randrange(len(b)), rng.randrange(8)
        b[at] ^= 1 << bit
        yield f"bit {bit} of byte {at} flipped", bytes(b)
    for _ in range(CUTS):
        n = rng.randrange(len(data))
        yield f"truncated to {n} of {len(data)} bytes", data[:n]


def fingerprint(x):
    """A comparable, bitwise picture of loaded content (tensors by dtype, shape and bytes)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().contiguous().reshape(-1)
        return ("tensor", str(x.dtype), tuple(x.shape), t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if isinstance(x, FishMask):
        return ("mask", fingerprint(x.shapes), fingerprint(x.indices), x.forced, fingerprint(x.provenance))
    if isinstance(x, SparseDiff):
        return ("diff", fingerprint(vars(x)))
    if isinstance(x, np.ndarray):
        return ("array", str(x.dtype), x.shape, x.tobytes())
    if isinstance(x, dict):
        return ("dict", tuple((k, fingerprint(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(fingerprint(v) for v in x))
    if isinstance(x, float) and x != x:
        return ("nan",)
    return (type(x).__name__, x)


def fuzz(path: Path, load, seed: int) -> dict[str, int]:
    """Mutate ``path`` in turn and ``load()`` each time; the original bytes are restored at the end."""
    data = path.read_bytes()
    expected = fingerprint(load())
    counts = {"refused": 0, "identical": 0}
    try:
        for what, bad in mutations(data, seed):
            path.write_bytes(bad)
            try:
                got = load()
            except REFUSALS:
                counts["refused"] += 1
                continue
            except Exception as e:  # a bare Python exception is a defect
                pytest.fail(f"{path.name}, {what}: {type(e).__name__}: {str(e)[:300]}")
            assert fingerprint(got) == expected, f"{path.name}, {what}: loaded with changed content"
            counts["identical"] += 1
    finally:
        path.write_bytes(data)
    assert counts["refused"] > 0  # the mutations reached the checks
    return counts


def model_mask(model: nn.Module) -> FishMask:
    return files_model_mask(model, note="fuzz")


@pytest.fixture
def keep_rng():
    """load_into restores the generators of the checkpoint: put the test's back afterwards."""
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    yield
    torch.set_rng_state(saved[0])
    random.setstate(saved[1])
    np.random.set_state(saved[2])


def test_fuzz_mask_file(tmp_path):
    path = tmp_path / "mask.safetensors"
    model_mask(tiny_model()).save(path)
    fuzz(path, lambda: FishMask.load(path), seed=1)


def test_fuzz_diff_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(5, 6, generator=g), "a.bias": torch.randn(5, generator=g), "n": torch.tensor(3)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["a.weight"][1:3] += 0.5
    base["a.weight"][0, 0], tuned["a.weight"][0, 0] = 1e30, 1.0  # a fix-up
    path = tmp_path / "d.safetensors"
    SparseDiff.from_models(base, tuned, step=3, extra={"note": "fuzz", "xs": [1, 2.5]}).save(path)
    fuzz(path, lambda: SparseDiff.load(path), seed=2)


def _chain(directory: Path) -> None:
    model = tiny_model()
    mask = model_mask(model)
    opt = MaskedAdamW(model.named_parameters(), mask, lr=1e-2)
    loss = model(torch.randn(8, 6)).square().mean()
    loss.backward()
    opt.step()
    SparseCheckpointer(directory, model).save(model, opt, mask, step=1, epoch=0,
                                              extra={"loss": 0.5, "t": torch.arange(3), "k": (1, "a")})


def _load_all(directory: Path):
    """Everything a chain gives back: the manifest, the model, the optimizer, step, epoch, extras,
    the mask and the generators' states."""
    ck = SparseCheckpointer(directory)
    target = tiny_model(seed=9)
    opt = MaskedAdamW(target.named_parameters(), model_mask(tiny_model()), lr=1e-2)
    st = ck.load_into(target, opt, 0)
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    return (ck._manifest, target.state_dict(), opt.state_dict(), st.step, st.epoch, st.extra, st.mask, st.entry, rng)


@pytest.mark.parametrize("which", ["link", "base", "manifest"])
def test_fuzz_checkpoint_files(tmp_path, keep_rng, which):
    d = tmp_path / "chain"
    _chain(d)
    import json

    m = json.loads((d / "manifest.json").read_text())
    name = {"link": m["checkpoints"][0]["file"], "base": m["base"]["file"], "manifest": "manifest.json"}[which]
    fuzz(d / name, lambda: _load_all(d), seed={"link": 3, "base": 4, "manifest": 5}[which])
    shutil.rmtree(d)
