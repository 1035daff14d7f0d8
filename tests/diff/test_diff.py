"""SparseDiff: bit-exact apply / revert, file format, refusals (wrong base, corrupt file, other mask),
overwrite protection and atomic writes."""
import os

import pytest
import torch
from torch import nn

from fishkern import FishMask
from fishkern.diff import BaseMismatchError, CorruptFileError, SparseDiff, dense_nbytes, size_report
from fishkern.diff._io import bits


class OddNet(nn.Module):
    """Odd shapes, a 0-d parameter, an embedding and a conv weight (optionally channels_last)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 9)
        self.conv = nn.Conv2d(3, 5, 3)
        self.lin = nn.Linear(9, 13)
        self.norm = nn.LayerNorm(13)
        self.scale = nn.Parameter(torch.tensor(0.75))
        self.head = nn.Linear(13, 3)


def odd_model(seed=0, dtype=torch.float32, channels_last=False):
    torch.manual_seed(seed)
    m = OddNet().to(dtype)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        assert not m.conv.weight.is_contiguous()
    return m


def random_mask(model, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FishMask.from_boolean({n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()})


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_bits(a, b):
    return a.keys() == b.keys() and all(
        a[n].shape == b[n].shape and a[n].dtype == b[n].dtype and torch.equal(bits(a[n]), bits(b[n])) for n in a
    )


@torch.no_grad()
def train_masked_entries(model, mask, seed=1, special=True):
    """Move the masked entries like training would, plus the awkward cases of floating point:
    sign flips, large relative changes, tiny values, -0.0 <-> 0.0, inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    boolean = mask.to_boolean()
    for n, p in model.named_parameters():
        sel = boolean[n].reshape(-1).nonzero().squeeze(1)
        if not sel.numel():
            continue
        flat = p.detach().float().reshape(-1).clone()
        step = torch.randn(sel.numel(), generator=g) * 0.05
        flat[sel] = flat[sel] - step
        if special and sel.numel() >= 6:
            flat[sel[0]] = -flat[sel[0]] * 3.7 - 1e-3  # sign flip, large change
            flat[sel[1]] = 1e-30 if p.dtype != torch.bfloat16 else 1e-20
            flat[sel[2]] = float("inf")
            flat[sel[3]] = float("nan")
            flat[sel[4]] = -0.0
            flat[sel[5]] = flat[sel[5]] * 1e6
        new = flat.to(p.dtype).reshape(p.shape)
        p.copy_(new)


DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", ["delta", "absolute"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_apply_revert_bit_exact(tmp_path, dtype, kind, channels_last):
    model = odd_model(dtype=dtype, channels_last=channels_last)
    with torch.no_grad():  # a -0.0 in the base, at a masked entry
        model.lin.weight[0, 0] = -0.0
    mask = random_mask(model)
    base = snapshot(model)
    train_masked_entries(model, mask)
    tuned = snapshot(model)
    diff = SparseDiff.from_models(base, model, mask, kind=kind, step=123, epoch=4, extra={"task": "rte"})
    assert diff.k == mask.k and diff.mask_digest == mask.digest
    if kind == "delta":
        assert diff.num_fixups > 0  # NaN / inf / sign flips need them
        assert all(v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) for v in diff.values.values())
    path = tmp_path / "task.diff.safetensors"
    nbytes = diff.save(path)
    assert nbytes == os.path.getsize(path) == diff.file_bytes()
    loaded = SparseDiff.load(path, mask=mask)
    assert (loaded.step, loaded.epoch, loaded.extra, loaded.kind) == (123, 4, {"task": "rte"}, kind)
    assert loaded.indices.keys() == diff.indices.keys()

    # revert the tuned model (a module) in place, apply again, several times: always exact
    for d in (diff, loaded):
        d.revert_(model, mask=mask)
        assert same_bits(snapshot(model), base)
        d.apply_(model)
        assert same_bits(snapshot(model), tuned)
    # without the mask: the entries that changed, a subset of the mask's (any memory layout)
    changed = SparseDiff.from_models(base, model, kind=kind)
    assert 0 < changed.k <= mask.k
    for n, idx in changed.indices.items():
        assert bool(torch.isin(idx.long(), mask.indices[n].long()).all())
    changed.revert_(model)
    assert same_bits(snapshot(model), base)
    changed.apply_(model)
    assert same_bits(snapshot(model), tuned)
    # onto a fresh base model (named tensors) with only the entries checked
    fresh = odd_model(dtype=dtype, channels_last=channels_last)
    with torch.no_grad():
        fresh.lin.weight[0, 0] = -0.0
    loaded.apply_(dict(fresh.named_parameters()), verify="entries")
    assert same_bits(snapshot(fresh), tuned)
    if channels_last:
        assert not fresh.conv.weight.is_contiguous()  # written in place, layout kept


