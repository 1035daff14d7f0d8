"""Machinery shared by sparse diffs and sparse checkpoints.

- Atomic, no-clobber safetensors writes: the file is written to a temporary name in the target
  directory, flushed with ``fsync``, then published under its final name (``os.link``, which fails
  if the name exists, or ``os.replace`` when overwriting is allowed), and the directory is
  ``fsync``-ed. A crash at any point leaves either the old file or the complete new one under the
  final name, never a partial file.
- Checked reads: every file carries a ``checksum`` (sha256 over all metadata and all tensor bytes),
  so a truncated, corrupted or tampered file is refused with ``CorruptFileError``.
- Hashes of named tensors: structure (names, dtypes, shapes), content (all bytes) and entries
  (values at given flat indices).
- Bitwise comparison (NaN payloads and -0.0 included) and gather/scatter by flat row-major index,
  whatever the tensor's memory layout.
- A JSON + tensors encoding of nested Python objects (optimizer state dicts, user extras).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor


class CorruptFileError(ValueError):
    """A diff / checkpoint file that is truncated, corrupt, tampered with, or not of the expected kind."""


class BaseMismatchError(ValueError):
    """A diff or checkpoint chain used with a model that is not its base (or not its tuned model)."""


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ------------------------------------------------------------------------------------------ tensors
def bits(t: Tensor) -> Tensor:
    """A same-shape integer view of ``t`` whose ``==`` is bitwise equality (so NaN == NaN with the
    same payload, and -0.0 != 0.0)."""
    size = t.element_size()
    if size not in _INT_OF_SIZE:
        raise TypeError(f"tensors of dtype {t.dtype} are not supported")
    return t.view(_INT_OF_SIZE[size]) if t.dtype != _INT_OF_SIZE[size] else t


def bit_equal(a: Tensor, b: Tensor) -> bool:
    """Same shape, dtype and bits."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def bitwise_ne(new: Tensor, old: Tensor, scratch: dict | None = None) -> Tensor:
    """A flat (row-major) bool tensor: where ``new`` and ``old`` differ bitwise. With ``scratch`` (a
    dict kept by the caller) the result is a view of one reused buffer per device, valid until the
    next call: no fresh allocation (and its page faults) per tensor."""
    a, b = bits(new.detach()), bits(old.detach().to(new.device))
    if scratch is None:
        return (a != b).reshape(-1)
    n = a.numel()
    buf = scratch.get(a.device)
    if buf is None or buf.numel() < n:
        buf = scratch[a.device] = torch.empty(n, dtype=torch.bool, device=a.device)
    out = buf[:n]
    torch.ne(a, b, out=out.view(a.shape))
    return out


def changed_indices(new: Tensor, old: Tensor, scratch: dict | None = None) -> Tensor:
    """Sorted flat (row-major) int64 indices where ``new`` and ``old`` differ bitwise."""
    return bitwise_ne(new, old, scratch).nonzero().squeeze(1)


def gather_flat(t: Tensor, idx: Tensor) -> Tensor:
    """``t.reshape(-1)[idx]`` (flat row-major indices) as a new tensor, without a dense copy of a
    non-contiguous ``t``. Pure data movement: the bits are copied unchanged."""
    t = t.detach()
    idx = idx.to(device=t.device, dtype=torch.int64)
    if t.is_contiguous():
        return t.reshape(-1).index_select(0, idx)
    return t[torch.unravel_index(idx, t.shape)]


@torch.no_grad()
def scatter_flat_(t: Tensor, idx: Tensor, values: Tensor) -> None:
    """``t.reshape(-1)[idx] = values`` in place (flat row-major indices), any memory layout."""
    idx = idx.to(device=t.device, dtype=torch.int64)
    values = values.to(device=t.device)
    if values.dtype != t.dtype:
        raise TypeError(f"cannot write {values.dtype} values into a {t.dtype} tensor")
    if t.is_contiguous():
        t.view(-1).index_copy_(0, idx, values)
    else:
        t.index_put_(torch.unravel_index(idx, t.shape), values)


def cpu_copy(t: Tensor) -> Tensor:
    """A contiguous CPU copy that shares no memory with ``t``."""
    t = t.detach()
    return t.to("cpu", copy=True).contiguous() if t.device.type != "cpu" else t.clone(memory_format=torch.contiguous_format)


