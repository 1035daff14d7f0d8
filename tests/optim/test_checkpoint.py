"""SparseCheckpointer: sparse training with a mask recomputed every E epochs, a checkpoint per
epoch holding only what changed, bit-exact rebuilds, bit-identical resumption, broken chains and
crashes while writing."""
import json
import os
import shutil

import pytest
import torch
from torch import nn

from fishkern import FishMask, MaskedAdamW, MaskedSGD
from fishkern.diff import BaseMismatchError, CheckpointChainError, SparseCheckpointer
from fishkern.diff._io import bits

EPOCHS = 6


def make_model(seed=0):
    """A tiny conv net with BatchNorm (buffers that change every step) and dropout (random numbers)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(5 * 6 * 6, 7),
        nn.ReLU(),
        nn.Linear(7, 3),
    )


def batches(epoch):
    g = torch.Generator().manual_seed(1000 + epoch)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]


def mask_for(model, epoch, E, density=0.2):
    """A random mask, recomputed every E epochs (E=None: fixed), as in the paper's Table 4."""
    seed = 0 if E is None else epoch // E
    g = torch.Generator().manual_seed(seed)
    return FishMask.from_boolean(
        {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()},
        provenance={"method": "random", "seed": seed},
    )


def make_opt(opt_cls, model, mask):
    if opt_cls is MaskedAdamW:
        return MaskedAdamW(model.named_parameters(), mask, lr=1e-2, weight_decay=0.01)
    return MaskedSGD(model.named_parameters(), mask, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def state_copy(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def same_bits(a, b):
    return a.keys() == b.keys() and all(
        a[n].shape == b[n].shape and a[n].dtype == b[n].dtype and torch.equal(bits(a[n]), bits(b[n])) for n in a
    )


def opt_tensors(opt):
    sd = opt.state_dict()
    return {(pid, k): v.clone() for pid, st in sd["state"].items() for k, v in st.items()}


def train(model, opt_cls, E, start, end, *, mask=None, opt=None, ckpt=None, snapshots=None, overwrite=False):
    sched = None
    for epoch in range(start, end):
        if opt is None or (E is not None and epoch % E == 0):
            mask = mask_for(model, epoch, E)
            opt = make_opt(opt_cls, model, mask)
        model.train()
        for x, y in batches(epoch):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ckpt is not None:
            ckpt.save(model, opt, mask, step=(epoch + 1) * 3, epoch=epoch, extra={"loss": loss.item(), "E": E}, overwrite=overwrite)
        if snapshots is not None:
            snapshots.append((state_copy(model), mask))
    return mask, opt, sched


@pytest.mark.parametrize("opt_cls", [MaskedAdamW, MaskedSGD], ids=["adamw", "sgd"])
@pytest.mark.parametrize("E", [1, 2, None], ids=["E1", "E2", "fixed"])
def test_chain_rebuilds_bit_exactly_and_resumes_bit_identically(tmp_path, opt_cls, E):
    directory = tmp_path / "chain"
    model = make_model()
    base = state_copy(model)
    torch.manual_seed(123)  # dropout's random numbers
    ck = SparseCheckpointer(directory, model)
    snaps = []
    _, opt, _ = train(model, opt_cls, E, 0, EPOCHS, ckpt=ck, snapshots=snaps)
    final, final_opt = state_copy(model), opt_tensors(opt)
    assert len(ck) == EPOCHS

    # every checkpoint rebuilds bit-exactly, from a checkpointer that only has the directory
    reopened = SparseCheckpointer(directory)
    for i, (snap, mask) in enumerate(snaps):
        assert same_bits(reopened.rebuild(i), snap)
        assert reopened.mask_at(i) == mask
    assert same_bits(reopened.rebuild(-1), final)

    # each checkpoint stores only what changed: parameter entries of the masks in use since the
    # previous checkpoint (an entry trained under an old mask is not stored again), buffers whole
    params = dict(model.named_parameters())
    for i, (snap, mask) in enumerate(snaps):
        link = reopened._read_link(i)
        allowed = mask.to_boolean()
        for name, (idx, _) in link.sparse.items():
            assert name in params
            assert bool(allowed[name].reshape(-1)[idx.long()].all())
        assert set(link.dense) <= {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
        prev = snaps[i - 1][0] if i else base
        changed = sum(int((bits(snap[n]) != bits(prev[n])).sum()) for n in snap)
        assert reopened.checkpoints[i]["changed"] == changed
    stored_masks = [e["mask_from"] for e in reopened.checkpoints]
    expected = {1: [0, 1, 2, 3, 4, 5], 2: [0, 0, 2, 2, 4, 4], None: [0] * 6}[E]
    assert stored_masks == expected  # a mask is stored once, where it changed

    # resume from the middle checkpoint into a differently initialised model, with the RNG scrambled
    mid = 2
    model2 = make_model(seed=77)
    mask2 = reopened.mask_at(mid)
    opt2 = make_opt(opt_cls, model2, mask2)
    torch.manual_seed(999)
    state = reopened.load_into(model2, opt2, mid)
    assert (state.index, state.epoch, state.step, state.extra["E"]) == (mid, mid, 9, E)
    assert state.mask == mask2
    assert same_bits(state_copy(model2), snaps[mid][0])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        reopened.save(model2, opt2, mask2)  # would silently drop checkpoints 3..5
    assert len(reopened) == EPOCHS
    _, opt2, _ = train(model2, opt_cls, E, mid + 1, EPOCHS, mask=mask2, opt=opt2, ckpt=reopened, overwrite=True)
    assert same_bits(state_copy(model2), final)
    got = opt_tensors(opt2)
    assert got.keys() == final_opt.keys() and all(torch.equal(got[k], final_opt[k]) for k in got)
    # the rewritten tail of the chain is the same training, the replaced files are gone
    assert len(reopened) == EPOCHS
    for i, (snap, _) in enumerate(snaps):
        assert same_bits(reopened.rebuild(i), snap)
    files = {f for f in os.listdir(directory) if f.startswith("ckpt-")}
    assert files == {e["file"] for e in reopened.checkpoints}


def test_only_changes_are_stored_and_sizes_are_small(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(257, 511), nn.ReLU(), nn.Linear(511, 129))
    ck = SparseCheckpointer(tmp_path / "c", model, save_rng=False)
    g = torch.Generator().manual_seed(0)
    for epoch in range(4):
        mask = mask_for(model, epoch, 2, density=0.005)
        opt = MaskedAdamW(model.named_parameters(), mask, lr=1e-3)
        for _ in range(2):
            x = torch.randn(16, 257, generator=g)
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        entry = ck.save(model, opt, mask, epoch=epoch)
        assert entry["changed"] <= mask.k
    sizes = ck.sizes()
    dense = sizes["dense_bytes"]
    assert dense == 4 * sum(p.numel() for p in model.parameters())
    assert sizes["base_bytes"] > dense  # the base is one full checkpoint, written once
    # index + value + 8 bytes of AdamW state per entry (+ the mask when it changed) + header
    for b in sizes["checkpoint_bytes"]:
        assert b < dense / 20


def test_missing_corrupt_or_foreign_links_are_clear_errors(tmp_path):
    directory = tmp_path / "chain"
    model = make_model()
    ck = SparseCheckpointer(directory, model)
    snaps = []
    train(model, MaskedSGD, 1, 0, 5, ckpt=ck, snapshots=snaps)
    files = [directory / e["file"] for e in ck.checkpoints]

    # a file replaced by another valid link of the chain
    saved = files[2].read_bytes()
    shutil.copy(files[1], files[2])
    with pytest.raises(CheckpointChainError, match="checkpoint 2 .*id/parent mismatch"):
        ck.rebuild(3)
    files[2].write_bytes(saved)

    # corrupt bytes, truncated file, missing file: the later checkpoints fail, earlier ones rebuild
    data = bytearray(saved)
    data[-3] ^= 0x01
    files[2].write_bytes(bytes(data))
    with pytest.raises(CheckpointChainError, match="checkpoint 2 .* is corrupt .*checksum.* 2..4 cannot be rebuilt; checkpoints 0..1 can"):
        ck.rebuild(4)
    files[2].write_bytes(saved[: len(saved) // 2])
    with pytest.raises(CheckpointChainError, match="truncated or corrupt"):
        ck.rebuild(2)
    files[2].unlink()
    with pytest.raises(CheckpointChainError, match="checkpoint 2 .* is missing"):
        SparseCheckpointer(directory).rebuild(-1)
    assert same_bits(ck.rebuild(1), snaps[1][0])
    # loading a broken checkpoint changes nothing
    target = make_model(seed=3)
    before = state_copy(target)
    with pytest.raises(CheckpointChainError):
        ck.load_into(target, None, 3)
    assert same_bits(state_copy(target), before)
    files[2].write_bytes(saved)
    assert same_bits(ck.rebuild(4), snaps[4][0])

    # a missing base file, a damaged manifest
    base_file = directory / ck._manifest["base"]["file"]
    base_bytes = base_file.read_bytes()
    base_file.unlink()
    with pytest.raises(CheckpointChainError, match="base cannot be read"):
        SparseCheckpointer(directory).rebuild(0)
    base_file.write_bytes(base_bytes)
    manifest = directory / "manifest.json"
    manifest.write_text(manifest.read_text()[:-10])
    with pytest.raises(CheckpointChainError, match="manifest"):
        SparseCheckpointer(directory)


def test_crash_while_writing_leaves_the_chain_intact(tmp_path, monkeypatch):
    directory = tmp_path / "chain"
    model = make_model()
    ck = SparseCheckpointer(directory, model)
    snaps = []
    mask, opt, _ = train(model, MaskedAdamW, 2, 0, 2, ckpt=ck, snapshots=snaps)
    manifest = (directory / "manifest.json").read_text()
    listing = sorted(os.listdir(directory))

    import safetensors.torch

    real_save = safetensors.torch.save_file

    def crash_mid_write(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 3)
        raise OSError("simulated crash while writing")

    with torch.no_grad():
        model[5].weight.view(-1)[mask.indices["5.weight"][0].long()] += 1
    monkeypatch.setattr(safetensors.torch, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="simulated crash"):
        ck.save(model, opt, mask, epoch=2)
    monkeypatch.undo()
    assert sorted(os.listdir(directory)) == listing, "no partial or temporary file may be left"
    assert (directory / "manifest.json").read_text() == manifest

    def failing_replace(src, dst):  # the checkpoint is written, the manifest update dies
        raise OSError("simulated crash before the manifest rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="manifest rename"):
        ck.save(model, opt, mask, epoch=2)
    monkeypatch.undo()
    assert sorted(os.listdir(directory)) == listing
    assert (directory / "manifest.json").read_text() == manifest
    reopened = SparseCheckpointer(directory)
    assert len(reopened) == 2
    for i, (snap, _) in enumerate(snaps):
        assert same_bits(reopened.rebuild(i), snap)
    # and the chain goes on: the failed saves left no trace in the checkpointer's state either
    entry = ck.save(model, opt, mask, epoch=2)
    assert entry["index"] == 2 and entry["changed"] >= 1
    assert same_bits(SparseCheckpointer(directory).rebuild(2), state_copy(model))


def test_directory_reuse_base_checks_and_overwrite(tmp_path):
    directory = tmp_path / "chain"
    model = make_model()
    ck = SparseCheckpointer(directory, model)
    train(model, MaskedSGD, None, 0, 2, ckpt=ck)
    old_files = set(os.listdir(directory))

    # reopening with the right base works; with another base, or another architecture, it does not
    SparseCheckpointer(directory, make_model())
    with pytest.raises(BaseMismatchError, match="different weights"):
        SparseCheckpointer(directory, make_model(seed=1))
    with pytest.raises(BaseMismatchError, match="does not match the chain's model"):
        SparseCheckpointer(directory, nn.Linear(3, 3))
    with pytest.raises(ValueError, match="needs base="):
        SparseCheckpointer(tmp_path / "new")

    # saving a model of another architecture, or loading into one, is refused and changes nothing
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(BaseMismatchError):
        ck.save(other)
    before = state_copy(other)
    with pytest.raises(BaseMismatchError):
        ck.load_into(other)
    assert same_bits(state_copy(other), before)
    # an optimizer built with another mask: refused by its load_state_dict, the model is unchanged
    target = make_model(seed=4)
    before = state_copy(target)
    wrong = make_opt(MaskedSGD, target, mask_for(target, 0, 1, density=0.5))
    with pytest.raises(ValueError, match="different mask"):
        ck.load_into(target, wrong, 1)
    assert same_bits(state_copy(target), before)

    # overwrite=True starts a new chain and removes the old chain's files (only those)
    (directory / "notes.txt").write_text("mine")
    fresh = SparseCheckpointer(directory, make_model(seed=1), overwrite=True)
    assert len(fresh) == 0
    left = set(os.listdir(directory))
    assert "notes.txt" in left and not (left & (old_files - {"manifest.json"}))

    # store_base=False: the base must be given to reopen the chain
    d2 = tmp_path / "nobase"
    m = make_model()
    SparseCheckpointer(d2, m, store_base=False).save(m)
    assert not [f for f in os.listdir(d2) if f.startswith("base-")]
    with pytest.raises(ValueError, match="pass base="):
        SparseCheckpointer(d2)
    assert same_bits(SparseCheckpointer(d2, make_model()).rebuild(0), state_copy(m))
    manifest = json.loads((d2 / "manifest.json").read_text())
    assert manifest["checkpoints"][0]["changed"] == 0


def test_extra_state_round_trip(tmp_path):
    model = make_model()
    ck = SparseCheckpointer(tmp_path / "c", model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    extra = {
        "scheduler": sched.state_dict(),
        "history": [1.5, float("inf"), (2, "a")],
        7: {"ids": torch.arange(5, dtype=torch.int16)},
        "__tuple__": None,
        "dtype": torch.bfloat16,
    }
    ck.save(model, extra=extra, step=3)
    state = SparseCheckpointer(tmp_path / "c").load_into(make_model(seed=2))
    got = state.extra
    assert got["scheduler"] == sched.state_dict()
    assert got["history"] == [1.5, float("inf"), (2, "a")]
    assert torch.equal(got[7]["ids"], torch.arange(5, dtype=torch.int16)) and got[7]["ids"].dtype == torch.int16
    assert got["__tuple__"] is None and got["dtype"] is torch.bfloat16
    assert state.step == 3 and state.epoch is None and state.mask is None
    with pytest.raises(ValueError, match="without an optimizer state"):
        ck.load_into(model, make_opt(MaskedSGD, model, mask_for(model, 0, None)), 0)
    with pytest.raises(TypeError, match="cannot store"):
        ck.save(model, extra={"bad": object()})