def test_diff_of_changed_entries_without_mask():
    model = odd_model()
    base = snapshot(model)
    with torch.no_grad():
        model.conv.weight[1, 2, 0, 1] += 1.0
        model.scale.mul_(2)
        model.head.bias[2] = -model.head.bias[2]
    diff = SparseDiff.from_models(base, model, kind="absolute")
    assert diff.k == 3 and diff.mask_digest is None
    assert set(diff.indices) == {"conv.weight", "scale", "head.bias"}
    assert diff.indices["conv.weight"].tolist() == [1 * 27 + 2 * 9 + 0 * 3 + 1]
    assert diff.indices["conv.weight"].dtype == torch.int32
    tuned = snapshot(model)
    diff.revert_(model)
    assert same_bits(snapshot(model), base)
    diff.apply_(model)
    assert same_bits(snapshot(model), tuned)
    with pytest.raises(ValueError, match="not made with a mask"):
        diff.apply_(odd_model(), mask=random_mask(model))


def test_changes_outside_the_mask_are_refused():
    model = odd_model()
    mask = random_mask(model)
    base = snapshot(model)
    train_masked_entries(model, mask, special=False)
    outside = (~mask.to_boolean()["lin.weight"]).reshape(-1).nonzero()[0, 0]
    with torch.no_grad():
        model.lin.weight.view(-1)[outside] += 1
    with pytest.raises(ValueError, match="1 entries outside the mask"):
        SparseDiff.from_models(base, model, mask)
    diff = SparseDiff.from_models(base, model, mask, check_outside_mask=False)
    assert diff.k == mask.k


def test_wrong_base_is_refused_and_the_model_is_unchanged():
    model = odd_model()
    mask = random_mask(model)
    base = snapshot(model)
    train_masked_entries(model, mask, special=False)
    diff = SparseDiff.from_models(base, model, mask)

    # same shapes, different weights: refused with the full check and with the entries check
    other = odd_model(seed=5)
    before = snapshot(other)
    for verify in ("auto", "full", "entries"):
        with pytest.raises(BaseMismatchError, match="not the diff's base model"):
            diff.apply_(other, verify=verify)
        assert same_bits(snapshot(other), before)
    # same weights at the k entries, different elsewhere: only the full check can tell
    near = odd_model()
    with torch.no_grad():
        near.lin.weight.view(-1)[(~mask.to_boolean()["lin.weight"]).reshape(-1).nonzero()[0, 0]] += 1
    before = snapshot(near)
    with pytest.raises(BaseMismatchError, match="content sha256"):
        diff.apply_(near)
    assert same_bits(snapshot(near), before)
    diff.apply_(near, verify="entries")  # documented: entries only

    # different shapes
    class Other(OddNet):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(13, 4)

    wrong = Other()
    before = snapshot(wrong)
    with pytest.raises(BaseMismatchError, match="'head.weight' is float32 \\(4, 13\\)"):
        diff.apply_(wrong)
    assert same_bits(snapshot(wrong), before)
    wrong_dtype = odd_model(dtype=torch.float64)
    with pytest.raises(BaseMismatchError, match="float64"):
        diff.apply_(wrong_dtype)
    missing = {n: t for n, t in odd_model().named_parameters() if n != "scale"}
    with pytest.raises(BaseMismatchError, match="missing"):
        diff.apply_(missing)

    # applied twice, reverted on the base: refused, nothing written
    tuned = snapshot(model)
    with pytest.raises(BaseMismatchError, match="already applied"):
        diff.apply_(model)
    assert same_bits(snapshot(model), tuned)
    fresh = odd_model()
    with pytest.raises(BaseMismatchError, match="already reverted"):
        diff.revert_(fresh)
    assert same_bits(snapshot(fresh), base)


