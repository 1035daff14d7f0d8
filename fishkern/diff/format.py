"""SparseDiff: the k trained entries of a model as one small safetensors file.

A diff is made from a base model and a tuned model (``SparseDiff.from_models``), over the entries
of a ``FishMask`` or over the entries that changed. ``apply_`` turns the base into the tuned model
and ``revert_`` turns it back, both **bit-exactly**, and both refuse (changing nothing) a model
that is not the diff's base (resp. tuned) model.

Kinds
-----
``kind="delta"`` (default, 8 bytes per entry for fp32 with int32 indices: BERT-large at 0.5% is
13.4 MB against 1.34 GB): ``values`` are ``tuned - base``, in fp32 (fp64 for fp64 parameters), so
they can be inspected, scaled or merged as a task vector. ``apply_`` computes
``(base.to(S) + delta).to(dtype)`` and ``revert_`` ``(tuned.to(S) - delta).to(dtype)``; floating
point does not always give the exact tuned / base values back (e.g. a weight that changes sign, or
NaN/inf), so ``from_models`` evaluates both directions and stores the exact value for each entry
where the arithmetic misses ("fix-ups", usually none or a handful). Both directions are then exact.

``kind="absolute"`` (12 bytes per fp32 entry): ``values`` are the tuned entries and ``base_values``
the base entries; apply / revert are pure copies.

File format (safetensors, format ``fishkern.diff`` version 1)
-------------------------------------------------------------
Tensors, per parameter with entries (``<name>`` is the parameter's full name):
``indices/<name>`` sorted flat row-major indices (int32 below 2**31 entries, else int64, as in
``FishMask``); ``values/<name>``; ``base_values/<name>`` (absolute only); for deltas, where needed,
``fix_apply_pos/<name>`` / ``fix_apply_val/<name>`` and ``fix_revert_pos/<name>`` /
``fix_revert_val/<name>`` (positions into the parameter's entries, and the exact values there).
String metadata: ``format``, ``format_version``, ``kind``, ``shapes`` and ``dtypes`` (JSON, every
tensor the diff was made over, in model order), ``base_identity`` (JSON: class, Hugging Face
name, parameter count, when the base was a module), ``base_structure_sha256``,
``base_entries_sha256``, ``base_content_sha256`` (``""`` when not computed),
``tuned_entries_sha256``, ``tuned_content_sha256``, ``mask_digest`` (``""`` without a mask), ``k``,
``numel``, ``density``, ``step``, ``epoch`` (``""`` when not given), ``extra`` (JSON),
``fishkern_version``, ``checksum`` (sha256 over all other metadata and all tensor bytes).

What the hashes guarantee
-------------------------
- structure (always checked): the model has exactly the diff's tensor names, shapes and dtypes.
- entries (always checked, costs O(k)): the model's values at the diff's k entries are bitwise the
  base's (``apply_``) or the tuned model's (``revert_``); and the values about to be written hash
  to the tuned (resp. base) entries before anything is written. So the written entries are always
  exactly right, and a diff applied twice, or reverted on the base, is refused.
- content (``verify="full"``, the default when the diff has it; ~0.7 s per GB): every byte of every
  parameter equals the base (resp. tuned) model, so the result is the tuned (resp. base) model
  bit for bit, up to a sha256 collision. With ``verify="entries"`` entries outside the diff are not
  checked: the result is "this model with the tuned entries written".
The base identity is informative only (a state dict has none); refusals rest on the hashes.

Reading a file (``load``) checks, before anything is returned: the header's size (at most 64 MiB),
the checksum, then every field's content (see ``_decode``): types and ranges (shapes of non-negative
integers, known dtypes, hex digests, decimal step/epoch), tensor names, sorted in-range indices
without duplicates, values and fix-ups of the right lengths and dtypes, JSON nested at most 100
levels, and k, numel, density and the structure hash consistent with the rest. Any failure is a
``CorruptFileError`` that names the file and the field.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from ..mask.indices import index_dtype_for
from .._version import __version__
from ..mask.fishmask import FishMask, model_identity
from ._io import (
    BaseMismatchError,
    CorruptFileError,
    bits,
    bitwise_ne,
    changed_indices,
    content_hash as _content_hash,
    dtype_name,
    entries_hash,
    gather_flat,
    numel_of,
    read_safetensors,
    scatter_flat_,
    structure_hash,
    write_safetensors,
)
from ._validate import (
    HEX64,
    Fail,
    check_depth,
    dtypes_of,
    failer,
    load_json,
    meta_int,
    meta_str,
    shapes_of,
    sorted_indices,
)

__all__ = ["SparseDiff", "size_report", "dense_nbytes", "KINDS", "FORMAT", "FORMAT_VERSION"]

FORMAT = "fishkern.diff"
FORMAT_VERSION = 1
KINDS = ("delta", "absolute")
VERIFY = ("auto", "full", "entries")

#: a model (its named parameters), or named tensors
TensorsLike = Union[torch.nn.Module, Mapping[str, Tensor], Iterable[tuple[str, Tensor]]]

_FIX_KEYS = ("fix_apply_pos", "fix_apply_val", "fix_revert_pos", "fix_revert_val")


def named_tensors(x: TensorsLike, what: str = "model") -> dict[str, Tensor]:
    """{name: tensor}: a module's named parameters, or the given named tensors (e.g. a state dict)."""
    if isinstance(x, torch.nn.Module):
        return dict(x.named_parameters())
    items = x.items() if isinstance(x, Mapping) else x
    out = {}
    for name, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = t
    return out


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _refuse_live_base(B: Mapping[str, Tensor], T: Mapping[str, Tensor], mask: FishMask | None) -> None:
    """A base that shares memory with the tuned model (``model.state_dict()`` taken before training
    holds the live parameters, which training changes in place) equals the tuned model where it
    matters: the diff would record no change, and ``apply_`` onto the real base would be refused.
    Refused here: with a mask, any tensor the mask selects; without one, when every tensor is shared
    (nothing could differ). Shared tensors the mask leaves frozen are fine (they cannot change)."""
    shared = [n for n in B if _shares_memory(B[n], T[n])]
    if not shared:
        return
    if mask is not None:
        shared = [n for n in shared if mask.k_of(n)]
    elif len(shared) < sum(1 for n in B if B[n].numel()):
        return
    if shared:
        raise ValueError(
            f"the base's {shared[0]!r} shares memory with the tuned model's ({len(shared)} such tensors): the base "
            "is the live model, not a copy of its weights before training (model.state_dict() returns the live "
            "parameters). Take a copy before training: {n: t.detach().clone() for n, t in model.state_dict().items()}"
        )


