"""Issue 10, the file items: hostile and damaged files, half-applied loads, races and leftovers.

Crafted files are built here with their checksums (and mask digests) recomputed, so that only
content validation can refuse them. Races run in real processes (bounded loops, barrier files).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fishkern import FishMask, MaskedAdamW, SparseCheckpointer, SparseDiff
from fishkern.diff import CheckpointChainError, CorruptFileError
from fishkern.diff._io import bits, file_checksum, structure_hash

DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested 100,000 levels
HUGE = 65 * 2**20  # bytes of metadata: over the 64 MiB bound


# ------------------------------------------------------------------------------------- helpers
def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def model_mask(model: nn.Module, **provenance) -> FishMask:
    g = torch.Generator().manual_seed(5)
    return FishMask.from_boolean({n: torch.rand(p.shape, generator=g) < 0.4 for n, p in model.named_parameters()},
                                 forced=["2.bias"], provenance={"method": "random", "seed": 5, **provenance})


def train_step(model: nn.Module, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(8, 6, generator=g)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def state_copy(model: nn.Module) -> dict:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and a[n].shape == b[n].shape
                                        and torch.equal(bits(a[n]), bits(b[n])) for n in a)


def opt_state(opt) -> dict:
    return {(pid, k): v.clone() for pid, st in opt.state_dict()["state"].items() for k, v in st.items()}


def make_chain(directory: Path, links: int = 2):
    """A chain of ``links`` checkpoints with optimizer state, extras, RNG and the mask (in link 0)."""
    model = tiny_model()
    mask = model_mask(model)
    opt = MaskedAdamW(model.named_parameters(), mask, lr=1e-2)
    ck = SparseCheckpointer(directory, model)
    for e in range(links):
        train_step(model, opt, e)
        ck.save(model, opt, mask, step=e + 1, epoch=e, extra={"loss": 0.5 + e, "t": torch.arange(3)})
    return model, mask


def read_st(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def write_st(path: Path, tensors: dict, meta: dict, *, checksum: bool = True) -> None:
    meta = dict(meta)
    if checksum:
        meta["checksum"] = file_checksum(meta, tensors)
    save_file(tensors, str(path), metadata=meta)


def mask_digest(shapes: dict, indices: dict) -> str:
    """FishMask.digest's formula, on raw file values."""
    h = hashlib.sha256(b"fishkern-fishmask-v1")
    for name in sorted(shapes):
        n = 1
        for s in shapes[name]:
            n *= s
        h.update(name.encode())
        h.update(json.dumps(list(shapes[name])).encode())
        h.update(int(n).to_bytes(8, "little"))
        h.update(indices.get(name, torch.empty(0, dtype=torch.int64)).to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def recompute_mask_meta(tensors: dict, meta: dict) -> None:
    """After an edit: the digest (where the edited values allow computing it) and the checksum."""
    try:
        shapes = json.loads(meta["shapes"])
        idx = {k[len("indices/"):]: t for k, t in tensors.items() if k.startswith("indices/")}
        meta["digest"] = mask_digest(shapes, idx)
    except Exception:  # values the formula cannot take: the loader must refuse them before the digest
        pass


def manifest_checksum(m: dict) -> str:
    """The manifest checksum as documented: sha256 of b"fishkern-json-v1" + canonical JSON of the rest."""
    body = {k: v for k, v in m.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(b"fishkern-json-v1" + text.encode()).hexdigest()


def load_manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def save_manifest(d: Path, m: dict, *, checksum: bool = True) -> None:
    if checksum:
        m["checksum"] = manifest_checksum(m)
    (d / "manifest.json").write_text(json.dumps(m, indent=1))


def rewrite_link(d: Path, j: int, edit) -> None:
    """Edit link j's (tensors, meta); recompute its checksum and the manifest's size and checksum."""
    m = load_manifest(d)
    path = d / m["checkpoints"][j]["file"]
    tensors, meta = read_st(path)
    edit(tensors, meta)
    write_st(path, tensors, meta)
    m["checkpoints"][j]["bytes"] = path.stat().st_size
    save_manifest(d, m)


def rewrite_base(d: Path, edit) -> None:
    m = load_manifest(d)
    path = d / m["base"]["file"]
    tensors, meta = read_st(path)
    edit(tensors, meta)
    write_st(path, tensors, meta)
    m["base"]["bytes"] = path.stat().st_size
    save_manifest(d, m)


def run_child(code: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


def start_child(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chains") / "chain"
    make_chain(d)
    return d


@pytest.fixture
def chain(chain_dir, tmp_path) -> Path:
    d = tmp_path / "chain"
    shutil.copytree(chain_dir, d)
    return d


def fresh_target():
    target = tiny_model(seed=9)
    return target, MaskedAdamW(target.named_parameters(), model_mask(tiny_model()), lr=1e-2)


def load_everything(d: Path):
    """What a user does with a chain: open it, rebuild and load every checkpoint (model, optimizer,
    extras, mask, RNG) into a fresh model and optimizer."""
    ck = SparseCheckpointer(d)
    target, opt = fresh_target()
    for i in range(len(ck)):
        ck.rebuild(i)
        ck.mask_at(i)
        ck.load_into(target, opt, i)
    return target, opt


# ------------------------------------------------------------------- 1. paths from the manifest
@pytest.mark.parametrize("where", ["link", "base"])
@pytest.mark.parametrize("bad", ["../precious.txt", "ABSOLUTE", "sub/../../precious.txt", "./../precious.txt"])
def test_manifest_file_names_leading_out_are_refused_and_nothing_is_deleted(chain, where, bad):
    precious = chain.parent / "precious.txt"
    precious.write_text("mine")
    name = str(precious) if bad == "ABSOLUTE" else bad
    m = load_manifest(chain)
    if where == "link":
        m["checkpoints"][0]["file"] = name
    else:
        m["base"]["file"] = name
    save_manifest(chain, m)
    field = "checkpoints[0].file" if where == "link" else "base.file"
    with pytest.raises(CheckpointChainError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_everything(chain)
    # overwrite=True replaces the unreadable manifest but deletes none of the files it names
    with pytest.warns(UserWarning, match="left in place"):
        SparseCheckpointer(chain, base=tiny_model(), overwrite=True)
    assert precious.read_text() == "mine"


def test_load_into_never_reads_a_link_of_another_directory(tmp_path):
    a, other = tmp_path / "a", tmp_path / "other"
    make_chain(a)
    make_chain(other)  # same base: its links would pass the base checks
    m, o = load_manifest(a), load_manifest(other)
    m["checkpoints"] = [dict(e, file="../other/" + e["file"]) for e in o["checkpoints"]]
    save_manifest(a, m)
    with pytest.raises(CheckpointChainError, match=r"checkpoints\[0\]\.file"):
        load_everything(a)


def test_symbolic_links_leading_out_of_the_directory_are_refused(chain, tmp_path):
    m = load_manifest(chain)
    name = m["checkpoints"][1]["file"]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(chain / name, outside / name)
    (chain / name).symlink_to(outside / name)
    target = tiny_model(seed=9)
    before = state_copy(target)
    with pytest.raises(CheckpointChainError, match="symbolic link that leads out"):
        SparseCheckpointer(chain).load_into(target)
    assert same_bits(state_copy(target), before)
    # a symbolic link that stays inside the directory is fine
    (chain / name).unlink()
    shutil.move(outside / name, chain / ".kept-inside")
    (chain / name).symlink_to(chain / ".kept-inside")
    load_everything(chain)


# ------------------------------------------------------------------- 2. checksums cover everything
def _mask_file(tmp_path: Path) -> tuple[FishMask, Path]:
    mask = model_mask(tiny_model())
    path = tmp_path / "mask.safetensors"
    mask.save(path)
    return mask, path


@pytest.mark.parametrize("key,value", [("forced", "[]"), ("provenance", '{"method": "fisher", "seed": 5}'),
                                       ("forced", '["2.bias", "0.bias"]')])
def test_mask_file_checksum_covers_forced_and_provenance(tmp_path, key, value):
    """A changed forced list / provenance, digest left as is (it covers the selection only): refused."""
    mask, path = _mask_file(tmp_path)
    tensors, meta = read_st(path)
    meta[key] = value
    write_st(path, tensors, meta, checksum=False)  # as a bit flip would: the recorded checksum stays
    with pytest.raises(CorruptFileError, match="checksum"):
        FishMask.load(path)


def test_mask_digest_still_means_the_selection(tmp_path):
    mask, path = _mask_file(tmp_path)
    loaded = FishMask.load(path)
    idx = {n: t for n, t in mask.indices.items()}
    assert loaded.digest == mask.digest == mask_digest({n: list(s) for n, s in mask.shapes.items()}, idx)
    from dataclasses import replace

    other = replace(mask, forced=(), provenance={"anything": 1})  # same selection, same digest
    assert other.digest == mask.digest


def test_mask_files_without_a_checksum_load_after_validation(tmp_path):
    """Files of fishkern 0.1.0 (no checksum) are accepted, but validated like any other."""
    mask, path = _mask_file(tmp_path)
    tensors, meta = read_st(path)
    meta.pop("checksum", None)
    write_st(path, tensors, meta, checksum=False)
    loaded = FishMask.load(path)
    assert loaded == mask and loaded.forced == mask.forced and loaded.provenance == mask.provenance
    meta["forced"] = '["no.such.parameter"]'
    write_st(path, tensors, meta, checksum=False)
    with pytest.raises(CorruptFileError, match="'forced'"):
        FishMask.load(path)


def test_manifest_checksum_covers_every_field(chain):
    m = load_manifest(chain)
    m["checkpoints"][0]["step"] = 999  # the recorded checksum stays (on 0.1.0 manifests: no checksum at all)
    if "checksum" not in m:
        m["checksum"] = "0" * 64
    save_manifest(chain, m, checksum=False)
    with pytest.raises(CheckpointChainError, match="checksum"):
        SparseCheckpointer(chain)


def test_manifests_without_a_checksum_are_read_and_get_one(chain):
    m = load_manifest(chain)
    m.pop("checksum", None)
    save_manifest(chain, m, checksum=False)
    model = tiny_model()
    ck = SparseCheckpointer(chain)
    with torch.no_grad():
        model[0].weight.add_(1)
    ck.save(model)
    assert load_manifest(chain)["checksum"] == manifest_checksum(load_manifest(chain))


# ------------------------------------------------------------------- 3. content validation
def _j(meta, key, fn):
    value = json.loads(meta[key])
    fn(value)
    meta[key] = json.dumps(value)


def _set_shape(meta, key, name, shape):
    _j(meta, key, lambda d: d.__setitem__(name, shape))


MASK_CASES = {
    "shape_string": ("shapes", lambda t, m: _set_shape(m, "shapes", "0.weight", ["5", 6])),
    "shape_negative": ("shapes", lambda t, m: _set_shape(m, "shapes", "0.weight", [-5, 6])),
    "shape_float": ("shapes", lambda t, m: _set_shape(m, "shapes", "0.weight", [5.0, 6])),
    "shape_huge": ("shapes", lambda t, m: _set_shape(m, "shapes", "0.weight", [2**40, 2**40])),
    "shape_inf": ("shapes", lambda t, m: m.__setitem__("shapes", m["shapes"].replace("[5, 6]", "[1e400, 6]"))),
    "forced_string": ("forced", lambda t, m: m.__setitem__("forced", '"2.bias"')),
    "forced_unknown": ("forced", lambda t, m: m.__setitem__("forced", '["nope"]')),
    "forced_twice": ("forced", lambda t, m: m.__setitem__("forced", '["2.bias", "2.bias"]')),
    "provenance_deep": ("provenance", lambda t, m: m.__setitem__("provenance", DEEP)),
    "provenance_list": ("provenance", lambda t, m: m.__setitem__("provenance", "[1, 2]")),
    "indices_unsorted": ("indices/0.weight", lambda t, m: t.__setitem__("indices/0.weight", t["indices/0.weight"].flip(0))),
    "indices_duplicated": ("indices/0.weight", lambda t, m: t.__setitem__(
        "indices/0.weight", torch.cat([t["indices/0.weight"][:1], t["indices/0.weight"]]))),
    "indices_out_of_range": ("indices/0.weight", lambda t, m: t["indices/0.weight"].__setitem__(-1, 30)),
    "indices_negative": ("indices/0.weight", lambda t, m: t["indices/0.weight"].__setitem__(0, -1)),
    "indices_float": ("indices/0.weight", lambda t, m: t.__setitem__("indices/0.weight", t["indices/0.weight"].float())),
    "indices_2d": ("indices/0.weight", lambda t, m: t.__setitem__("indices/0.weight", t["indices/0.weight"][None])),
    "indices_unknown_name": ("indices/ghost", lambda t, m: t.__setitem__("indices/ghost", t.pop("indices/0.weight"))),
    "unexpected_tensor": ("weights/x", lambda t, m: t.__setitem__("weights/x", torch.zeros(2))),
    "k_disagrees": ("'k'", lambda t, m: m.__setitem__("k", str(int(m["k"]) + 1))),
    "k_not_a_number": ("'k'", lambda t, m: m.__setitem__("k", "12abc")),
    "numel_disagrees": ("numel", lambda t, m: m.__setitem__("numel", str(int(m["numel"]) - 1))),
    "shapes_missing": ("shapes", lambda t, m: m.pop("shapes")),
    "huge_metadata": ("header", lambda t, m: m.__setitem__("provenance", json.dumps({"pad": "x" * HUGE}))),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_invalid_mask_files_name_the_file_and_the_field(tmp_path, case):
    field, edit = MASK_CASES[case]
    _, path = _mask_file(tmp_path)
    tensors, meta = read_st(path)
    edit(tensors, meta)
    recompute_mask_meta(tensors, meta)
    write_st(path, tensors, meta)
    with pytest.raises(CorruptFileError) as e:
        FishMask.load(path)
    assert str(path) in str(e.value) and field in str(e.value), str(e.value)[:300]


def _diff_file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(5, 6, generator=g), "a.bias": torch.randn(5, generator=g),
            "steps": torch.tensor(3)}
    tuned = {n: t.clone() for n, t in base.items()}
    tuned["a.weight"][1:3] += 0.5
    tuned["a.bias"][0] += 1
    base["a.weight"][0, 0], tuned["a.weight"][0, 0] = 1e30, 1.0  # base + (tuned - base) misses: a fix-up
    diff = SparseDiff.from_models(base, tuned, extra={"note": "x"})
    assert diff.num_fixups
    path = tmp_path / "d.safetensors"
    diff.save(path)
    return path


def _recompute_structure(meta):
    try:
        shapes = json.loads(meta["shapes"])
        dtypes = {n: getattr(torch, d) for n, d in json.loads(meta["dtypes"]).items()}
        meta["base_structure_sha256"] = structure_hash(shapes, dtypes)
    except Exception:  # values the hash cannot take: the loader must refuse them first
        pass


def _dup_fixup(t, m):
    p, v = t["fix_apply_pos/a.weight"], t["fix_apply_val/a.weight"]
    t["fix_apply_pos/a.weight"], t["fix_apply_val/a.weight"] = torch.cat([p, p]), torch.cat([v, v])


DIFF_CASES = {
    "shape_string": ("shapes", lambda t, m: _set_shape(m, "shapes", "a.weight", ["5", 6])),
    "shape_negative": ("shapes", lambda t, m: _set_shape(m, "shapes", "a.bias", [-5])),
    "shape_inf": ("shapes", lambda t, m: m.__setitem__("shapes", m["shapes"].replace("[5, 6]", "[1e400, 6]"))),
    "dtype_unknown": ("dtypes", lambda t, m: _j(m, "dtypes", lambda d: d.__setitem__("steps", "qint8"))),
    "dtype_alias": ("dtypes", lambda t, m: _j(m, "dtypes", lambda d: d.__setitem__("a.bias", "float"))),
    "dtypes_lacking_one": ("dtypes", lambda t, m: _j(m, "dtypes", lambda d: d.pop("steps"))),
    "numel_disagrees": ("numel", lambda t, m: m.__setitem__("numel", str(int(m["numel"]) + 1))),
    "density_disagrees": ("density", lambda t, m: m.__setitem__("density", "0.5")),
    "k_disagrees": ("'k'", lambda t, m: m.__setitem__("k", str(int(m["k"]) + 1))),
    "fixup_duplicated": ("fix_apply_pos/a.weight", _dup_fixup),
    "fixup_out_of_range": ("fix_apply_pos/a.weight", lambda t, m: t["fix_apply_pos/a.weight"].__setitem__(0, 10**6)),
    "fixup_half": ("fix_apply_val/a.weight", lambda t, m: t.pop("fix_apply_val/a.weight")),
    "indices_unsorted": ("indices/a.weight", lambda t, m: t.__setitem__("indices/a.weight", t["indices/a.weight"].flip(0))),
    "values_short": ("values/a.bias", lambda t, m: t.__setitem__("values/a.bias", t["values/a.bias"][:0])),
    "extra_deep": ("extra", lambda t, m: m.__setitem__("extra", DEEP)),
    "identity_list": ("base_identity", lambda t, m: m.__setitem__("base_identity", "[1]")),
    "mask_digest_not_hex": ("mask_digest", lambda t, m: m.__setitem__("mask_digest", "xyz")),
    "entries_sha_empty": ("base_entries_sha256", lambda t, m: m.__setitem__("base_entries_sha256", "")),
    "step_plus": ("step", lambda t, m: m.__setitem__("step", "+7")),
    "kind_missing": ("kind", lambda t, m: m.pop("kind")),
    "unexpected_tensor": ("foo/a.weight", lambda t, m: t.__setitem__("foo/a.weight", torch.zeros(1))),
    "huge_metadata": ("header", lambda t, m: m.__setitem__("extra", json.dumps({"pad": "x" * HUGE}))),
}


@pytest.mark.parametrize("case", list(DIFF_CASES))
def test_invalid_diff_files_name_the_file_and_the_field(tmp_path, case):
    field, edit = DIFF_CASES[case]
    path = _diff_file(tmp_path)
    tensors, meta = read_st(path)
    edit(tensors, meta)
    _recompute_structure(meta)
    write_st(path, tensors, meta)
    with pytest.raises(CorruptFileError) as e:
        SparseDiff.load(path)
    assert str(path) in str(e.value) and field in str(e.value), str(e.value)[:300]


def _mask_shape(t, m, shape):
    _j(m, "mask", lambda d: d["shapes"].__setitem__("0.weight", shape))


LINK_CASES = {  # edits of link 0 (it holds the mask, the optimizer state, extras and RNG states)
    "step_not_a_number": ("step", lambda t, m: m.__setitem__("step", "x")),
    "step_disagrees": ("step", lambda t, m: m.__setitem__("step", "999")),
    "changed_disagrees": ("changed", lambda t, m: m.__setitem__("changed", str(int(m["changed"]) + 10**6))),
    "mask_from_disagrees": ("mask_from", lambda t, m: m.__setitem__("mask_from", "")),
    "mask_shape_huge": ("mask.shapes", lambda t, m: _mask_shape(t, m, [2**40, 2**40])),
    "mask_shape_string": ("mask.shapes", lambda t, m: _mask_shape(t, m, ["5", 6])),
    "mask_forced_unknown": ("mask.forced", lambda t, m: _j(m, "mask", lambda d: d.__setitem__("forced", ["ghost"]))),
    "mask_deep": ("mask", lambda t, m: m.__setitem__("mask", DEEP)),
    "optimizer_deep": ("optimizer", lambda t, m: m.__setitem__("optimizer", DEEP)),
    "extra_deep": ("extra", lambda t, m: m.__setitem__("extra", DEEP)),
    "extra_bad_tuple": ("extra", lambda t, m: m.__setitem__("extra", '{"__tuple__": 5}')),
    "extra_unhashable_key": ("extra", lambda t, m: m.__setitem__("extra", '{"__dict__": [[{"a": 1}, 2]]}')),
    "extra_missing_tensor": ("extra", lambda t, m: m.__setitem__("extra", '{"__tensor__": "extra/99"}')),
    "extra_bad_pair": ("extra", lambda t, m: m.__setitem__("extra", '{"__dict__": [[1, 2, 3]]}')),
    "dense_wrong_shape": ("dense/1.running_mean", lambda t, m: t.__setitem__("dense/1.running_mean", torch.zeros(4))),
    "indices_duplicated": ("indices/0.weight", lambda t, m: (
        t.__setitem__("indices/0.weight", torch.cat([t["indices/0.weight"][:1], t["indices/0.weight"]])),
        t.__setitem__("values/0.weight", torch.cat([t["values/0.weight"][:1], t["values/0.weight"]])))),
    "values_wrong_dtype": ("values/0.weight", lambda t, m: t.__setitem__("values/0.weight", t["values/0.weight"].double())),
    "optim_odd_name": ("optim/x", lambda t, m: t.__setitem__("optim/x", torch.zeros(1))),
    "unexpected_tensor": ("foo/1", lambda t, m: t.__setitem__("foo/1", torch.zeros(1))),
    "optimizer_class_only": ("optimizer_class", lambda t, m: m.__setitem__("optimizer", "")),
    "created_missing": ("created", lambda t, m: m.pop("created")),
    "huge_metadata": ("header", lambda t, m: m.__setitem__("extra", json.dumps({"pad": "x" * HUGE}))),
}


@pytest.mark.parametrize("case", list(LINK_CASES))
def test_invalid_checkpoint_links_name_the_file_and_the_field(chain, case):
    field, edit = LINK_CASES[case]
    rewrite_link(chain, 0, edit)
    name = load_manifest(chain)["checkpoints"][0]["file"]
    target, opt = fresh_target()
    before = state_copy(target)
    with pytest.raises(CheckpointChainError) as e:
        SparseCheckpointer(chain).load_into(target, opt, 0)
    assert name in str(e.value) and field in str(e.value), str(e.value)[:300]
    assert same_bits(state_copy(target), before) and not opt.state_dict()["state"]
    with pytest.raises(CheckpointChainError):
        load_everything(chain)


def _base_tensor(name, fn):
    return lambda t, m: t.__setitem__(name, fn(t[name]))


BASE_CASES = {
    "weights_changed": ("content_sha256", _base_tensor("0.weight", lambda x: x + 1)),
    "tensor_missing": ("0.bias", lambda t, m: t.pop("0.bias")),
    "wrong_dtype": ("0.weight", _base_tensor("0.weight", lambda x: x.double())),
    "extra_tensor": ("ghost", lambda t, m: t.__setitem__("ghost", torch.zeros(1))),
}


@pytest.mark.parametrize("case", list(BASE_CASES))
def test_invalid_checkpoint_bases_are_chain_errors(chain, case):
    field, edit = BASE_CASES[case]
    rewrite_base(chain, edit)
    with pytest.raises(CheckpointChainError) as e:
        load_everything(chain)
    assert "base" in str(e.value) and field in str(e.value), str(e.value)[:300]


def _base_rec(fn):
    def edit(m):
        fn(m["base"])
        b = m["base"]
        try:  # keep the structure hash consistent with the edited record
            b["structure_sha256"] = structure_hash({n: b["shapes"][n] for n in b["names"]},
                                                   {n: getattr(torch, d) for n, d in b["dtypes"].items()})
        except Exception:
            pass
    return edit


def _entry(i, key, value):
    return lambda m: m["checkpoints"][i].__setitem__(key, value)


MANIFEST_CASES = {
    "names_duplicated": ("base.names", _base_rec(lambda b: b["names"].append(b["names"][0]))),
    "names_unknown": ("base.shapes", _base_rec(lambda b: b["names"].append("ghost"))),
    "shape_string": ("base.shapes", _base_rec(lambda b: b["shapes"].__setitem__("0.weight", ["5", 6]))),
    "shape_negative": ("base.shapes", _base_rec(lambda b: b["shapes"].__setitem__("0.bias", [-5]))),
    "dtype_unknown": ("base.dtypes", _base_rec(lambda b: b["dtypes"].__setitem__("0.bias", "qint8"))),
    "base_bytes_string": ("base.bytes", _base_rec(lambda b: b.__setitem__("bytes", "12"))),
    "mask_from_out_of_range": ("checkpoints[1].mask_from", _entry(1, "mask_from", 7)),
    "mask_from_without_digest": ("checkpoints[1].mask_from", _entry(1, "mask_digest", None)),
    "mask_from_wrong_holder": ("checkpoints[1].mask_from", _entry(0, "mask_digest", "ab" * 32)),
    "bytes_negative": ("checkpoints[0].bytes", _entry(0, "bytes", -1)),
    "step_string": ("checkpoints[0].step", _entry(0, "step", "3")),
    "changed_float": ("checkpoints[0].changed", _entry(0, "changed", 1.5)),
    "parent_wrong": ("checkpoints[1].parent", _entry(1, "parent", "0" * 32)),
    "index_string": ("checkpoints[1].index", _entry(1, "index", "1")),
    "id_not_hex": ("checkpoints[1].id", _entry(1, "id", "z" * 32)),
    "entry_lacks_a_key": ("checkpoints[1]", lambda m: m["checkpoints"][1].pop("bytes")),
    "checkpoints_not_a_list": ("checkpoints", lambda m: m.__setitem__("checkpoints", {"0": 1})),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES) + ["deep", "top_level_list", "huge"])
def test_invalid_manifests_name_the_file_and_the_field(chain, case):
    path = chain / "manifest.json"
    if case == "deep":
        field = "(file)"
        path.write_text(DEEP)
    elif case == "top_level_list":
        field = "(file)"
        path.write_text("[1, 2]")
    elif case == "huge":
        field = "(file)"
        m = load_manifest(chain)
        m["created"] = "x" * HUGE
        save_manifest(chain, m)
    else:
        field, edit = MANIFEST_CASES[case]
        m = load_manifest(chain)
        edit(m)
        save_manifest(chain, m)
    with pytest.raises(CheckpointChainError) as e:
        load_everything(chain)
    assert str(path) in str(e.value) and field in str(e.value), str(e.value)[:300]


# ------------------------------------------------------------------- 4. nothing half-applied
def _rng_edit(fn):
    def edit(t, m):
        rng = json.loads(m["rng"])
        fn(t, rng)
        m["rng"] = json.dumps(rng)
    return edit


def _python_state(rng, fn):
    words = rng["python"]["__tuple__"][1]["__tuple__"]
    fn(words)


RNG_CASES = {
    "torch_state_short": _rng_edit(lambda t, r: t.__setitem__(r["torch"]["__tensor__"], t[r["torch"]["__tensor__"]][:100])),
    "torch_state_int64": _rng_edit(lambda t, r: t.__setitem__(r["torch"]["__tensor__"], t[r["torch"]["__tensor__"]].long())),
    "python_state_short": _rng_edit(lambda t, r: _python_state(r, lambda w: w.pop(0))),
    "python_word_too_big": _rng_edit(lambda t, r: _python_state(r, lambda w: w.__setitem__(0, 2**32 + 5))),
    "numpy_word_too_big": _rng_edit(lambda t, r: t[r["numpy"]["__tuple__"][1]["__tensor__"]].__setitem__(0, 2**33)),
    "numpy_state_short": _rng_edit(lambda t, r: t.__setitem__(r["numpy"]["__tuple__"][1]["__tensor__"],
                                                              t[r["numpy"]["__tuple__"][1]["__tensor__"]][:10])),
    "unknown_generator": _rng_edit(lambda t, r: r.__setitem__("jax", 1)),
}


@pytest.mark.parametrize("case", list(RNG_CASES))
def test_load_into_validates_rng_states_before_writing_anything(chain, case):
    rewrite_link(chain, 1, RNG_CASES[case])
    ck = SparseCheckpointer(chain)
    target = tiny_model(seed=9)
    opt = MaskedAdamW(target.named_parameters(), model_mask(tiny_model()), lr=1e-2)
    train_step(target, opt, 7)  # some optimizer state, which must survive the refusal
    before, before_opt = state_copy(target), opt_state(opt)
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()
    with pytest.raises(CheckpointChainError, match="'rng'"):
        ck.load_into(target, opt, 1)
    assert same_bits(state_copy(target), before)
    got = opt_state(opt)
    assert got.keys() == before_opt.keys() and all(torch.equal(got[k], before_opt[k]) for k in got)
    assert torch.equal(torch.get_rng_state(), rngs[0]) and random.getstate() == rngs[1]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), rngs[2]))
    assert ck.position == 1  # nothing moved; a valid checkpoint still loads
    ck.load_into(target, opt, 0)


# ------------------------------------------------------------------- 9. FishMask.save race
MASK_WRITER = """
import json, sys, time, torch
from pathlib import Path
from fishkern import FishMask
d, me, other, rounds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
n = 4_000_000
mask = FishMask({"w": (n,)}, {"w": torch.arange(int(me), n, 2, dtype=torch.int32)}, provenance={"writer": me})
out = []
for r in range(rounds):
    (d / f"ready-{r}-{me}").touch()
    t0 = time.time()
    while not (d / f"ready-{r}-{other}").exists():
        if time.time() - t0 > 30:
            sys.exit("barrier timeout")
        time.sleep(0.0002)
    try:
        mask.save(d / f"mask-{r}.safetensors")
        out.append("ok")
    except FileExistsError:
        out.append("exists")
print(json.dumps(out))
"""


def test_two_processes_saving_one_mask_path_one_wins(tmp_path):
    rounds = 10
    procs = [start_child(MASK_WRITER, tmp_path, me, other, rounds) for me, other in (("0", "1"), ("1", "0"))]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    for r in range(rounds):
        assert sorted(o[r] for o in outs) == ["exists", "ok"], f"round {r}: {[o[r] for o in outs]}"
        winner = str([o[r] for o in outs].index("ok"))
        assert FishMask.load(tmp_path / f"mask-{r}.safetensors").provenance == {"writer": winner}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_mask_save_is_fsynced_like_a_diff(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def counting_fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    model_mask(tiny_model()).save(tmp_path / "m.safetensors")
    assert len(synced) >= 2  # the file's data before it is published, then the directory
    if os.path.exists("/proc/self/fd"):
        assert str(tmp_path) in synced


# ------------------------------------------------------------------- 10. one writer per chain
CHAIN_WRITER = """
import json, sys, time, torch
from pathlib import Path
from torch import nn
from fishkern import SparseCheckpointer
d, me, other, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
ck = SparseCheckpointer(d)

def barrier(tag):
    (d.parent / f"{tag}-{me}").touch()
    t0 = time.time()
    while not (d.parent / f"{tag}-{other}").exists():
        if time.time() - t0 > 60:
            sys.exit("barrier timeout")
        time.sleep(0.001)

barrier("start")
results = []
for i in range(8):
    with torch.no_grad():
        model[0].weight[0, i % 5] += 1
    try:
        ck.save(model, step=i)
        results.append(["ok", ""])
    except Exception as e:
        results.append([type(e).__name__, str(e)])
out.write_text(json.dumps(results))
barrier("done")
"""


def test_two_processes_saving_into_one_chain(tmp_path):
    d = tmp_path / "chain"
    SparseCheckpointer(d, tiny_model())
    procs = [start_child(CHAIN_WRITER, d, me, other, tmp_path / f"out{me}.json") for me, other in (("a", "b"), ("b", "a"))]
    for p in procs:
        _, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
    results = [json.loads((tmp_path / f"out{me}.json").read_text()) for me in "ab"]
    ok = sum(r[0] == "ok" for res in results for r in res)
    kept = len(load_manifest(d)["checkpoints"])
    assert ok == kept, f"{ok} saves reported success, the manifest keeps {kept}"
    assert ok == 8  # one process writes the chain
    refused = [r for res in results for r in res if r[0] != "ok"]
    assert len(refused) == 8
    assert all(r[0] == "CheckpointLockedError" and str(d) in r[1] for r in refused), refused[:1]
    assert len(SparseCheckpointer(d).rebuild(-1)) == len(tiny_model().state_dict())


LOCK_HOLDER = """
import sys, time, torch
from pathlib import Path
from torch import nn
from fishkern import SparseCheckpointer
d, go = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
ck = SparseCheckpointer(d)
with torch.no_grad():
    model[0].weight.add_(1)
ck.save(model, step=1)
print("saved", flush=True)
t0 = time.time()
while not go.exists() and time.time() - t0 < 60:
    time.sleep(0.01)
"""


def test_a_live_writer_refuses_other_writers_not_readers(tmp_path):
    d = tmp_path / "chain"
    make_chain(d, links=1)
    stale = SparseCheckpointer(d)  # opened before the other process writes
    holder = start_child(LOCK_HOLDER, d, tmp_path / "go")
    try:
        assert holder.stdout.readline().strip() == "saved", holder.stderr.read()[-2000:]
        reader = SparseCheckpointer(d)  # readers proceed
        assert len(reader) == 2
        reader.rebuild(-1)
        target = tiny_model(seed=3)
        reader.load_into(target)
        files = sorted(os.listdir(d))
        with pytest.raises(CheckpointChainError, match=str(d)) as e:
            reader.save(target)
        assert type(e.value).__name__ == "CheckpointLockedError"
        with pytest.raises(CheckpointChainError, match=str(d)) as e:
            SparseCheckpointer(d, tiny_model(), overwrite=True)  # would delete the live writer's files
        assert type(e.value).__name__ == "CheckpointLockedError"
        assert sorted(os.listdir(d)) == files
    finally:
        holder.kill()  # kill -9: the kernel drops the lock
        holder.wait(timeout=30)
    with pytest.raises(CheckpointChainError, match="changed since"):
        stale.save(tiny_model())  # its view of the chain is out of date: refused, nothing written
    assert len(load_manifest(d)["checkpoints"]) == 2
    fresh = SparseCheckpointer(d)
    fresh.save(tiny_model(), step=3)
    assert [e["step"] for e in load_manifest(d)["checkpoints"]] == [1, 1, 3]


def test_a_second_checkpointer_in_one_process_cannot_drop_checkpoints(tmp_path):
    d = tmp_path / "chain"
    make_chain(d, links=1)
    first, second = SparseCheckpointer(d), SparseCheckpointer(d)
    model = tiny_model()
    with torch.no_grad():
        model[0].weight.add_(1)
    first.save(model, step=10)
    with pytest.raises(CheckpointChainError, match="changed since"):
        second.save(model, step=20)
    assert [e["step"] for e in load_manifest(d)["checkpoints"]] == [1, 10]


# ------------------------------------------------------------------- 11. stale temporary files
KILLED_SAVE = """
import sys, time, torch, safetensors.torch
from fishkern import SparseDiff
diff = SparseDiff.from_models({"w": torch.zeros(1000)}, {"w": torch.arange(1000.)})

def slow_save(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"x" * 100_000)
    print("writing", flush=True)
    time.sleep(60)

safetensors.torch.save_file = slow_save
diff.save(sys.argv[1])
"""


def _temps(d: Path, target: str) -> list[str]:
    return sorted(f for f in os.listdir(d) if f.startswith(f".{target}.") and f.endswith(".tmp"))


def test_temporary_files_of_killed_writers_are_removed_by_the_next_save(tmp_path):
    dead = start_child(KILLED_SAVE, tmp_path / "a.safetensors")
    live = start_child(KILLED_SAVE, tmp_path / "c.safetensors")
    try:
        for p in (dead, live):
            assert p.stdout.readline().strip() == "writing", p.stderr.read()[-2000:]
        dead.kill()  # kill -9 in the middle of SparseDiff.save
        dead.wait(timeout=30)
        assert len(_temps(tmp_path, "a.safetensors")) == 1
        live_temps = _temps(tmp_path, "c.safetensors")
        assert len(live_temps) == 1
        mine = [".notes.tmp", "x.a.safetensors.abcdefgh.tmp", ".a.safetensors.not-ours.tmp"]
        for name in mine:
            (tmp_path / name).write_text("keep")
        diff = SparseDiff.from_models({"w": torch.zeros(10)}, {"w": torch.ones(10)})
        diff.save(tmp_path / "b.safetensors")
        assert _temps(tmp_path, "a.safetensors") == [".a.safetensors.not-ours.tmp"]  # the dead writer's is gone
        assert _temps(tmp_path, "c.safetensors") == live_temps  # a live writer's is kept
        assert all((tmp_path / name).read_text() == "keep" for name in mine)
    finally:
        for p in (dead, live):
            p.kill()
            p.wait(timeout=30)
    FishMask({"w": (10,)}, {}).save(tmp_path / "m.safetensors")  # any save cleans the directory
    assert _temps(tmp_path, "c.safetensors") == []
    assert SparseDiff.load(tmp_path / "b.safetensors").k == 10


def _temp_name(target: str, pid: int) -> str:
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f".{target}.fk-{host}-{pid}-abcd_123.tmp"


def test_stale_temporary_files_by_age_and_what_is_never_touched(tmp_path):
    old = time.time() - 2 * 86400
    live_old = tmp_path / _temp_name("x.safetensors", os.getpid())  # a live pid, but unlocked for 2 days
    live_new = tmp_path / _temp_name("y.safetensors", os.getpid())  # a live pid, fresh: kept
    other_host = tmp_path / ".z.safetensors.fk-00000000-1-abcd_123.tmp"  # another machine, fresh: kept
    legacy_old = tmp_path / ".w.safetensors.abcd_123.tmp"  # fishkern 0.1.0's naming, 2 days old
    legacy_new = tmp_path / ".v.safetensors.abcd_124.tmp"
    target = tmp_path / "outside.bin"
    target.write_text("keep")
    link = tmp_path / _temp_name("s.safetensors", 999_999_999)  # a dead pid, but a symbolic link
    link.symlink_to(target)
    for p in (live_old, live_new, other_host, legacy_old, legacy_new):
        p.write_text("tmp")
    for p in (live_old, legacy_old):
        os.utime(p, (old, old))
    FishMask({"w": (10,)}, {}).save(tmp_path / "m.safetensors")
    assert not live_old.exists() and not legacy_old.exists()
    assert live_new.exists() and other_host.exists() and legacy_new.exists()
    assert link.is_symlink() and target.read_text() == "keep"


# ------------------------------------------------------------------- 12. fishkern cifar re-run
class _Trained(Exception):
    pass


def test_cifar_rerun_refuses_to_append_to_an_old_chain(tmp_path, monkeypatch, capsys):
    from fishkern.cli import main
    from fishkern.runners import cifar as rc

    out = tmp_path / "run"
    d = out / "standard_s0" / "checkpoints"  # an interrupted earlier run: a chain, no results.json
    make_chain(d, links=1)
    manifest = (d / "manifest.json").read_bytes()

    def no_training(cfg):
        raise _Trained("the run started: data were loaded")

    monkeypatch.setattr(rc.run, "load_data", no_training)
    common = ["cifar", "--dataset", "digits", "--methods", "standard", "--epochs", "1", "--lr-warmup-epochs", "0", "--workers", "1",
              "--out-dir", str(out), "--no-progress"]
    args = common + ["--checkpoint-every-epochs", "1"]
    assert main(args) == 3  # refused before the data are even loaded
    err = capsys.readouterr().err
    assert str(d) in err and "--overwrite" in err
    assert (d / "manifest.json").read_bytes() == manifest
    with pytest.raises(_Trained):
        main(common)  # a run without checkpoints does not touch the chain: it goes ahead
    with pytest.raises(_Trained):
        main(args + ["--overwrite"])  # --overwrite starts new chains: it goes ahead
    assert (d / "manifest.json").read_bytes() == manifest
