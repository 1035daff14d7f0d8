"""SparseCheckpointer: a chain of checkpoints that each store only what changed since the previous one.

Made for sparse training from scratch or from a pretrained model, where the mask may be recomputed
every E epochs (the paper's Table 4: E = 1, 2, 4 or a fixed mask): checkpoint i holds the entries of
the model's ``state_dict()`` whose bits differ from checkpoint i-1 (checkpoint 0: from the base). When
the mask changes, the entries trained under the old mask keep their (already saved) values and are
not stored again; the new mask's entries are stored as they move. Buffers that change everywhere
(BatchNorm running statistics, counters) are stored whole, when that is smaller than index + value.

Directory layout
----------------
``manifest.json`` (the chain; replaced atomically: it is the source of truth; its ``checksum`` is
the sha256 of ``fishkern-json-v1`` + the canonical JSON of every other field, see
``_io.json_checksum``), ``base-<id>.safetensors`` (the full base, format
``fishkern.checkpoint-base``; omitted with ``store_base=False``, then the base must be passed again
to reopen the chain), ``ckpt-<index>-<id>.safetensors`` (format ``fishkern.checkpoint`` version 1).
Files get unique names and are written atomically (temporary file, fsync, link/rename, fsync of the
directory) before the manifest names them, so a crash leaves at worst an unreferenced file, never a
broken chain; temporary files of crashed writers are removed by the next write.

Checkpoint file
---------------
Tensors: ``indices/<name>`` (sorted flat row-major indices, int32 below 2**31 entries) and
``values/<name>`` (the new values, in the tensor's dtype) for sparse changes; ``dense/<name>`` for
tensors stored whole; ``mask/<name>`` (the mask's indices, only in the checkpoint where the mask
changed); ``optim/<n>``, ``extra/<n>``, ``rng/<n>`` (tensors of the optimizer state, the extras and
the random generators' states). Metadata: ``format``, ``format_version``, ``index``, ``id``,
``parent`` (the previous checkpoint's id, ``""`` for the first), ``base_structure_sha256``,
``base_content_sha256``, ``step``, ``epoch``, ``changed`` (entries stored), ``mask_digest``,
``mask_from`` (index of the checkpoint holding that mask), ``mask`` (JSON: shapes, forced,
provenance, where the mask is stored), ``optimizer_class``, ``optimizer`` (the optimizer's
``state_dict()`` as JSON with references to ``optim/`` tensors; a ``MaskedAdamW``'s is 8·k bytes of
state), ``extra``, ``rng`` (torch CPU, CUDA when initialised, Python ``random``, NumPy), ``created``,
``fishkern_version``, ``checksum`` (sha256 over all metadata and tensor bytes).

Guarantees
----------
``rebuild(i)`` is bit-exactly the ``state_dict()`` saved at checkpoint i. Every file is checked
while the chain is read: its checksum, then its content (every field's type and range, ids, parent
ids, base hashes, the base's content hash, sorted in-range indices, the recorded file sizes, the
mask's digest, the RNG states), and a missing, corrupt or invalid file is a ``CheckpointChainError``
that names the file and the field and says which checkpoints can still be rebuilt. File names read
from the manifest must be exactly the names fishkern generates (no ``..``, no absolute path, no
separator) and may not be symbolic links that leave the directory: anything else is refused before
a file is read or deleted. ``load_into`` restores the model, the optimizer (``load_state_dict``) and
the random generators, so training continues bit-identically; it validates everything (RNG states
included) before writing anything. Manifests of fishkern 0.1.0 have no checksum: they are read
after the same validation, and get one with the next save.

One writer per directory: a ``SparseCheckpointer`` takes the directory's writer lock (``_lock``)
when it first writes (a new chain, ``overwrite=True``, ``save``) and holds it until ``close()`` or
until it is collected. A writer in another process is refused at that point with
``CheckpointLockedError`` (no waiting); reading (``rebuild``, ``mask_at``, ``load_into``) never takes
the lock. Each ``save`` re-reads the manifest and refuses to append if it changed since this object
last read or wrote it (another object, or a writer that has since finished).

Memory: the checkpointer keeps a CPU copy of the base and of the last saved state (to find what
changed): two model copies.
"""
from __future__ import annotations

import datetime
import json
import os
import random
import re
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..mask.indices import index_dtype_for
from .._version import __version__
from ..mask.fishmask import FishMask, mask_from_parts, model_identity
from ._io import (
    BaseMismatchError,
    CorruptFileError,
    changed_indices,
    content_hash,
    cpu_copy,
    dtype_name,
    gather_flat,
    json_checksum,
    numel_of,
    pack,
    parse_dtype,
    read_safetensors,
    scatter_flat_,
    structure_hash,
    unpack,
    write_json,
    write_safetensors,
)
from ._lock import WriterLock
from ._validate import (
    HEX32,
    HEX64,
    MAX_JSON_BYTES,
    Fail,
    check_depth,
    dtypes_of,
    hex_or_none,
    int_in,
    is_int,
    load_json,
    member_path,
    meta_int,
    meta_str,
    names_of,
    optional_int,
    shapes_of,
    sorted_indices,
)

__all__ = ["SparseCheckpointer", "CheckpointState", "CheckpointChainError", "CheckpointLockedError"]

FORMAT = "fishkern.checkpoint"
BASE_FORMAT = "fishkern.checkpoint-base"
MANIFEST_FORMAT = "fishkern.checkpoints"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# the only file names a manifest may hold: the ones fishkern generates
LINK_NAME = re.compile(r"ckpt-[0-9]{6,}-[0-9a-f]{12}\.safetensors")
BASE_NAME = re.compile(r"base-[0-9a-f]{12}\.safetensors")
_ENTRY_KEYS = ("index", "file", "id", "parent", "step", "epoch", "mask_digest", "mask_from", "changed", "bytes", "created")
_BASE_KEYS = ("file", "identity", "names", "shapes", "dtypes", "structure_sha256", "content_sha256", "bytes")
_MANIFEST_KEYS = ("format", "format_version", "created", "base", "checkpoints", "checksum")
_STATE_PREFIXES = ("optim", "extra", "rng")
_DIGITS = re.compile(r"[0-9]+")