def _delta_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.float32
    raise TypeError(f"kind='delta' needs fp16/bf16/fp32/fp64 tensors, not {dtype}; use kind='absolute'")


def _plus(cur: Tensor, delta: Tensor, dtype: torch.dtype) -> Tensor:
    return (cur.to(delta.dtype) + delta).to(dtype)


def _minus(cur: Tensor, delta: Tensor, dtype: torch.dtype) -> Tensor:
    return (cur.to(delta.dtype) - delta).to(dtype)


def _fixups(got: Tensor, want: Tensor) -> tuple[Tensor, Tensor]:
    pos = (bits(got) != bits(want)).nonzero().squeeze(1)
    return pos.to(index_dtype_for(max(int(want.numel()), 1))), want.index_select(0, pos)


def _check_structure(diff: "SparseDiff", tensors: Mapping[str, Tensor], role: str) -> None:
    missing = [n for n in diff.shapes if n not in tensors]
    extra = [n for n in tensors if n not in diff.shapes]
    if missing or extra:
        raise BaseMismatchError(
            f"this model is not the diff's {role}: "
            + (f"{len(missing)} of the diff's tensors are missing from it (e.g. {missing[:3]})" if missing else "")
            + ("; " if missing and extra else "")
            + (f"it has {len(extra)} tensors the diff does not know (e.g. {extra[:3]})" if extra else "")
        )
    for n, shape in diff.shapes.items():
        t = tensors[n]
        if tuple(t.shape) != shape or t.dtype != diff.dtypes[n]:
            raise BaseMismatchError(
                f"this model is not the diff's {role}: {n!r} is {dtype_name(t.dtype)} {tuple(t.shape)} in the model "
                f"but {dtype_name(diff.dtypes[n])} {shape} in the diff"
            )