def numel_of(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ------------------------------------------------------------------------------------------ dtypes
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    d = getattr(torch, str(name), None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return d


# ------------------------------------------------------------------------------------------ hashes
def _raw(t: Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def _update_str(h, s: str) -> None:
    b = s.encode()
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)


def structure_hash(shapes: Mapping[str, tuple], dtypes: Mapping[str, torch.dtype]) -> str:
    """sha256 over the names (in the given order), dtypes and shapes."""
    h = hashlib.sha256(b"fishkern-structure-v1")
    for name, shape in shapes.items():
        _update_str(h, name)
        _update_str(h, dtype_name(dtypes[name]))
        _update_str(h, json.dumps([int(s) for s in shape]))
    return h.hexdigest()


def content_hash(tensors: Mapping[str, Tensor], names: Iterable[str] | None = None) -> str:
    """sha256 over the names, dtypes, shapes and row-major bytes of the tensors (in ``names`` order).
    About 1.9 GB/s on one core with SHA extensions: ~0.7 s for BERT-large's 1.34 GB."""
    h = hashlib.sha256(b"fishkern-content-v1")
    for name in names if names is not None else tensors:
        t = tensors[name]
        _update_str(h, name)
        _update_str(h, dtype_name(t.dtype))
        _update_str(h, json.dumps(list(t.shape)))
        h.update(_raw(t))
    return h.hexdigest()


def entries_hash(values: Mapping[str, Tensor], names: Iterable[str]) -> str:
    """sha256 over the names and the bytes of gathered entry values (in ``names`` order)."""
    h = hashlib.sha256(b"fishkern-entries-v1")
    for name in names:
        v = values[name]
        _update_str(h, name)
        _update_str(h, dtype_name(v.dtype))
        h.update(v.numel().to_bytes(8, "little"))
        h.update(_raw(v))
    return h.hexdigest()


def file_checksum(metadata: Mapping[str, str], tensors: Mapping[str, Tensor]) -> str:
    """sha256 over every metadata item but ``checksum`` and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(b"fishkern-file-v1")
    for key in sorted(metadata):
        if key != "checksum":
            _update_str(h, key)
            _update_str(h, metadata[key])
    for name in sorted(tensors):
        t = tensors[name]
        _update_str(h, name)
        _update_str(h, dtype_name(t.dtype))
        _update_str(h, json.dumps(list(t.shape)))
        h.update(_raw(t))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ files
def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, path: str, overwrite: bool) -> None:
    """Give the complete, fsync-ed file ``tmp`` the name ``path`` atomically; without ``overwrite``
    an existing ``path`` is never replaced (``FileExistsError``)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and no-clobber
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
    except OSError:  # a filesystem without hard links: check, then rename
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write, *, overwrite: bool, suffix: str = ".tmp") -> int:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it and publish it as
    ``path`` (see ``publish``). Returns the file's size. On any error the temporary file is removed
    and ``path`` is untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        size = os.path.getsize(tmp)
        _fsync_file(tmp)
        publish(tmp, path, overwrite)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return size


def write_safetensors(path, tensors: dict[str, Tensor], metadata: dict[str, str], *, overwrite: bool) -> int:
    """Atomically write a checksummed safetensors file (adds ``metadata['checksum']``); returns bytes."""
    from safetensors.torch import save_file

    metadata = dict(metadata)
    metadata["checksum"] = file_checksum(metadata, tensors)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)


def read_safetensors(path, *, fmt: str, versions: tuple[str, ...], what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a file written by ``write_safetensors``: (tensors, metadata). ``FileNotFoundError`` when
    missing; ``CorruptFileError`` when unreadable (truncated), of another format, or when its checksum
    does not match its contents."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and sizes
        raise CorruptFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if meta.get("format") != fmt:
        raise CorruptFileError(f"{path} is not a {what} file (format {meta.get('format')!r}, expected {fmt!r})")
    if meta.get("format_version") not in versions:
        raise CorruptFileError(f"{path}: unsupported {what} format version {meta.get('format_version')!r}")
    if meta.get("checksum") != file_checksum(meta, tensors):
        raise CorruptFileError(f"{path}: the checksum does not match the contents (corrupt or modified {what} file)")
    return tensors, meta


def write_json(path: str, obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as JSON (write temp, fsync, os.replace, fsync dir)."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write, overwrite=True)


# ------------------------------------------------------------------------------------------ packing
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__dtype__")


def pack(obj: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    """Encode a nested structure of dicts, lists, tuples, scalars, strings, dtypes and tensors as
    JSON-able data; tensors are copied into ``tensors`` under ``prefix + <n>``. ``unpack`` inverts
    it exactly (tuples stay tuples, non-string dict keys keep their type, tensors their dtype)."""
    if isinstance(obj, Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = cpu_copy(obj)
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": dtype_name(obj)}
    if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "shape", None) == ():
        return pack(obj.item(), tensors, prefix)
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(x, tensors, prefix) for x in obj]}
    if isinstance(obj, list):
        return [pack(x, tensors, prefix) for x in obj]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: pack(v, tensors, prefix) for k, v in obj.items()}
        return {"__dict__": [[pack(k, tensors, prefix), pack(v, tensors, prefix)] for k, v in obj.items()]}
    raise TypeError(f"cannot store an object of type {type(obj).__name__} (use tensors, numbers, strings, lists, dicts)")


def unpack(data: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(data, list):
        return [unpack(x, tensors) for x in data]
    if isinstance(data, dict):
        if len(data) == 1:
            (tag, value), = data.items()
            if tag == "__tensor__":
                if value not in tensors:
                    raise CorruptFileError(f"missing tensor {value!r}")
                return tensors[value]
            if tag == "__tuple__":
                return tuple(unpack(x, tensors) for x in value)
            if tag == "__dtype__":
                return parse_dtype(value)
            if tag == "__dict__":
                return {_hashable(unpack(k, tensors)): unpack(v, tensors) for k, v in value}
        return {k: unpack(v, tensors) for k, v in data.items()}
    return data


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k