class CheckpointChainError(ValueError):
    """A checkpoint chain that cannot be read or written: a missing, corrupt or invalid manifest,
    base or link (the message names the file and the field), or a chain changed by another writer."""


class CheckpointLockedError(CheckpointChainError):
    """Another live process is writing this checkpoint directory (it holds the writer lock)."""


@dataclass
class CheckpointState:
    """What ``load_into`` restored besides the model and optimizer."""

    index: int
    step: int | None
    epoch: int | None
    extra: Any
    mask: FishMask | None
    entry: dict[str, Any] = field(default_factory=dict)  # the manifest's record of the checkpoint


@dataclass
class _Link:
    index: int
    path: str
    meta: dict[str, str]
    tensors: dict[str, Tensor]
    sparse: dict[str, tuple[Tensor, Tensor]]
    dense: dict[str, Tensor]


def _state_of(x, what: str = "model") -> dict[str, Tensor]:
    if isinstance(x, torch.nn.Module):
        return x.state_dict()
    if isinstance(x, Mapping):
        for n, t in x.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}: {n!r} is a {type(t).__name__}, not a tensor")
        return dict(x)
    raise TypeError(f"{what} must be a torch.nn.Module or a state dict, not {type(x).__name__}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _canonical(manifest: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in manifest.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))


def _optional_int(x: Any) -> int | None:
    return None if x is None else int(x)


class SparseCheckpointer:
    """Write and read a chain of sparse checkpoints in ``directory`` (see the module docstring).

    Args:
        directory: created if needed. If it holds a chain (``manifest.json``), the chain is
            opened and new checkpoints are appended to it; ``overwrite=True`` starts a new chain
            instead (the old chain's files are deleted once the new manifest is written; an old
            manifest that cannot be read is replaced, and the files it names are left alone).
        base: the model at the start (or its ``state_dict()``), copied to CPU. Required for a new
            chain; for an existing one it is optional and, when given, must be bit-identical to the
            chain's base (``BaseMismatchError``).
        store_base: write the base once into the directory (a full checkpoint) so that the chain
            can be rebuilt from the directory alone. Turn it off when the base is a pretrained model
            that you keep elsewhere; then pass it as ``base`` when reopening.
        save_rng: store the random generators' states with each checkpoint (restored by
            ``load_into``), needed for bit-identical resumption when training draws random numbers
            (dropout, shuffling).

    A new chain or ``overwrite=True`` takes the directory's writer lock at once, an existing chain
    at its first ``save``; ``CheckpointLockedError`` when another process holds it. ``close()`` (or
    ``with SparseCheckpointer(...) as ck:``) releases it; so does garbage collection.
    """

    def __init__(self, directory: str | os.PathLike, base=None, *, store_base: bool = True, overwrite: bool = False, save_rng: bool = True):
        self._lock: WriterLock | None = None
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.save_rng = bool(save_rng)
        self._base: dict[str, Tensor] | None = None
        self._shadow: dict[str, Tensor] | None = None  # the state at self._position, on CPU
        self._scratch: dict = {}  # a reused bool buffer for the bitwise comparisons
        manifest_path = self._path(MANIFEST)
        if os.path.exists(manifest_path) and not overwrite:
            self._open(base)
            return
        if base is None:
            raise ValueError("a new checkpoint chain needs base= (the model at the start, or its state_dict())")
        try:
            with self._writer().mutex:
                self._create(base, store_base)
        except BaseException:
            self.close()
            raise

    def _open(self, base) -> None:
        """Open the existing chain (reading only: no lock)."""
        self._manifest = self._read_manifest()
        info = self._manifest["base"]
        if base is not None:
            state = {n: cpu_copy(t) for n, t in _state_of(base, "base").items()}
            self._check_structure(state, "base")
            if content_hash(state, info["names"]) != info["content_sha256"]:
                raise BaseMismatchError(
                    f"the given base is not the base of the chain in {self.directory}: same tensors, different "
                    "weights (content sha256 mismatch). Use another directory, or overwrite=True to start a new chain"
                )
            self._base = {n: state[n] for n in info["names"]}
        elif not info.get("file"):
            raise ValueError(
                f"the chain in {self.directory} was saved without its base (store_base=False): pass base= to open it"
            )
        self._position = len(self._manifest["checkpoints"]) - 1

    def _create(self, base, store_base: bool) -> None:
        """Start a new chain (under the writer lock); the old chain's files go once it is written."""
        manifest_path = self._path(MANIFEST)
        discard = []
        if os.path.exists(manifest_path):  # overwrite=True
            try:
                old = self._read_manifest()
                discard = [e["file"] for e in old["checkpoints"]] + ([old["base"]["file"]] if old["base"].get("file") else [])
            except CheckpointChainError as e:  # its file names cannot be trusted: delete none of them
                warnings.warn(f"replacing an unreadable checkpoint manifest; the files it names are left in place: {e}", stacklevel=3)
        state = {n: cpu_copy(t) for n, t in _state_of(base, "base").items()}
        shapes = {n: tuple(t.shape) for n, t in state.items()}
        dtypes = {n: t.dtype for n, t in state.items()}
        info = {
            "file": None,
            "identity": model_identity(base) if isinstance(base, torch.nn.Module) else None,
            "names": list(state),
            "shapes": {n: list(s) for n, s in shapes.items()},
            "dtypes": {n: dtype_name(d) for n, d in dtypes.items()},
            "structure_sha256": structure_hash(shapes, dtypes),
            "content_sha256": content_hash(state),
            "bytes": None,
        }
        if store_base:
            info["file"] = f"base-{uuid.uuid4().hex[:12]}.safetensors"
            meta = {
                "format": BASE_FORMAT,
                "format_version": str(FORMAT_VERSION),
                "structure_sha256": info["structure_sha256"],
                "content_sha256": info["content_sha256"],
                "fishkern_version": __version__,
            }
            info["bytes"] = write_safetensors(self._path(info["file"]), state, meta, overwrite=False)
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _now(),
            "base": info,
            "checkpoints": [],
        }
        self._write_manifest(manifest)
        self._manifest = manifest
        self._base = state
        self._shadow = {n: t.clone() for n, t in state.items()}
        self._position = -1
        for f in discard:
            if f != info["file"]:
                self._remove(f)

    # ------------------------------------------------------------------ the writer lock
    def _writer(self) -> WriterLock:
        """This object's share of the directory's writer lock (taken on first use)."""
        if self._lock is None:
            try:
                self._lock = WriterLock(self.directory)
            except BlockingIOError:
                raise CheckpointLockedError(
                    f"the checkpoint chain in {self.directory} is being written by another process (it holds the "
                    "directory's writer lock; one writer per directory). Reading it (rebuild, mask_at, load_into) "
                    "works; to write, wait until that process ends or closes its SparseCheckpointer, or use another "
                    "directory"
                ) from None
        return self._lock

    def close(self) -> None:
        """Release the directory's writer lock (if this object took it). Reading still works; the
        next ``save`` takes the lock again."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def __enter__(self) -> "SparseCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # ------------------------------------------------------------------ introspection
    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def __len__(self) -> int:
        return len(self._manifest["checkpoints"])

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        """The manifest's records of the checkpoints (index, file, id, parent, step, epoch,
        mask_digest, mask_from, changed, bytes, created), oldest first."""
        return [dict(e) for e in self._manifest["checkpoints"]]

    @property
    def position(self) -> int:
        """The checkpoint the next ``save`` follows (-1: the base)."""
        return self._position

    def sizes(self) -> dict[str, Any]:
        """Bytes on disk: the base file, each checkpoint, their total, and ``dense_bytes`` (raw bytes
        of one full ``state_dict()``, i.e. what each dense checkpoint would cost)."""
        info = self._manifest["base"]
        dense = sum(numel_of(info["shapes"][n]) * torch.empty((), dtype=parse_dtype(info["dtypes"][n])).element_size() for n in info["names"])
        per = [e["bytes"] for e in self._manifest["checkpoints"]]
        return {"base_bytes": info.get("bytes"), "checkpoint_bytes": per, "total_checkpoint_bytes": sum(per), "dense_bytes": dense}

    def _normalize(self, index: int) -> int:
        n = len(self)
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"checkpoint index {index} out of range: the chain in {self.directory} has {n} checkpoints")
        return i

    # ------------------------------------------------------------------ manifest
    def _manifest_fail(self) -> Fail:
        path = self._path(MANIFEST)
        return lambda f, msg: CheckpointChainError(f"{path} is not a readable fishkern checkpoint manifest: field {f!r} {msg}")

    def _read_manifest(self) -> dict[str, Any]:
        """The manifest, checksum-verified and validated (without its ``checksum``)."""
        path = self._path(MANIFEST)
        fail = self._manifest_fail()
        try:
            size = os.path.getsize(path)
            if size > MAX_JSON_BYTES:
                raise fail("(file)", f"is {size:,} bytes, more than the limit of {MAX_JSON_BYTES:,}")
            with open(path, "rb") as f:
                text = f.read()
        except OSError as e:
            raise CheckpointChainError(f"{path} is not a readable fishkern checkpoint manifest: {e}") from e
        m = load_json(text, "(file)", fail)
        if not isinstance(m, dict):
            raise fail("(file)", f"must hold a JSON object, got {type(m).__name__}")
        if m.get("format") != MANIFEST_FORMAT or m.get("format_version") != FORMAT_VERSION:
            raise fail("format", f"is {m.get('format')!r:.60} version {m.get('format_version')!r:.20}, expected {MANIFEST_FORMAT!r} version {FORMAT_VERSION}")
        if "checksum" in m and m["checksum"] != json_checksum(m):
            raise fail("checksum", "does not match the manifest's contents (corrupt or modified manifest)")
        _check_manifest(m, fail)
        return {k: v for k, v in m.items() if k != "checksum"}

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json(self._path(MANIFEST), {**manifest, "checksum": json_checksum(manifest)})

    def _check_unchanged(self) -> None:
        """Before appending: the manifest on disk must be the one this object read or wrote."""
        on_disk = self._read_manifest() if os.path.exists(self._path(MANIFEST)) else None
        if on_disk is None or _canonical(on_disk) != _canonical(self._manifest):
            raise CheckpointChainError(
                f"the checkpoint chain in {self.directory} changed since this SparseCheckpointer read it (another "
                "SparseCheckpointer or process wrote to it, or removed it): nothing was saved; open the directory "
                "again to append to the chain as it is now"
            )

    def _check_structure(self, state: Mapping[str, Tensor], what: str) -> None:
        info = self._manifest["base"]
        names = info["names"]
        missing = [n for n in names if n not in state]
        extra = [n for n in state if n not in info["shapes"]]
        if missing or extra:
            raise BaseMismatchError(
                f"the {what} does not match the chain's model: "
                + (f"missing {len(missing)} tensors (e.g. {missing[:3]})" if missing else "")
                + ("; " if missing and extra else "")
                + (f"{len(extra)} unknown tensors (e.g. {extra[:3]})" if extra else "")
            )
        for n in names:
            t = state[n]
            shape, dtype = tuple(info["shapes"][n]), parse_dtype(info["dtypes"][n])
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise BaseMismatchError(
                    f"the {what} does not match the chain's model: {n!r} is {dtype_name(t.dtype)} {tuple(t.shape)}, "
                    f"the chain's is {dtype_name(dtype)} {shape}"
                )

    # ------------------------------------------------------------------ base, links
    def _member(self, name: str, pattern: re.Pattern, field_name: str, fail: Fail) -> str:
        """The path of a file the manifest names, inside the directory (``FileNotFoundError`` if absent)."""
        path = member_path(self.directory, name, pattern, field_name, fail)
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        return path

    @staticmethod
    def _check_size(path: str, recorded: int | None, field_name: str, fail: Fail) -> None:
        size = os.path.getsize(path)
        if recorded is not None and size != recorded:
            raise fail(field_name, f"{os.path.basename(path)} is {size:,} bytes but the manifest records {recorded:,} (replaced?)")

    def _get_base(self) -> dict[str, Tensor]:
        if self._base is None:
            info = self._manifest["base"]

            def fail(f: str, msg: str) -> CheckpointChainError:
                return CheckpointChainError(f"the chain's base cannot be read, so no checkpoint can be rebuilt: field {f!r} {msg}")

            try:
                path = self._member(info["file"], BASE_NAME, "base.file", fail)
                tensors, meta = read_safetensors(path, fmt=BASE_FORMAT, versions=(str(FORMAT_VERSION),), what="checkpoint base")
            except (FileNotFoundError, CorruptFileError) as e:
                raise CheckpointChainError(f"the chain's base cannot be read, so no checkpoint can be rebuilt: {e}") from e
            if meta.get("content_sha256") != info["content_sha256"] or meta.get("structure_sha256") != info["structure_sha256"]:
                raise CheckpointChainError(f"{path} is not the base the manifest records (hash mismatch)")
            try:
                self._check_structure(tensors, "stored base")
            except BaseMismatchError as e:
                raise CheckpointChainError(f"{path}: the chain's base is damaged ({e})") from e
            if content_hash(tensors, info["names"]) != info["content_sha256"]:
                raise CheckpointChainError(f"{path}: the stored base's weights do not hash to the manifest's content_sha256")
            self._check_size(path, info.get("bytes"), "base.bytes", fail)
            self._base = {n: tensors[n] for n in info["names"]}
        return self._base

    def _chain_error(self, j: int, what: str) -> CheckpointChainError:
        return CheckpointChainError(
            f"checkpoint {j} of the chain in {self.directory} {what}: checkpoints {j}..{len(self) - 1} cannot be "
            f"rebuilt" + (f"; checkpoints 0..{j - 1} can" if j else "")
        )

    def _link_fail(self, j: int, name: str) -> Fail:
        return lambda f, msg: self._chain_error(j, f"is damaged ({name}: field {f!r} {msg})")

    def _resume_fail(self, j: int, name: str) -> Fail:
        """For the state only ``load_into`` reads (optimizer, extras, RNG): the model still rebuilds."""
        return lambda f, msg: CheckpointChainError(
            f"checkpoint {j} of the chain in {self.directory} cannot be loaded ({name}: field {f!r} {msg}); "
            "nothing was changed (rebuild() still works)"
        )

    def _read_link(self, j: int) -> _Link:
        entry = self._manifest["checkpoints"][j]
        fail = self._link_fail(j, entry["file"])
        try:
            path = self._member(entry["file"], LINK_NAME, "file", fail)
            tensors, meta = read_safetensors(path, fmt=FORMAT, versions=(str(FORMAT_VERSION),), what="fishkern checkpoint")
        except FileNotFoundError:
            raise self._chain_error(j, f"is missing ({entry['file']})") from None
        except CorruptFileError as e:
            raise self._chain_error(j, f"is corrupt ({e})") from e
        info = self._manifest["base"]
        parent = self._manifest["checkpoints"][j - 1]["id"] if j else ""
        if meta.get("id") != entry["id"] or meta.get("index") != str(j) or meta.get("parent") != parent:
            raise self._chain_error(j, f"({entry['file']}) is not the link the manifest records (id/parent mismatch)")
        if meta.get("base_content_sha256") != info["content_sha256"] or meta.get("base_structure_sha256") != info["structure_sha256"]:
            raise self._chain_error(j, f"({entry['file']}) belongs to another base")
        _check_link_meta(meta, j, entry, fail)
        self._check_size(path, entry["bytes"], "bytes", fail)
        sparse, dense = self._changes(tensors, meta, j, fail)
        return _Link(j, path, meta, tensors, sparse, dense)

    def _changes(self, tensors: Mapping[str, Tensor], meta: Mapping[str, str], j: int, fail: Fail):
        """The link's sparse changes {name: (indices, values)} and dense tensors, validated."""
        info = self._manifest["base"]
        groups: dict[str, dict[str, Tensor]] = {}
        has_mask = False
        for key, t in tensors.items():
            prefix, _, name = key.partition("/")
            if prefix in ("indices", "values", "dense"):
                if name not in info["shapes"]:
                    raise fail(key, "names no tensor of the model")
                groups.setdefault(name, {})[prefix] = t
            elif prefix == "mask":
                has_mask = True
            elif prefix not in _STATE_PREFIXES or not _DIGITS.fullmatch(name):
                raise fail(key, "is an unexpected tensor")
        if has_mask and meta["mask_from"] != str(j):
            raise fail("mask", f"tensors are stored but the mask is recorded in checkpoint {meta['mask_from'] or '(none)'}")
        sparse, dense, stored, whole = {}, {}, 0, 0
        for name, g in groups.items():
            shape, dtype = tuple(info["shapes"][name]), parse_dtype(info["dtypes"][name])
            if "dense" in g:
                t = g["dense"]
                if len(g) != 1 or tuple(t.shape) != shape or t.dtype != dtype:
                    raise fail(f"dense/{name}", f"must be the whole {dtype_name(dtype)} tensor of shape {shape}, alone")
                dense[name] = t
                whole += t.numel()
                continue
            for key in ("indices", "values"):
                if key not in g:
                    raise fail(f"{key}/{name}", "is missing")
            idx = sorted_indices(g["indices"], numel_of(shape), f"indices/{name}", fail)
            val = g["values"]
            if val.shape != idx.shape or val.dtype != dtype:
                raise fail(f"values/{name}", f"must be {idx.numel()} {dtype_name(dtype)} entries, got {dtype_name(val.dtype)} of shape {tuple(val.shape)}")
            sparse[name] = (idx, val)
            stored += idx.numel()
        if not stored <= int(meta["changed"]) <= stored + whole:  # a whole tensor holds its changed entries
            raise fail("changed", f"is {meta['changed']} but the link stores {stored} changed entries and {whole} in whole tensors")
        return sparse, dense

    @staticmethod
    def _apply_link(state: dict[str, Tensor], link: _Link) -> None:
        for name, (idx, val) in link.sparse.items():
            scatter_flat_(state[name], idx, val)
        for name, t in link.dense.items():
            state[name] = t.clone()

    def _rebuild(self, index: int) -> tuple[dict[str, Tensor], _Link]:
        i = self._normalize(index)
        state = {n: t.clone() for n, t in self._get_base().items()}
        link = None
        for j in range(i + 1):
            link = self._read_link(j)
            self._apply_link(state, link)
        return state, link

    def rebuild(self, index: int = -1) -> dict[str, Tensor]:
        """The model's ``state_dict()`` at checkpoint ``index`` (negative counts from the end), on CPU,
        rebuilt bit-exactly from the base and the chain up to it; every link is checked on the way
        (``CheckpointChainError`` for a missing, corrupt or invalid one). Cost: reading those links."""
        return self._rebuild(index)[0]

    def mask_at(self, index: int = -1) -> FishMask | None:
        """The mask saved with checkpoint ``index`` (None if it was saved without one)."""
        i = self._normalize(index)
        entry = self._manifest["checkpoints"][i]
        src = entry.get("mask_from")
        if src is None:
            return None
        return self._mask_of(self._read_link(src), entry["mask_digest"])

    def _mask_of(self, link: _Link, digest: str) -> FishMask:
        base_fail = self._link_fail(link.index, os.path.basename(link.path))

        def fail(f: str, msg: str) -> CheckpointChainError:  # fields of the mask record, and its tensors
            return base_fail(f"mask/{f[len('indices/'):]}" if f.startswith("indices/") else f"mask.{f}", msg)

        m = load_json(link.meta["mask"], "mask", base_fail)
        if not isinstance(m, dict) or set(m) != {"shapes", "forced", "provenance"}:
            raise base_fail("mask", "must be a JSON object of shapes, forced and provenance")
        indices = {k[len("mask/"):]: t for k, t in link.tensors.items() if k.startswith("mask/")}
        mask = mask_from_parts(m["shapes"], m["forced"], m["provenance"], indices, fail)
        shapes = self._manifest["base"]["shapes"]
        wrong = [n for n, s in mask.shapes.items() if n not in shapes or tuple(shapes[n]) != s]
        if wrong:
            raise fail("shapes", f"do not match the chain's model (e.g. {wrong[:3]})")
        if mask.digest != digest:
            raise self._chain_error(link.index, f"({os.path.basename(link.path)}) holds a mask whose digest does not match the manifest")
        return mask

    # ------------------------------------------------------------------ saving
    @torch.no_grad()
    def save(
        self,
        model,
        optimizer: torch.optim.Optimizer | None = None,
        mask: FishMask | None = None,
        *,
        step: int | None = None,
        epoch: int | None = None,
        extra: Any = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Append a checkpoint of ``model`` (a module: its ``state_dict()``; or a state dict) holding
        the entries whose bits changed since the previous checkpoint (or the base), plus the
        optimizer's ``state_dict()``, the mask (stored only when it changed), ``extra`` (nested
        dicts/lists/numbers/strings/tensors, e.g. an lr scheduler's ``state_dict()``) and the random
        generators' states. Returns the manifest record. Cost: one bitwise comparison of the model
        with the last saved state, and a file of about (index + value bytes) × changed entries.

        After ``load_into`` of a checkpoint that is not the last, saving would discard the later
        checkpoints: that needs ``overwrite=True`` (else ``FileExistsError``). Takes the directory's
        writer lock (``CheckpointLockedError`` when another process writes it) and refuses
        (``CheckpointChainError``, nothing written) when the manifest changed since this object read it.
        """
        with self._writer().mutex:
            self._check_unchanged()
            return self._save(model, optimizer, mask, step, epoch, extra, overwrite)

    def _save(self, model, optimizer, mask, step, epoch, extra, overwrite) -> dict[str, Any]:
        cps = self._manifest["checkpoints"]
        pos = self._position
        later = cps[pos + 1:]
        if later and not overwrite:
            raise FileExistsError(
                f"the chain in {self.directory} has checkpoints {pos + 1}..{len(cps) - 1} after checkpoint {pos}, "
                "which was loaded last; saving now would discard them: pass overwrite=True"
            )
        state = _state_of(model)
        self._check_structure(state, "model")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
        step, epoch = _optional_int(step), _optional_int(epoch)
        shadow = self._get_shadow()
        index = pos + 1
        tensors: dict[str, Tensor] = {}
        updates: dict[str, tuple[Tensor | None, Tensor]] = {}
        changed = 0
        for name in self._manifest["base"]["names"]:
            cur, old = state[name].detach(), shadow[name]
            idx = changed_indices(cur, old, self._scratch).cpu()
            if not idx.numel():
                continue
            changed += idx.numel()
            idx = idx.to(index_dtype_for(old.numel()))
            if idx.numel() * (idx.element_size() + old.element_size()) >= old.numel() * old.element_size():
                tensors[f"dense/{name}"] = cpu_copy(cur)
                updates[name] = (None, tensors[f"dense/{name}"])
            else:
                vals = gather_flat(cur, idx).cpu()
                tensors[f"indices/{name}"], tensors[f"values/{name}"] = idx, vals
                updates[name] = (idx, vals)
        prev = cps[pos] if pos >= 0 else None
        meta_mask, mask_digest, mask_from = "", None, None
        if mask is not None:
            if not isinstance(mask, FishMask):
                raise TypeError(f"mask must be a FishMask, not {type(mask).__name__}")
            mask.check_matches(model if isinstance(model, torch.nn.Module) else state, strict=isinstance(model, torch.nn.Module))
            mask_digest = mask.digest
            if prev is not None and prev.get("mask_digest") == mask_digest:
                mask_from = prev["mask_from"]
            else:
                mask_from = index
                for n, i in mask.indices.items():
                    tensors[f"mask/{n}"] = cpu_copy(i)
                check_depth(mask.provenance, "the mask's provenance")
                meta_mask = json.dumps(
                    {"shapes": {n: list(s) for n, s in mask.shapes.items()}, "forced": list(mask.forced), "provenance": mask.provenance},
                    default=str,
                )
        meta_opt = _packed(optimizer.state_dict(), tensors, "optim/", "the optimizer's state_dict()") if optimizer is not None else ""
        meta_extra = _packed(extra, tensors, "extra/", "extra") if extra is not None else ""
        meta_rng = json.dumps(_pack_rng(tensors)) if self.save_rng else ""
        ck_id = uuid.uuid4().hex
        info = self._manifest["base"]
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "index": str(index),
            "id": ck_id,
            "parent": prev["id"] if prev is not None else "",
            "base_structure_sha256": info["structure_sha256"],
            "base_content_sha256": info["content_sha256"],
            "step": "" if step is None else str(step),
            "epoch": "" if epoch is None else str(epoch),
            "changed": str(changed),
            "mask_digest": mask_digest or "",
            "mask_from": "" if mask_from is None else str(mask_from),
            "mask": meta_mask,
            "optimizer_class": type(optimizer).__name__ if optimizer is not None else "",
            "optimizer": meta_opt,
            "extra": meta_extra,
            "rng": meta_rng,
            "created": _now(),
            "fishkern_version": __version__,
        }
        fname = f"ckpt-{index:06d}-{ck_id[:12]}.safetensors"
        size = write_safetensors(self._path(fname), tensors, meta, overwrite=False)
        entry = {
            "index": index,
            "file": fname,
            "id": ck_id,
            "parent": meta["parent"],
            "step": step,
            "epoch": epoch,
            "mask_digest": mask_digest,
            "mask_from": mask_from,
            "changed": changed,
            "bytes": size,
            "created": meta["created"],
        }
        manifest = {**self._manifest, "checkpoints": cps[: pos + 1] + [entry]}
        try:
            self._write_manifest(manifest)
        except BaseException:
            self._remove(fname)  # not in the manifest: unreferenced; remove it
            raise
        self._manifest = manifest
        for e in later:
            self._remove(e["file"])
        for name, (idx, vals) in updates.items():
            if idx is None:
                shadow[name] = vals.clone()
            else:
                scatter_flat_(shadow[name], idx, vals)
        self._position = index
        return dict(entry)

    def _get_shadow(self) -> dict[str, Tensor]:
        if self._shadow is None:
            if self._position >= 0:
                self._shadow = self.rebuild(self._position)
            else:
                self._shadow = {n: t.clone() for n, t in self._get_base().items()}
        return self._shadow

    def _remove(self, fname: str) -> None:
        """Delete a file of the chain: only names of fishkern's own pattern, inside the directory."""

        def fail(f: str, msg: str) -> CheckpointChainError:
            return CheckpointChainError(msg)

        try:
            pattern = BASE_NAME if fname.startswith("base-") else LINK_NAME
            os.unlink(member_path(self.directory, fname, pattern, "file", fail))
        except (OSError, CheckpointChainError):
            pass

    # ------------------------------------------------------------------ resuming
    @torch.no_grad()
    def load_into(self, model, optimizer: torch.optim.Optimizer | None = None, index: int = -1, *, restore_rng: bool = True) -> CheckpointState:
        """Restore checkpoint ``index`` into ``model`` (a module or a state dict of tensors to copy
        into) and ``optimizer`` (built with the mask of that checkpoint: ``mask_at(index)``), and
        the random generators; the next ``save`` follows this checkpoint. Everything is read and
        validated first (chain, structure, optimizer class, mask, extras, RNG states); then the
        optimizer's ``load_state_dict`` (fishkern's masked optimizers check the state against their
        mask before changing anything), the model and the generators are written. On an error
        nothing is changed. Returns step, epoch, extra and mask of the checkpoint."""
        i = self._normalize(index)
        state, link = self._rebuild(i)
        target = _state_of(model)
        self._check_structure(target, "model")
        entry = self._manifest["checkpoints"][i]
        fail = self._resume_fail(i, entry["file"])
        opt_sd = _unpacked(link, "optimizer", fail)
        extra = _unpacked(link, "extra", fail)
        rng = _checked_rng(_unpacked(link, "rng", fail), fail) if restore_rng and link.meta["rng"] else None
        if optimizer is not None and opt_sd is None:
            raise ValueError(f"checkpoint {i} was saved without an optimizer state")
        if optimizer is not None and link.meta.get("optimizer_class") != type(optimizer).__name__:
            raise ValueError(
                f"checkpoint {i} holds the state of a {link.meta.get('optimizer_class')}, not of a {type(optimizer).__name__}"
            )
        mask = self.mask_at(i)
        m = link.meta
        step = meta_int(m, "step", fail, lo=None, optional=True)
        epoch = meta_int(m, "epoch", fail, lo=None, optional=True)
        # everything is checked: apply
        if optimizer is not None:
            optimizer.load_state_dict(opt_sd)  # fishkern's masked optimizers validate before changing anything
        for name in self._manifest["base"]["names"]:
            target[name].copy_(state[name])
        if rng is not None:
            _restore_rng(rng)
        self._shadow = state
        self._position = i
        return CheckpointState(index=i, step=step, epoch=epoch, extra=extra, mask=mask, entry=dict(entry))


# ---------------------------------------------------------------------------------------- manifest
def _check_manifest(m: dict[str, Any], fail: Fail) -> None:
    """Every field of a manifest: types, ranges, file names of fishkern's own pattern, and the
    chain's consistency (indices, parent ids, file names derived from index and id, mask records).
    Unknown keys are refused too: a damaged "checksum" key must not pass for a manifest without one."""
    _check_keys(m, _MANIFEST_KEYS, "(file)", fail)
    if not isinstance(m.get("created"), str):
        raise fail("created", "must be a string")
    base = m.get("base")
    if not isinstance(base, dict):
        raise fail("base", "must be a JSON object")
    _check_keys(base, _BASE_KEYS, "base", fail)
    names = names_of(base.get("names"), "base.names", fail)
    shapes = shapes_of(base.get("shapes"), "base.shapes", fail)
    dtypes = dtypes_of(base.get("dtypes"), "base.dtypes", fail)
    for key, d in (("base.shapes", shapes), ("base.dtypes", dtypes)):
        if set(d) != set(names):
            raise fail(key, "must describe exactly the tensors of base.names")
    for key in ("structure_sha256", "content_sha256"):
        if not isinstance(base.get(key), str) or not HEX64.fullmatch(base[key]):
            raise fail(f"base.{key}", "must be a sha256 hex digest")
    if base["structure_sha256"] != structure_hash({n: shapes[n] for n in names}, dtypes):
        raise fail("base.structure_sha256", "does not match base.names, base.shapes and base.dtypes")
    if base.get("file") is not None and not (isinstance(base["file"], str) and BASE_NAME.fullmatch(base["file"])):
        raise fail("base.file", f"must be null or a file name of the form {BASE_NAME.pattern}, got {base['file']!r:.120}")
    if base.get("bytes") is not None or base.get("file") is not None:
        int_in(base.get("bytes"), "base.bytes", fail)
    if base.get("identity") is not None and not isinstance(base["identity"], dict):
        raise fail("base.identity", "must be a JSON object or null")
    entries = m.get("checkpoints")
    if not isinstance(entries, list):
        raise fail("checkpoints", "must be a list")
    for i, e in enumerate(entries):
        _check_entry(e, i, entries, fail)


def _check_keys(record: dict, known: tuple[str, ...], field_name: str, fail: Fail) -> None:
    unknown = [k for k in record if k not in known]
    if unknown:
        raise fail(field_name, f"holds unknown keys {unknown[:3]!r:.120}")


def _check_entry(e: Any, i: int, entries: list, fail: Fail) -> None:
    f = f"checkpoints[{i}]"
    if not isinstance(e, dict):
        raise fail(f, "must be a JSON object")
    lacking = [k for k in _ENTRY_KEYS if k not in e]
    if lacking:
        raise fail(f, f"lacks {lacking}")
    _check_keys(e, _ENTRY_KEYS, f, fail)
    if e["index"] != i or not isinstance(e["index"], int) or isinstance(e["index"], bool):
        raise fail(f"{f}.index", f"must be {i}, got {e['index']!r:.40}")
    if not isinstance(e["id"], str) or not HEX32.fullmatch(e["id"]):
        raise fail(f"{f}.id", "must be 32 hex digits")
    parent = entries[i - 1]["id"] if i else ""
    if e["parent"] != parent:
        raise fail(f"{f}.parent", f"must be the previous checkpoint's id {parent!r}, got {e['parent']!r:.40}")
    expected = f"ckpt-{i:06d}-{e['id'][:12]}.safetensors"
    if e["file"] != expected:
        raise fail(f"{f}.file", f"must be {expected!r} (the name fishkern gives checkpoint {i}), got {e['file']!r:.120}")
    optional_int(e["step"], f"{f}.step", fail)
    optional_int(e["epoch"], f"{f}.epoch", fail)
    hex_or_none(e["mask_digest"], HEX64, f"{f}.mask_digest", fail)
    src = optional_int(e["mask_from"], f"{f}.mask_from", fail)
    if (e["mask_digest"] is None) != (src is None):
        raise fail(f"{f}.mask_from", "must be given exactly when mask_digest is")
    if src is not None:
        int_in(src, f"{f}.mask_from", fail, 0, i)
        holder = entries[src]
        if holder.get("mask_from") != src or holder.get("mask_digest") != e["mask_digest"]:
            raise fail(f"{f}.mask_from", f"names checkpoint {src}, which does not store that mask")
    int_in(e["changed"], f"{f}.changed", fail)
    int_in(e["bytes"], f"{f}.bytes", fail)
    if not isinstance(e["created"], str):
        raise fail(f"{f}.created", "must be a string")


def _check_link_meta(meta: Mapping[str, str], j: int, entry: Mapping[str, Any], fail: Fail) -> None:
    """A link's metadata fields: types, and agreement with the manifest's record of it."""
    for key, want in (("step", entry["step"]), ("epoch", entry["epoch"])):
        if meta_int(meta, key, fail, lo=None, optional=True) != want:
            raise fail(key, f"is {meta[key]!r:.40} but the manifest records {want!r}")
    if meta_int(meta, "changed", fail) != entry["changed"]:
        raise fail("changed", f"is {meta['changed']!r:.40} but the manifest records {entry['changed']}")
    if (meta_str(meta, "mask_digest", fail, HEX64, empty=True) or None) != entry["mask_digest"]:
        raise fail("mask_digest", "does not match the manifest's record")
    if meta_int(meta, "mask_from", fail, optional=True) != entry["mask_from"]:
        raise fail("mask_from", f"is {meta['mask_from']!r:.40} but the manifest records {entry['mask_from']!r}")
    if (meta_str(meta, "mask", fail) != "") != (entry["mask_from"] == j):
        raise fail("mask", "must be stored exactly in the checkpoint where the mask changed")
    for key in ("optimizer_class", "optimizer", "extra", "rng", "created", "fishkern_version"):
        meta_str(meta, key, fail)
    if (meta["optimizer_class"] == "") != (meta["optimizer"] == ""):
        raise fail("optimizer_class", "must be given exactly when the optimizer state is")


# ---------------------------------------------------------------------------------------- state
def _packed(obj: Any, tensors: dict[str, Tensor], prefix: str, what: str) -> str:
    """``pack`` as JSON, refusing what ``load_into`` would refuse (too deep a nesting)."""
    data = pack(obj, tensors, prefix)
    check_depth(data, what)
    return json.dumps(data)


def _unpacked(link: _Link, key: str, fail: Fail) -> Any:
    """A link's packed JSON field (optimizer, extra, rng), decoded; None when not stored."""
    text = link.meta[key]
    if not text:
        return None
    data = load_json(text, key, fail)
    try:
        return unpack(data, link.tensors)
    except CorruptFileError as e:
        raise fail(key, f"is damaged ({e})") from None


# ---------------------------------------------------------------------------------------- RNG
_MT_WORDS = 624  # Mersenne Twister state: 624 32-bit words and a position


def _pack_rng(tensors: dict[str, Tensor]) -> Any:
    out: dict[str, Any] = {"torch": pack(torch.get_rng_state(), tensors, "rng/")}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = pack(torch.cuda.get_rng_state_all(), tensors, "rng/")
    out["python"] = pack(random.getstate(), tensors, "rng/")
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = pack((name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)), tensors, "rng/")
    except ImportError:  # numpy is optional here
        pass
    return out