@dataclass
class SparseDiff:
    """The entries of a model that differ from (or were trained away from) a base model.

    Build with ``from_models``; write with ``save``; read with ``load``; use with ``apply_`` /
    ``revert_``. See the module docstring for the file format and the guarantees.
    """

    kind: str
    shapes: dict[str, tuple[int, ...]]  # every tensor the diff was made over, in model order
    dtypes: dict[str, torch.dtype]
    indices: dict[str, Tensor]  # tensors with entries only: sorted flat row-major indices
    values: dict[str, Tensor]  # delta: tuned - base (fp32 / fp64); absolute: tuned values
    base_values: dict[str, Tensor] = field(default_factory=dict)  # absolute only
    fixups: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # delta only, see module doc
    base: dict[str, Any] = field(default_factory=dict)  # identity, structure/entries/content sha256
    tuned: dict[str, Any] = field(default_factory=dict)  # entries/content sha256
    mask_digest: str | None = None
    step: int | None = None
    epoch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ summary
    @property
    def k(self) -> int:
        """Number of entries the diff holds."""
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def numel(self) -> int:
        """Number of entries of all tensors the diff was made over."""
        return sum(numel_of(s) for s in self.shapes.values())

    @property
    def density(self) -> float:
        return self.k / self.numel if self.numel else 0.0

    @property
    def num_fixups(self) -> int:
        return sum(int(f[p].numel()) for f in self.fixups.values() for p in ("fix_apply_pos", "fix_revert_pos") if p in f)

    def __repr__(self) -> str:
        return (
            f"SparseDiff(kind={self.kind!r}, k={self.k:,}, density={self.density:.4%}, tensors={len(self.shapes)}, "
            f"with_entries={len(self.indices)}, fixups={self.num_fixups}, mask={(self.mask_digest or '-')[:12]}, "
            f"step={self.step}, epoch={self.epoch})"
        )

    # ------------------------------------------------------------------ building
    @classmethod
    @torch.no_grad()
    def from_models(
        cls,
        base: TensorsLike,
        tuned: TensorsLike,
        mask: FishMask | None = None,
        *,
        kind: str = "delta",
        content_hash: bool = True,
        check_outside_mask: bool = True,
        step: int | None = None,
        epoch: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> "SparseDiff":
        """The diff that turns ``base`` into ``tuned``.

        base, tuned: modules (their named parameters) or named tensors with the same names, shapes
            and dtypes; ``base`` must not have been modified in place by the training.
        mask: the ``FishMask`` the model was trained with: the diff holds exactly its k entries
            (also those that did not move) and records its digest. With ``check_outside_mask`` an
            entry outside the mask that differs is an error (it would be lost). Without a mask the
            diff holds the entries that differ bitwise.
        kind: ``"delta"`` or ``"absolute"`` (see the module docstring).
        content_hash: also hash every byte of base and tuned (~0.7 s per GB each) so that
            ``apply_`` / ``revert_`` can verify the whole model, not only the k entries.
        step, epoch, extra: recorded in the file (``extra``: JSON-able).
        Cost: one bitwise comparison of the two models (with a mask only when checking outside it).
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        B, T = named_tensors(base, "base"), named_tensors(tuned, "tuned")
        if list(B) != list(T):
            only = [n for n in B if n not in T] + [n for n in T if n not in B]
            raise ValueError(f"base and tuned models have different tensors (e.g. {only[:3] or 'a different order'})")
        for n in B:
            if B[n].shape != T[n].shape or B[n].dtype != T[n].dtype:
                raise ValueError(
                    f"{n!r} is {dtype_name(B[n].dtype)} {tuple(B[n].shape)} in the base but "
                    f"{dtype_name(T[n].dtype)} {tuple(T[n].shape)} in the tuned model"
                )
        shapes = {n: tuple(t.shape) for n, t in B.items()}
        dtypes = {n: t.dtype for n, t in B.items()}
        indices: dict[str, Tensor] = {}
        if mask is not None:
            mask.check_matches(shapes, strict=False)  # tensors the mask does not know must not change
        _refuse_live_base(B, T, mask)
        if mask is not None:
            for n in shapes:
                if n in mask.indices:
                    indices[n] = mask.indices[n].cpu()
            if check_outside_mask:
                outside, scratch = {}, {}
                for n in shapes:
                    ne = bitwise_ne(T[n], B[n], scratch)
                    if n in indices:
                        ne.index_fill_(0, indices[n].to(ne.device, torch.int64), False)
                    c = int(torch.count_nonzero(ne))
                    if c:
                        outside[n] = c
                if outside:
                    first = next(iter(outside))
                    raise ValueError(
                        f"the tuned model differs from the base at {sum(outside.values()):,} entries outside the mask "
                        f"({outside[first]:,} in {first!r}, {len(outside)} tensors): the mask does not describe this "
                        "training. Pass mask=None for a diff of the changed entries, or check_outside_mask=False to "
                        "drop those changes"
                    )
        else:
            scratch = {}
            for n in shapes:
                idx = changed_indices(T[n], B[n], scratch).cpu()
                if idx.numel():
                    indices[n] = idx.to(index_dtype_for(numel_of(shapes[n])))
        b_vals = {n: gather_flat(B[n], i).cpu() for n, i in indices.items()}
        t_vals = {n: gather_flat(T[n], i).cpu() for n, i in indices.items()}
        values, base_values, fixups = {}, {}, {}
        for n in indices:
            if kind == "absolute":
                values[n], base_values[n] = t_vals[n], b_vals[n]
                continue
            s = _delta_dtype(dtypes[n])
            delta = t_vals[n].to(s) - b_vals[n].to(s)
            values[n] = delta
            fx = {}
            pos, val = _fixups(_plus(b_vals[n], delta, dtypes[n]), t_vals[n])
            if pos.numel():
                fx["fix_apply_pos"], fx["fix_apply_val"] = pos, val
            pos, val = _fixups(_minus(t_vals[n], delta, dtypes[n]), b_vals[n])
            if pos.numel():
                fx["fix_revert_pos"], fx["fix_revert_val"] = pos, val
            if fx:
                fixups[n] = fx
        names = list(indices)
        base_info = {
            "identity": model_identity(base) if isinstance(base, torch.nn.Module) else None,
            "structure_sha256": structure_hash(shapes, dtypes),
            "entries_sha256": entries_hash(b_vals, names),
            "content_sha256": _content_hash(B) if content_hash else None,
        }
        tuned_info = {
            "entries_sha256": entries_hash(t_vals, names),
            "content_sha256": _content_hash(T) if content_hash else None,
        }
        return cls(
            kind=kind,
            shapes=shapes,
            dtypes=dtypes,
            indices=indices,
            values=values,
            base_values=base_values,
            fixups=fixups,
            base=base_info,
            tuned=tuned_info,
            mask_digest=mask.digest if mask is not None else None,
            step=step,
            epoch=epoch,
            extra=dict(extra or {}),
        )

    # ------------------------------------------------------------------ applying
    def _entries(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: gather_flat(tensors[n], i).cpu() for n, i in self.indices.items()}

    def _target_values(self, cur: dict[str, Tensor], forward: bool) -> dict[str, Tensor]:
        out = {}
        for n in self.indices:
            if self.kind == "absolute":
                out[n] = self.values[n] if forward else self.base_values[n]
                continue
            op = _plus if forward else _minus
            v = op(cur[n], self.values[n], self.dtypes[n])
            fx = self.fixups.get(n, {})
            pos, val = ("fix_apply_pos", "fix_apply_val") if forward else ("fix_revert_pos", "fix_revert_val")
            if pos in fx:
                v[fx[pos].long()] = fx[val]
            out[n] = v
        return out

    def _check_mask(self, mask: FishMask | None) -> None:
        if mask is None:
            return
        if self.mask_digest is None:
            raise ValueError("this diff was not made with a mask (it holds the changed entries), so it cannot be checked against one")
        if mask.digest != self.mask_digest:
            raise ValueError(
                f"this diff belongs to another mask (diff's mask digest {self.mask_digest[:16]}…, "
                f"given mask's {mask.digest[:16]}…)"
            )

    @torch.no_grad()
    def _move(self, model: TensorsLike, forward: bool, verify: str, mask: FishMask | None):
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        self._check_mask(mask)
        src, dst = ("base", "tuned") if forward else ("tuned", "base")
        src_info, dst_info = (self.base, self.tuned) if forward else (self.tuned, self.base)
        tensors = named_tensors(model)
        _check_structure(self, tensors, f"{src} model")
        full = src_info.get("content_sha256")
        if verify == "full" and not full:
            raise ValueError("this diff holds no content hash (made with content_hash=False); use verify='entries'")
        names = list(self.indices)
        cur = self._entries(tensors)
        got = entries_hash(cur, names)
        if got != src_info["entries_sha256"]:
            if got == dst_info["entries_sha256"]:
                raise BaseMismatchError(
                    f"this model already holds the diff's {dst} values at its entries: the diff was already "
                    f"{'applied' if forward else 'reverted'} (or this is the {dst} model)"
                )
            raise BaseMismatchError(
                f"this model is not the diff's {src} model: its values at the diff's {self.k:,} entries differ"
            )
        if verify in ("auto", "full") and full:
            if _content_hash(tensors, self.shapes) != full:
                raise BaseMismatchError(
                    f"this model is not the diff's {src} model: its weights differ (content sha256 mismatch; "
                    f"use verify='entries' to check only the diff's {self.k:,} entries)"
                )
        new = self._target_values(cur, forward)
        if entries_hash(new, names) != dst_info["entries_sha256"]:  # guards the arithmetic (e.g. flush-to-zero)
            raise RuntimeError(
                f"the {dst} values computed from this diff do not hash to the recorded ones; nothing was written"
            )
        for n in names:
            scatter_flat_(tensors[n], self.indices[n], new[n])
        return model

    def apply_(self, model: TensorsLike, *, verify: str = "auto", mask: FishMask | None = None):
        """Turn the base model into the tuned model, in place; returns ``model``.

        model: a module (its named parameters are written) or named tensors (e.g. a state dict,
            whose tensors share memory with the module's).
        verify: ``"auto"`` (``"full"`` when the diff holds a content hash, else ``"entries"``),
            ``"full"`` (every byte of the model must be the base's) or ``"entries"`` (structure and
            the k entries only). See the module docstring.
        mask: when given, the diff must have been made with this mask.
        Everything is checked before anything is written: on any error the model is unchanged.
        """
        return self._move(model, True, verify, mask)

    def revert_(self, model: TensorsLike, *, verify: str = "auto", mask: FishMask | None = None):
        """Turn the tuned model back into the base model, in place (the inverse of ``apply_``)."""
        return self._move(model, False, verify, mask)

    # ------------------------------------------------------------------ files
    def _encode(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        tensors = {}
        for n, i in self.indices.items():
            tensors[f"indices/{n}"] = i.contiguous()
            tensors[f"values/{n}"] = self.values[n].contiguous()
            if n in self.base_values:
                tensors[f"base_values/{n}"] = self.base_values[n].contiguous()
            for key, t in self.fixups.get(n, {}).items():
                tensors[f"{key}/{n}"] = t.contiguous()
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "kind": self.kind,
            "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()}),
            "dtypes": json.dumps({n: dtype_name(d) for n, d in self.dtypes.items()}),
            "base_identity": json.dumps(self.base.get("identity"), default=str),
            "base_structure_sha256": self.base["structure_sha256"],
            "base_entries_sha256": self.base["entries_sha256"],
            "base_content_sha256": self.base.get("content_sha256") or "",
            "tuned_entries_sha256": self.tuned["entries_sha256"],
            "tuned_content_sha256": self.tuned.get("content_sha256") or "",
            "mask_digest": self.mask_digest or "",
            "k": str(self.k),
            "numel": str(self.numel),
            "density": repr(self.density),
            "step": "" if self.step is None else str(int(self.step)),
            "epoch": "" if self.epoch is None else str(int(self.epoch)),
            "extra": json.dumps(self.extra, default=str),
            "fishkern_version": __version__,
        }
        return tensors, meta

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> int:
        """Write the diff as one safetensors file; returns its size in bytes. Atomic (temporary file
        in the same directory, fsync, then an exclusive link, or a rename with ``overwrite``): the
        file appears complete or not at all, and of two processes saving the same new path one gets
        ``FileExistsError``. An existing file is only replaced with ``overwrite=True``. Temporary
        files that killed writers left in the directory are removed first."""
        check_depth(self.extra, "the diff's extra")
        tensors, meta = self._encode()
        return write_safetensors(path, tensors, meta, overwrite=overwrite)

    def file_bytes(self) -> int:
        """The size ``save`` would write, without writing."""
        from safetensors.torch import save

        from ._io import file_checksum

        tensors, meta = self._encode()
        meta["checksum"] = file_checksum(meta, tensors)
        return len(save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, *, mask: FishMask | None = None) -> "SparseDiff":
        """Read a diff written by ``save``. A missing file is ``FileNotFoundError``; a truncated,
        corrupt, modified, foreign or invalid file is ``CorruptFileError`` (a ``ValueError``) that
        names the file and the field; with ``mask``, a diff made with another mask is a
        ``ValueError``. Checked: the header's size, the checksum, and every field (see ``_decode``)."""
        path = os.fspath(path)
        tensors, meta = read_safetensors(path, fmt=FORMAT, versions=(str(FORMAT_VERSION),), what="fishkern diff")
        diff = cls._decode(tensors, meta, failer(path, CorruptFileError))
        diff._check_mask(mask)
        return diff

    @classmethod
    def _decode(cls, tensors: dict[str, Tensor], meta: dict[str, str], fail: Fail) -> "SparseDiff":
        """Validate and decode: types and ranges of every metadata field, tensors named after the
        diff's tensors, sorted in-range indices, values and fix-ups of the right lengths and dtypes,
        and k, numel, density and the structure hash consistent with them."""
        kind = meta_str(meta, "kind", fail)
        if kind not in KINDS:
            raise fail("kind", f"must be one of {KINDS}, got {kind!r:.40}")
        shapes = shapes_of(load_json(meta_str(meta, "shapes", fail), "shapes", fail), "shapes", fail)
        dtypes = dtypes_of(load_json(meta_str(meta, "dtypes", fail), "dtypes", fail), "dtypes", fail)
        if set(shapes) != set(dtypes):
            raise fail("dtypes", "must name the same tensors as 'shapes'")
        groups = _group_tensors(tensors, shapes, fail)
        indices, values, base_values, fixups = {}, {}, {}, {}
        for name in [n for n in shapes if n in groups]:  # model order, whatever the file's order
            g = groups[name]
            for key in ("indices", "values"):
                if key not in g:
                    raise fail(f"{key}/{name}", "is missing")
            idx = sorted_indices(g["indices"], numel_of(shapes[name]), f"indices/{name}", fail)
            k = idx.numel()
            if kind == "delta" and dtypes[name] not in _DELTA_DTYPES:
                raise fail(f"values/{name}", f"holds deltas of a {dtype_name(dtypes[name])} tensor (kind='delta' needs floating point)")
            want = dtypes[name] if kind == "absolute" else _delta_dtype(dtypes[name])
            _check_entries(g["values"], k, want, f"values/{name}", fail)
            indices[name], values[name] = idx, g["values"]
            if kind == "absolute":
                if "base_values" not in g:
                    raise fail(f"base_values/{name}", "is missing (kind='absolute')")
                _check_entries(g["base_values"], k, dtypes[name], f"base_values/{name}", fail)
                base_values[name] = g["base_values"]
            if "base_values" in g and kind != "absolute":
                raise fail(f"base_values/{name}", "is present in a delta diff")
            fx = {key: g[key] for key in _FIX_KEYS if key in g}
            if fx and kind != "delta":
                raise fail(f"{next(iter(fx))}/{name}", "is a fix-up in an absolute diff")
            for direction in ("apply", "revert"):
                pos, val = f"fix_{direction}_pos", f"fix_{direction}_val"
                if (pos in fx) != (val in fx):
                    raise fail(f"{val if pos in fx else pos}/{name}", f"is missing (incomplete {direction} fix-ups)")
                if pos in fx:
                    p = sorted_indices(fx[pos], k, f"{pos}/{name}", fail)
                    _check_entries(fx[val], p.numel(), dtypes[name], f"{val}/{name}", fail)
            if fx:
                fixups[name] = fx
        diff = cls(
            kind=kind,
            shapes=shapes,
            dtypes=dtypes,
            indices=indices,
            values=values,
            base_values=base_values,
            fixups=fixups,
            base={
                "identity": _identity_of(load_json(meta_str(meta, "base_identity", fail), "base_identity", fail), fail),
                "structure_sha256": meta_str(meta, "base_structure_sha256", fail, HEX64),
                "entries_sha256": meta_str(meta, "base_entries_sha256", fail, HEX64),
                "content_sha256": meta_str(meta, "base_content_sha256", fail, HEX64, empty=True) or None,
            },
            tuned={
                "entries_sha256": meta_str(meta, "tuned_entries_sha256", fail, HEX64),
                "content_sha256": meta_str(meta, "tuned_content_sha256", fail, HEX64, empty=True) or None,
            },
            mask_digest=meta_str(meta, "mask_digest", fail, HEX64, empty=True) or None,
            step=meta_int(meta, "step", fail, lo=None, optional=True),
            epoch=meta_int(meta, "epoch", fail, lo=None, optional=True),
            extra=load_json(meta_str(meta, "extra", fail), "extra", fail),
        )
        if diff.base["structure_sha256"] != structure_hash(shapes, dtypes):
            raise fail("base_structure_sha256", "does not match the recorded shapes and dtypes")
        if meta_int(meta, "k", fail) != diff.k:
            raise fail("k", f"is {meta['k']} but the file holds {diff.k} entries")
        if meta_int(meta, "numel", fail) != diff.numel:
            raise fail("numel", f"is {meta['numel']} but the shapes hold {diff.numel} entries")
        density = meta_str(meta, "density", fail)
        if density != repr(diff.density):
            raise fail("density", f"is {density!r:.40} but k / numel is {diff.density!r}")
        return diff


_DELTA_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_GROUPS = ("indices", "values", "base_values") + _FIX_KEYS


def _group_tensors(tensors: Mapping[str, Tensor], shapes: Mapping[str, Any], fail: Fail) -> dict[str, dict[str, Tensor]]:
    """{tensor name: {"indices": ..., "values": ..., ...}} from the file's ``<group>/<name>`` keys."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        prefix, sep, name = key.partition("/")
        if not sep or prefix not in _GROUPS:
            raise fail(key, "is an unexpected tensor")
        if name not in shapes:
            raise fail(key, "names no tensor of the diff's shapes")
        groups.setdefault(name, {})[prefix] = t
    return groups


def _check_entries(t: Tensor, k: int, dtype: torch.dtype, field_name: str, fail: Fail) -> None:
    if t.shape != (k,) or t.dtype != dtype:
        raise fail(field_name, f"must be {k} {dtype_name(dtype)} entries, got {dtype_name(t.dtype)} of shape {tuple(t.shape)}")


def _identity_of(obj: Any, fail: Fail) -> dict[str, Any] | None:
    if obj is not None and not isinstance(obj, dict):
        raise fail("base_identity", f"must be a JSON object or null, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------------- sizes
def dense_nbytes(tensors: TensorsLike) -> int:
    """Bytes of a full checkpoint of these tensors (their raw data, in their dtypes)."""
    return sum(t.numel() * t.element_size() for t in named_tensors(tensors).values())


def size_report(diff: SparseDiff | str | os.PathLike) -> dict[str, Any]:
    """How a diff compares with a full checkpoint of the same tensors.

    Returns k, numel, density, kind, ``diff_bytes`` (the file's size: read from disk for a path,
    computed by encoding in memory for a ``SparseDiff``), ``dense_bytes`` (raw bytes of all the
    tensors the diff was made over, in their dtypes: what a full safetensors checkpoint holds,
    less its small header), ``ratio`` (dense / diff) and ``bytes_per_entry``.
    """
    if isinstance(diff, SparseDiff):
        d, size = diff, diff.file_bytes()
    else:
        d, size = SparseDiff.load(diff), os.path.getsize(os.fspath(diff))
    dense = sum(numel_of(s) * torch.empty((), dtype=d.dtypes[n]).element_size() for n, s in d.shapes.items())
    return {
        "kind": d.kind,
        "k": d.k,
        "numel": d.numel,
        "density": d.density,
        "diff_bytes": size,
        "dense_bytes": dense,
        "ratio": dense / size if size else math.inf,
        "bytes_per_entry": size / d.k if d.k else math.nan,
    }
