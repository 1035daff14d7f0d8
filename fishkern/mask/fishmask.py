"""FishMask: which entries of which parameters are trained.

Per parameter name: the sorted flat (row-major) indices of the selected entries (int32 where the
parameter has fewer than 2**31 entries, else int64), and the parameter's shape. A mask always
covers every parameter of the model it was made for (unselected parameters have no indices), so
it can tell a model it does not belong to. It also records which parameters were forced in, how it
was made (provenance) and a digest of the whole selection.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .indices import index_dtype_for, update_digest
from .selection import (  # noqa: F401 (named_shapes, model_identity, ParamsLike: re-exported, imported from here)
    BooleanMasks,
    ParamsLike,
    bitfit_selection,
    boolean_selection,
    model_identity,
    named_shapes,
    numel_of as _numel,
    random_selection,
    scores_selection,
)

FORMAT = "fishkern.mask"
FORMAT_VERSION = 1
_FILE_KEYS = frozenset({"format", "format_version", "shapes", "forced", "provenance", "k", "numel", "digest", "checksum"})


@dataclass(frozen=True)
class FishMask:
    """A fixed sparse mask over a model's parameters. Build it with ``FishMask.from_scores``
    (the FISH mask), ``random``, ``bitfit`` or ``from_boolean``."""

    shapes: dict[str, tuple[int, ...]]  # every parameter of the model, in model order
    indices: dict[str, Tensor]  # selected parameters only: sorted flat indices
    forced: tuple[str, ...] = ()  # parameters included entirely regardless of scores
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name, idx in self.indices.items():
            if name not in self.shapes:
                raise ValueError(f"mask has indices for {name!r} but no shape for it")
            n = _numel(self.shapes[name])
            if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"indices of {name!r} must be a 1-D int32/int64 tensor")
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= n or not bool((idx[1:] > idx[:-1]).all())):
                raise ValueError(f"indices of {name!r} must be strictly increasing flat indices in [0, {n})")
        for name in self.forced:
            if name not in self.shapes:
                raise ValueError(f"forced parameter {name!r} is not in the mask")

    # ------------------------------------------------------------------ summary
    @property
    def k(self) -> int:
        """Number of selected entries."""
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def numel(self) -> int:
        """Number of entries of all parameters."""
        return sum(_numel(s) for s in self.shapes.values())

    @property
    def density(self) -> float:
        return self.k / self.numel if self.numel else 0.0

    def k_of(self, name: str) -> int:
        idx = self.indices.get(name)
        return 0 if idx is None else int(idx.numel())

    @property
    def digest(self) -> str:
        """sha256 over names, shapes and selected indices: equal masks have equal digests."""
        h = hashlib.sha256(b"fishkern-fishmask-v1")
        for name in sorted(self.shapes):
            h.update(name.encode())
            h.update(json.dumps(list(self.shapes[name])).encode())
            update_digest(h, self.indices.get(name, torch.empty(0, dtype=torch.int64)), _numel(self.shapes[name]))
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"FishMask(k={self.k:,}, density={self.density:.4%}, parameters={len(self.shapes)}, "
            f"selected_in={len(self.indices)}, forced={list(self.forced)}, digest={self.digest[:12]})"
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, FishMask) and self.digest == other.digest and set(self.forced) == set(other.forced)

    def __hash__(self) -> int:
        return hash(self.digest)

    # ------------------------------------------------------------------ conversions
    def check_matches(self, params: ParamsLike, *, strict: bool = True) -> dict[str, tuple[int, ...]]:
        """Raise a clear error when ``params`` is not the model this mask was made for.

        strict: the model must have exactly the mask's parameters; otherwise model parameters the
        mask does not know are allowed (they will be frozen).
        """
        model = named_shapes(params)
        missing = [n for n in self.shapes if n not in model]
        if missing:
            raise ValueError(
                f"this mask does not fit the model: {len(missing)} of its parameters are not in the model "
                f"(e.g. {missing[:3]}); was it made for another model?"
            )
        wrong = [(n, self.shapes[n], model[n]) for n in self.shapes if model[n] != self.shapes[n]]
        if wrong:
            n, s, m = wrong[0]
            raise ValueError(
                f"this mask does not fit the model: parameter {n!r} has shape {m} in the model but {s} in the "
                f"mask ({len(wrong)} mismatches); was it made for another model?"
            )
        extra = [n for n in model if n not in self.shapes]
        if extra and strict:
            raise ValueError(
                f"the model has {len(extra)} parameters the mask does not know (e.g. {extra[:3]}); pass "
                "strict=False to freeze them"
            )
        return model

    def mask_indices(self, params: ParamsLike, *, strict: bool = True, device=None) -> list[Tensor]:
        """The ``mask_indices`` list for ``MaskedAdamW(model.parameters(), ...)``: one index tensor per
        parameter in model order (empty for unselected parameters), on each parameter's device."""
        model = self.check_matches(params, strict=strict)
        devices = {}
        if isinstance(params, torch.nn.Module):
            devices = {n: p.device for n, p in params.named_parameters()}
        elif isinstance(params, Mapping):
            devices = {n: v.device for n, v in params.items() if isinstance(v, Tensor)}
        out = []
        for name in model:
            dev = device or devices.get(name, "cpu")
            idx = self.indices.get(name)
            out.append(torch.empty(0, dtype=torch.int64, device=dev) if idx is None else idx.to(dev))
        return out

    def indices_for(self, names: list[str], shapes: list[tuple[int, ...]], devices: list) -> list[Tensor]:
        """Index tensors for these named parameters (used when an optimizer gets a FishMask)."""
        for n, s in zip(names, shapes):
            if n not in self.shapes:
                raise ValueError(f"parameter {n!r} is not in the mask; was it made for another model?")
            if tuple(s) != self.shapes[n]:
                raise ValueError(f"parameter {n!r} has shape {tuple(s)} but the mask expects {self.shapes[n]}")
        return [
            self.indices[n].to(d) if n in self.indices else torch.empty(0, dtype=torch.int64, device=d)
            for n, d in zip(names, devices)
        ]

    def to_boolean(self, device=None) -> "BooleanMasks":
        """Dense boolean masks of every parameter's shape (True = trained): a dict that also records
        the forced parameters, so ``FishMask.from_boolean(m.to_boolean()) == m``."""
        out = BooleanMasks(forced=self.forced)
        for name, shape in self.shapes.items():
            m = torch.zeros(_numel(shape), dtype=torch.bool, device=device)
            if name in self.indices:
                m[self.indices[name].to(device=m.device, dtype=torch.int64)] = True
            out[name] = m.view(shape)
        return out

    def to(self, device) -> "FishMask":
        return FishMask(
            dict(self.shapes), {n: i.to(device) for n, i in self.indices.items()}, self.forced, dict(self.provenance)
        )

    # ------------------------------------------------------------------ builders (documented in builders.py)
    # The selection module does the work: this class and builders.py both sit on top of it.
    @classmethod
    def from_scores(cls, scores, density=None, **kwargs) -> "FishMask":
        """``fishkern.mask.builders.from_scores``: the FISH mask from Fisher scores."""
        return new_mask(*scores_selection(scores, density, **kwargs))

    @classmethod
    def random(cls, params, density=None, **kwargs) -> "FishMask":
        """``fishkern.mask.builders.random_mask``: the random-mask baseline."""
        return new_mask(*random_selection(params, density, **kwargs))

    @classmethod
    def bitfit(cls, params, **kwargs) -> "FishMask":
        """``fishkern.mask.builders.bitfit_mask``: every bias plus the head."""
        return new_mask(*bitfit_selection(params, **kwargs))

    @classmethod
    def from_boolean(cls, masks, **kwargs) -> "FishMask":
        """``fishkern.mask.builders.from_boolean``: a mask from dense boolean tensors."""
        return new_mask(*boolean_selection(masks, **kwargs))

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the mask as a safetensors file: the indices, JSON metadata (shapes, forced,
        provenance, k, numel, digest) and a ``checksum`` (sha256 over all metadata and all tensor
        bytes). Atomic, as ``SparseDiff.save``: a temporary file in the same directory, fsync, then
        published under ``path`` with an exclusive link, so the file appears complete or not at all,
        and of two processes saving the same new path one succeeds and the other gets
        ``FileExistsError``. An existing file is only replaced with ``overwrite=True``."""
        from ..diff._io import write_safetensors
        from ..diff._validate import check_depth

        check_depth(self.provenance, "the mask's provenance")
        tensors = {f"indices/{n}": i.detach().cpu().contiguous() for n, i in self.indices.items() if i.numel()}
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()}),
            "forced": json.dumps(list(self.forced)),
            "provenance": json.dumps(self.provenance, default=str),
            "k": str(self.k),
            "numel": str(self.numel),
            "digest": self.digest,
        }
        write_safetensors(path, tensors, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> "FishMask":
        """Read a mask written by ``save``. A missing file is ``FileNotFoundError``; a truncated,
        corrupt, modified, foreign or invalid file is ``CorruptFileError`` (a ``ValueError``) naming
        the file and the field. Checked: the header's size, every field's type and range (shapes,
        forced names, sorted in-range indices, k, numel), the selection ``digest`` and the file
        ``checksum``. Files of fishkern 0.1.0 have no checksum: they are accepted after the same
        validation and the digest check (their forced list and provenance are not checksummed)."""
        from ..diff._io import CorruptFileError, open_safetensors, verify_checksum
        from ..diff._validate import HEX64, load_json, meta_int, meta_str

        path = os.fspath(path)
        tensors, meta = open_safetensors(path, fmt=FORMAT, versions=(str(FORMAT_VERSION),), what="fishkern mask")

        def fail(field_name: str, message: str) -> CorruptFileError:
            part = "mask" if "/" in field_name else "mask metadata"  # a tensor, or a metadata field
            return CorruptFileError(f"{path}: damaged {part}: field {field_name!r} {message}")

        for key in meta:
            if key not in _FILE_KEYS:  # e.g. a damaged "checksum" key: never read as a file without one
                raise fail(key, "is not a field of a mask file")
        indices = {}
        for key, t in tensors.items():
            if not key.startswith("indices/"):
                raise fail(key, "is an unexpected tensor in a mask file")
            indices[key[len("indices/"):]] = t
        parts = {key: load_json(meta_str(meta, key, fail), key, fail) for key in ("shapes", "forced", "provenance")}
        mask = mask_from_parts(parts["shapes"], parts["forced"], parts["provenance"], indices, fail)
        for key, value in (("k", mask.k), ("numel", mask.numel)):
            if meta_int(meta, key, fail) != value:
                raise fail(key, f"is {meta[key]} but the file holds {value}")
        if mask.digest != meta_str(meta, "digest", fail, HEX64):
            raise CorruptFileError(f"{path}: the mask's digest does not match its contents (corrupt file?)")
        if "checksum" in meta:
            verify_checksum(path, meta, tensors, "fishkern mask")
        return mask.to(device) if device is not None else mask


def mask_from_parts(shapes: Any, forced: Any, provenance: Any, indices: Mapping[str, Tensor], fail) -> FishMask:
    """A FishMask from the parsed parts of a file (mask file or checkpoint link), every part
    validated first: ``fail(field, message)`` makes the error (naming the file and the field)."""
    from ..diff._validate import names_of, shapes_of, sorted_indices

    shapes = shapes_of(shapes, "shapes", fail)
    forced = names_of(forced, "forced", fail, known=shapes)
    if not isinstance(provenance, dict):
        raise fail("provenance", f"must be a JSON object, got {type(provenance).__name__}")
    for name, idx in indices.items():
        if name not in shapes:
            raise fail(f"indices/{name}", "names no parameter of the mask's shapes")
        sorted_indices(idx, _numel(shapes[name]), f"indices/{name}", fail, allow_empty=True)
    return FishMask(shapes, dict(indices), tuple(forced), provenance)


def new_mask(shapes, selected: Mapping[str, Tensor], forced=(), provenance=None) -> FishMask:
    """Build a FishMask from per-name sorted indices, converting them to the canonical dtype."""
    indices = {}
    for name, idx in selected.items():
        if idx.numel():
            indices[name] = idx.to(index_dtype_for(_numel(shapes[name])))
    return FishMask(dict(shapes), indices, tuple(forced), dict(provenance or {}))