def _byte_state(t: Any, what: str, fail: Fail) -> Tensor:
    if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise fail("rng", f"{what} state must be a 1-D uint8 tensor")
    return t


def _mt_words_ok(words: Any) -> bool:
    return isinstance(words, (tuple, list)) and len(words) == _MT_WORDS + 1 and all(
        isinstance(w, int) and not isinstance(w, bool) for w in words
    ) and all(0 <= w < 2**32 for w in words[:-1]) and 0 <= words[-1] <= _MT_WORDS


def _checked_rng(rng: Any, fail: Fail) -> dict[str, Any]:
    """The generators' states of a link, each checked by loading it into a throwaway generator of
    its kind (so ``_restore_rng`` cannot fail half-way), values in range (nothing truncated)."""
    if not isinstance(rng, dict) or "torch" not in rng or set(rng) - {"torch", "cuda", "python", "numpy"}:
        raise fail("rng", "must hold the states 'torch' (and 'cuda', 'python', 'numpy' where saved)")
    try:
        torch.Generator().set_state(_byte_state(rng["torch"], "the torch", fail))
    except (RuntimeError, ValueError, TypeError) as e:
        raise fail("rng", f"holds an invalid torch generator state ({e})") from None
    if "cuda" in rng:
        states = rng["cuda"]
        if not isinstance(states, (list, tuple)):
            raise fail("rng", "CUDA states must be a list")
        for s in states:
            _byte_state(s, "a CUDA", fail)
        if torch.cuda.is_available():
            if len(states) > torch.cuda.device_count():
                raise fail("rng", f"holds {len(states)} CUDA states for {torch.cuda.device_count()} devices")
            if torch.cuda.is_initialized():
                for d, s in enumerate(states):
                    if s.numel() != torch.cuda.get_rng_state(d).numel():
                        raise fail("rng", f"the CUDA state of device {d} has the wrong size")
    if "python" in rng:
        st = rng["python"]
        if not (isinstance(st, tuple) and len(st) == 3 and st[0] == 3 and _mt_words_ok(st[1])
                and (st[2] is None or isinstance(st[2], float))):
            raise fail("rng", "the Python random state must be (3, 625 words, gauss)")
        try:
            random.Random().setstate(st)
        except (TypeError, ValueError, OverflowError) as e:
            raise fail("rng", f"holds an invalid Python random state ({e})") from None
    if "numpy" in rng:
        _check_numpy_state(rng["numpy"], fail)
    return rng


def _check_numpy_state(st: Any, fail: Fail) -> None:
    ok = (
        isinstance(st, tuple) and len(st) == 5 and st[0] == "MT19937"
        and isinstance(st[1], Tensor) and st[1].dtype == torch.int64 and tuple(st[1].shape) == (_MT_WORDS,)
        and is_int(st[2]) and 0 <= st[2] <= _MT_WORDS and is_int(st[3]) and st[3] in (0, 1) and isinstance(st[4], float)
    )
    if not ok:
        raise fail("rng", "the NumPy state must be ('MT19937', 624 int64 words, pos, has_gauss, cached)")
    keys = st[1]
    if int(keys.min()) < 0 or int(keys.max()) >= 2**32:
        raise fail("rng", "the NumPy state's words must be 32-bit")
    try:
        import numpy as np

        np.random.RandomState().set_state((st[0], keys.numpy().astype(np.uint32), st[2], st[3], st[4]))
    except ImportError:
        pass
    except (TypeError, ValueError, OverflowError) as e:
        raise fail("rng", f"holds an invalid NumPy state ({e})") from None


def _restore_rng(rng: Mapping[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "python" in rng:
        random.setstate(rng["python"])
    if "numpy" in rng:
        import numpy as np

        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
