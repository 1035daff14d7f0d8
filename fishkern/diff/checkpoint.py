"""SparseCheckpointer: a chain of checkpoints that each store only what changed since the previous one.

Made for sparse training from scratch or from a pretrained model, where the mask may be recomputed
every E epochs (the paper's Table 4: E = 1, 2, 4 or a fixed mask): checkpoint i holds the entries of
the model's ``state_dict()`` whose bits differ from checkpoint i-1 (checkpoint 0: from the base). When
the mask changes, the entries trained under the old mask keep their (already saved) values and are
not stored again; the new mask's entries are stored as they move. Buffers that change everywhere
(BatchNorm running statistics, counters) are stored whole, when that is smaller than index + value.

Directory layout
----------------
``manifest.json`` (the chain; replaced atomically: it is the source of truth), ``base-<id>.safetensors``
(the full base, format ``fishkern.checkpoint-base``; omitted with ``store_base=False``, then the base
must be passed again to reopen the chain), ``ckpt-<index>-<id>.safetensors`` (format
``fishkern.checkpoint`` version 1). Files get unique names and are written atomically (temporary
file, fsync, link/rename, fsync of the directory) before the manifest names them, so a crash leaves
at worst an unreferenced file, never a broken chain.

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
(checksum, id, parent id, base hashes) while the chain is read, and a missing or corrupt link is a
``CheckpointChainError`` that says which checkpoints can still be rebuilt. ``load_into`` restores the
model, the optimizer (``load_state_dict``) and the random generators, so training continues
bit-identically; it validates everything before writing anything.

Memory: the checkpointer keeps a CPU copy of the base and of the last saved state (to find what
changed): two model copies. Single writer per directory.
"""
from __future__ import annotations