def test_diff_for_another_mask_is_refused(tmp_path):
    model = odd_model()
    mask = random_mask(model, seed=0)
    other = random_mask(model, seed=1)
    base = snapshot(model)
    train_masked_entries(model, mask, special=False)
    diff = SparseDiff.from_models(base, model, mask)
    path = tmp_path / "d.safetensors"
    diff.save(path)
    with pytest.raises(ValueError, match="another mask"):
        SparseDiff.load(path, mask=other)
    target = odd_model()
    before = snapshot(target)
    with pytest.raises(ValueError, match="another mask"):
        diff.apply_(target, mask=other)
    assert same_bits(snapshot(target), before)
    diff.apply_(target, mask=mask)


def _write_diff(tmp_path, name="d.safetensors"):
    model = odd_model()
    mask = random_mask(model)
    base = snapshot(model)
    train_masked_entries(model, mask, special=False)
    diff = SparseDiff.from_models(base, model, mask)
    path = tmp_path / name
    diff.save(path)
    return diff, path


def test_truncated_corrupt_and_foreign_files_are_refused(tmp_path):
    diff, path = _write_diff(tmp_path)
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-7])
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        SparseDiff.load(truncated)
    for at in (header + 3, len(data) - 1, (header + len(data)) // 2):  # flipped bits in the tensor data
        bad = bytearray(data)
        bad[at] ^= 0x10
        corrupt = tmp_path / f"corrupt{at}.safetensors"
        corrupt.write_bytes(bytes(bad))
        with pytest.raises(CorruptFileError, match="checksum"):
            SparseDiff.load(corrupt)
    text = data[:header].replace(b'"k":"', b'"k":"9', 1)  # a digit added to the metadata: still readable
    assert text != data[:header]
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(len(text[8:]).to_bytes(8, "little") + text[8:] + data[header:])
    with pytest.raises(CorruptFileError, match="checksum"):
        SparseDiff.load(tampered)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(100))
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        SparseDiff.load(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(CorruptFileError, match="not a fishkern diff"):
        SparseDiff.load(foreign)
    with pytest.raises(FileNotFoundError):
        SparseDiff.load(tmp_path / "missing.safetensors")
    assert isinstance(CorruptFileError("x"), ValueError)


def test_overwrite_protection_and_atomic_writes(tmp_path, monkeypatch):
    diff, path = _write_diff(tmp_path)
    original = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        diff.save(path)
    assert path.read_bytes() == original
    diff.save(path, overwrite=True)
    SparseDiff.load(path)
    original = path.read_bytes()

    import safetensors.torch

    real_save = safetensors.torch.save_file

    def crash_mid_write(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the process dies with half the file written
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_mid_write)
    new = tmp_path / "new.safetensors"
    with pytest.raises(OSError, match="simulated crash"):
        diff.save(new)
    assert not new.exists()
    with pytest.raises(OSError, match="simulated crash"):
        diff.save(path, overwrite=True)
    assert path.read_bytes() == original  # the old file is intact
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)

    def failing_replace(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="before the rename"):
        diff.save(path, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == original
    SparseDiff.load(path)
    assert sorted(os.listdir(tmp_path)) == ["d.safetensors"], "no temporary or partial file may be left"


def test_sizes_scale_with_k(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 255))
    mask = random_mask(model, density=0.005)
    base = snapshot(model)
    train_masked_entries(model, mask, special=False)
    diff = SparseDiff.from_models(base, model, mask)
    path = tmp_path / "d.safetensors"
    diff.save(path)
    report = size_report(path)
    assert report == size_report(diff)
    assert report["k"] == mask.k and report["dense_bytes"] == dense_nbytes(model) == 4 * report["numel"]
    # 4 bytes of int32 index + 4 bytes of fp32 delta per entry, plus a header of about 2 KB
    assert 8 * mask.k < report["diff_bytes"] < 8 * mask.k + 4096
    assert report["ratio"] > 20
    absolute = SparseDiff.from_models(base, model, mask, kind="absolute", content_hash=False)
    assert 12 * mask.k < absolute.file_bytes() < 12 * mask.k + 4096
    with pytest.raises(ValueError, match="no content hash"):
        absolute.revert_(model, verify="full")
    absolute.revert_(model)  # "auto": entries only
    assert same_bits(snapshot(model), base)