import datetime
import json
import os
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._indices import index_dtype_for
from .._version import __version__
from ..mask.fishmask import FishMask, model_identity
from ._io import (
    BaseMismatchError,
    CorruptFileError,
    changed_indices,
    content_hash,
    cpu_copy,
    dtype_name,
    gather_flat,
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

__all__ = ["SparseCheckpointer", "CheckpointState", "CheckpointChainError"]

FORMAT = "fishkern.checkpoint"
BASE_FORMAT = "fishkern.checkpoint-base"
MANIFEST_FORMAT = "fishkern.checkpoints"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CheckpointChainError(ValueError):
    """A checkpoint chain that cannot be read: missing or corrupt manifest, base or link."""


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


class SparseCheckpointer:
    """Write and read a chain of sparse checkpoints in ``directory`` (see the module docstring).

    Args:
        directory: created if needed. If it holds a chain (``manifest.json``), the chain is
            opened and new checkpoints are appended to it; ``overwrite=True`` starts a new chain
            instead (the old chain's files are deleted once the new manifest is written).
        base: the model at the start (or its ``state_dict()``), copied to CPU. Required for a new
            chain; for an existing one it is optional and, when given, must be bit-identical to the
            chain's base (``BaseMismatchError``).
        store_base: write the base once into the directory (a full checkpoint) so that the chain
            can be rebuilt from the directory alone. Turn it off when the base is a pretrained model
            that you keep elsewhere; then pass it as ``base`` when reopening.
        save_rng: store the random generators' states with each checkpoint (restored by
            ``load_into``), needed for bit-identical resumption when training draws random numbers
            (dropout, shuffling).
    """

    def __init__(self, directory: str | os.PathLike, base=None, *, store_base: bool = True, overwrite: bool = False, save_rng: bool = True):
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.save_rng = bool(save_rng)
        self._base: dict[str, Tensor] | None = None
        self._shadow: dict[str, Tensor] | None = None  # the state at self._position, on CPU
        self._scratch: dict = {}  # a reused bool buffer for the bitwise comparisons
        manifest_path = self._path(MANIFEST)
        if os.path.exists(manifest_path) and not overwrite:
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
            return
        if base is None:
            raise ValueError("a new checkpoint chain needs base= (the model at the start, or its state_dict())")
        discard = []
        if os.path.exists(manifest_path):  # overwrite=True: the old chain goes once the new one is written
            try:
                old = self._read_manifest()
                discard = [e["file"] for e in old["checkpoints"]] + ([old["base"]["file"]] if old["base"].get("file") else [])
            except CheckpointChainError:
                discard = []
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
        write_json(manifest_path, manifest)
        self._manifest = manifest
        self._base = state
        self._shadow = {n: t.clone() for n, t in state.items()}
        self._position = -1
        for f in discard:
            if f != info["file"]:
                self._remove(f)

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

    # ------------------------------------------------------------------ manifest, base, links
    def _read_manifest(self) -> dict[str, Any]:
        path = self._path(MANIFEST)
        try:
            with open(path) as f:
                m = json.load(f)
            if m.get("format") != MANIFEST_FORMAT or m.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format {m.get('format')!r} version {m.get('format_version')!r}")
            lacking = [key for key in ("names", "shapes", "dtypes", "structure_sha256", "content_sha256") if key not in m["base"]]
            if lacking:
                raise ValueError(f"the base record lacks {lacking}")
            for i, e in enumerate(m["checkpoints"]):
                if e.get("index") != i or any(key not in e for key in ("file", "id", "parent", "mask_digest", "mask_from")):
                    raise ValueError(f"checkpoint record {i} is malformed")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointChainError(f"{path} is not a readable fishkern checkpoint manifest: {e}") from e
        return m

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

    def _get_base(self) -> dict[str, Tensor]:
        if self._base is None:
            info = self._manifest["base"]
            path = self._path(info["file"])
            try:
                tensors, meta = read_safetensors(path, fmt=BASE_FORMAT, versions=(str(FORMAT_VERSION),), what="checkpoint base")
            except (FileNotFoundError, CorruptFileError) as e:
                raise CheckpointChainError(f"the chain's base cannot be read, so no checkpoint can be rebuilt: {e}") from e
            if meta.get("content_sha256") != info["content_sha256"] or meta.get("structure_sha256") != info["structure_sha256"]:
                raise CheckpointChainError(f"{path} is not the base the manifest records (hash mismatch)")
            self._check_structure(tensors, "stored base")
            self._base = {n: tensors[n] for n in info["names"]}
        return self._base

    def _chain_error(self, j: int, what: str) -> CheckpointChainError:
        return CheckpointChainError(
            f"checkpoint {j} of the chain in {self.directory} {what}: checkpoints {j}..{len(self) - 1} cannot be "
            f"rebuilt" + (f"; checkpoints 0..{j - 1} can" if j else "")
        )

    def _read_link(self, j: int) -> _Link:
        entry = self._manifest["checkpoints"][j]
        path = self._path(entry["file"])
        try:
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
        sparse, dense = {}, {}
        try:
            groups: dict[str, dict[str, Tensor]] = {}
            for key, t in tensors.items():
                prefix, _, name = key.partition("/")
                if prefix in ("indices", "values", "dense"):
                    if name not in info["shapes"]:
                        raise ValueError(f"tensor {key!r} names no tensor of the model")
                    groups.setdefault(name, {})[prefix] = t
                elif prefix not in ("mask", "optim", "extra", "rng"):
                    raise ValueError(f"unexpected tensor {key!r}")
            for name, g in groups.items():
                shape, dtype = tuple(info["shapes"][name]), parse_dtype(info["dtypes"][name])
                if "dense" in g:
                    if len(g) != 1 or tuple(g["dense"].shape) != shape or g["dense"].dtype != dtype:
                        raise ValueError(f"malformed dense tensor {name!r}")
                    dense[name] = g["dense"]
                    continue
                idx, val = g.get("indices"), g.get("values")
                if idx is None or val is None or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64) or idx.numel() == 0:
                    raise ValueError(f"malformed indices of {name!r}")
                n = numel_of(shape)
                if int(idx[0]) < 0 or int(idx[-1]) >= n or not bool((idx[1:] > idx[:-1]).all()):
                    raise ValueError(f"indices of {name!r} are not strictly increasing in [0, {n})")
                if val.shape != idx.shape or val.dtype != dtype:
                    raise ValueError(f"values of {name!r} do not match its indices or dtype")
                sparse[name] = (idx, val)
        except ValueError as e:
            raise self._chain_error(j, f"is damaged ({e})") from e
        return _Link(j, meta, tensors, sparse, dense)

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
        (``CheckpointChainError`` for a missing or corrupt one). Cost: reading those links."""
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
        try:
            m = json.loads(link.meta["mask"])
            indices = {k[len("mask/"):]: t for k, t in link.tensors.items() if k.startswith("mask/")}
            mask = FishMask({n: tuple(s) for n, s in m["shapes"].items()}, indices, tuple(m["forced"]), m["provenance"])
        except (KeyError, ValueError, TypeError) as e:
            raise self._chain_error(link.index, f"holds a damaged mask ({e})") from e
        if mask.digest != digest:
            raise self._chain_error(link.index, "holds a mask whose digest does not match the manifest")
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
        checkpoints: that needs ``overwrite=True`` (else ``FileExistsError``).
        """
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
                meta_mask = json.dumps(
                    {"shapes": {n: list(s) for n, s in mask.shapes.items()}, "forced": list(mask.forced), "provenance": mask.provenance},
                    default=str,
                )
        meta_opt = json.dumps(pack(optimizer.state_dict(), tensors, "optim/")) if optimizer is not None else ""
        meta_extra = json.dumps(pack(extra, tensors, "extra/")) if extra is not None else ""
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
            "step": "" if step is None else str(int(step)),
            "epoch": "" if epoch is None else str(int(epoch)),
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
            write_json(self._path(MANIFEST), manifest)
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
        try:
            os.unlink(self._path(fname))
        except OSError:
            pass

    # ------------------------------------------------------------------ resuming
    @torch.no_grad()
    def load_into(self, model, optimizer: torch.optim.Optimizer | None = None, index: int = -1, *, restore_rng: bool = True) -> CheckpointState:
        """Restore checkpoint ``index`` into ``model`` (a module or a state dict of tensors to copy
        into) and ``optimizer`` (built with the mask of that checkpoint: ``mask_at(index)``), and
        the random generators; the next ``save`` follows this checkpoint. Everything is read and
        checked first (chain, structure, optimizer state against the optimizer's mask): on an error
        nothing is changed. Returns step, epoch, extra and mask of the checkpoint."""
        i = self._normalize(index)
        state, link = self._rebuild(i)
        target = _state_of(model)
        self._check_structure(target, "model")
        entry = self._manifest["checkpoints"][i]
        try:
            opt_sd = unpack(json.loads(link.meta["optimizer"]), link.tensors) if link.meta.get("optimizer") else None
            extra = unpack(json.loads(link.meta["extra"]), link.tensors) if link.meta.get("extra") else None
            rng = unpack(json.loads(link.meta["rng"]), link.tensors) if link.meta.get("rng") else None
        except (ValueError, KeyError, TypeError) as e:
            raise self._chain_error(i, f"holds damaged state ({e})") from e
        if optimizer is not None and opt_sd is None:
            raise ValueError(f"checkpoint {i} was saved without an optimizer state")
        if optimizer is not None and link.meta.get("optimizer_class") != type(optimizer).__name__:
            raise ValueError(
                f"checkpoint {i} holds the state of a {link.meta.get('optimizer_class')}, not of a {type(optimizer).__name__}"
            )
        mask = self.mask_at(i)
        if optimizer is not None:
            optimizer.load_state_dict(opt_sd)  # fishkern's masked optimizers validate before changing anything
        for name in self._manifest["base"]["names"]:
            target[name].copy_(state[name])
        if restore_rng and rng is not None:
            _restore_rng(rng)
        self._shadow = state
        self._position = i
        m = link.meta
        return CheckpointState(
            index=i,
            step=int(m["step"]) if m.get("step") else None,
            epoch=int(m["epoch"]) if m.get("epoch") else None,
            extra=extra,
            mask=mask,
            entry=dict(entry),
        )


# ---------------------------------------------------------------------------------------- RNG
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
