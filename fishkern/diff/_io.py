"""Machinery shared by sparse diffs, sparse checkpoints and mask files.

- Atomic, no-clobber writes: the file is written to a temporary name in the target directory
  (``.<name>.fk-<host>-<pid>-<random>.tmp``, locked with ``flock`` while it is written), flushed with
  ``fsync``, then published under its final name (``os.link``, which fails if the name exists, or
  ``os.replace`` when overwriting is allowed), and the directory is ``fsync``-ed. Its mode is what
  any new file gets under the umask (0644 under 022), not mkstemp's 0600. A crash at any
  point leaves either the old file or the complete new one under the final name, never a partial
  file. Temporary files that a crash left behind are removed by the next write into the directory
  (``clean_stale_temps``: only names of fishkern's pattern, only when no live writer holds them).
- Checked reads: every file carries a ``checksum`` (sha256 over all metadata and all tensor bytes),
  so a truncated, corrupt or tampered file is refused with ``CorruptFileError``; the header's size is
  bounded before it is parsed (see ``_validate``).
- Hashes of named tensors: structure (names, dtypes, shapes), content (all bytes) and entries
  (values at given flat indices).
- Bitwise comparison (NaN payloads and -0.0 included) and gather/scatter by flat row-major index,
  whatever the tensor's memory layout.
- A JSON + tensors encoding of nested Python objects (optimizer state dicts, user extras), whose
  decoding validates every tag.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no locks; stale temporary files are recognised by age only
    fcntl = None

import torch
from torch import Tensor

from ._validate import failer, header_length


class CorruptFileError(ValueError):
    """A diff / checkpoint / mask file that is truncated, corrupt, tampered with, not of the expected
    kind, or whose content is invalid (the message names the file and the field)."""


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
    """The torch dtype ``dtype_name`` wrote as ``name`` (canonical names only: "float32", not "float")."""
    d = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(d, torch.dtype) or dtype_name(d) != name:
        raise ValueError(f"unknown dtype {name!r:.40}")
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
    an existing ``path`` is never replaced (``FileExistsError``), even when another process
    publishes the same name at the same moment (``os.link`` is atomic and no-clobber)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and no-clobber
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
    except OSError:  # a filesystem without hard links: check, then rename (not race-free there)
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


# Temporary files: ".<final name>.fk-<host>-<pid>-<random>.tmp", flock-ed by their writer until
# published. The host is a hash of the host name, so that a pid is only judged on its own machine.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"\.(?P<target>.+)\.fk-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-[a-z0-9_]+\.tmp")
# what fishkern 0.1.0 wrote (no pid, no lock): recognised by age only
_LEGACY_TEMP = re.compile(r"\.(?:.+\.(?:safetensors|json)\.|fishmask-)[a-z0-9_]{8}\.tmp")
#: a temporary file no live writer holds is stale after this long without a write (its writer's pid
#: may have been reused, or it lives on another host)
STALE_AFTER_S = 3600.0
#: temporary files of fishkern 0.1.0 carry no owner: stale after a day without a write
LEGACY_STALE_AFTER_S = 86400.0


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.fk-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this machine (True when it cannot be told)."""
    if os.name != "posix":
        return True  # os.kill would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _owner_gone(name: str, age: float) -> bool:
    """From the name and the age of a temporary file of fishkern's naming: can no writer own it?"""
    m = _TEMP.fullmatch(name)
    if m is None:
        return _LEGACY_TEMP.fullmatch(name) is not None and age > LEGACY_STALE_AFTER_S
    if m["host"] == _HOST and not _pid_alive(int(m["pid"])):
        return True
    return age > STALE_AFTER_S


def _remove_if_stale(directory: str, name: str, now: float) -> bool:
    """Remove one temporary file of fishkern's naming if its writer is gone and nobody holds its
    lock. Never follows a symbolic link, never removes anything else."""
    path = os.path.join(directory, name)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or not _owner_gone(name, now - st.st_mtime):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live writer holds it
            except OSError:
                pass  # no locks on this filesystem: the pid / age rule decides
        if os.fstat(fd).st_ino != st.st_ino:
            return False  # replaced since we looked
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def clean_stale_temps(directory: str) -> int:
    """Remove the temporary files that crashed or killed fishkern writers left in ``directory``
    (see ``_owner_gone``); returns how many. Best effort: never raises."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(".") and n.endswith(".tmp")]
    except OSError:
        return 0
    now = time.time()
    return sum(_remove_if_stale(directory, n, now) for n in names)


def _lock_temp(fd: int) -> None:
    """Hold the temporary file's lock while it is written: a cleaner never removes it then."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this filesystem: the pid / age rule protects it
            pass


def current_umask() -> int:
    """The process's umask, without changing it where the system can say it (Linux's
    /proc/self/status); elsewhere it can only be read by setting it and setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _public_mode(path: str) -> None:
    """mkstemp creates the file 0600 (and safetensors >= 0.7 replaces it by its own private
    file); a published file gets the mode any tool's new file gets (0666 less the umask: 0644
    under umask 022, 0600 under 077). Set by path once written, whoever created the inode."""
    try:
        os.chmod(path, 0o666 & ~current_umask())
    except OSError:  # e.g. a filesystem without modes: its own default stays
        pass


def atomic_write(path: str | os.PathLike, write, *, overwrite: bool) -> int:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it and publish it as
    ``path`` (see ``publish``). Returns the file's size. On any error the temporary file is removed
    and ``path`` is untouched. Stale temporary files of earlier, crashed writers are removed first."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    clean_stale_temps(directory)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=directory)
    try:
        _lock_temp(fd)
        write(tmp)
        _public_mode(tmp)
        size = os.path.getsize(tmp)
        _fsync_file(tmp)
        publish(tmp, path, overwrite)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)  # releases the lock
    fsync_dir(directory)
    return size


def write_safetensors(path, tensors: dict[str, Tensor], metadata: dict[str, str], *, overwrite: bool) -> int:
    """Atomically write a checksummed safetensors file (adds ``metadata['checksum']``); returns bytes."""
    from safetensors.torch import save_file

    metadata = dict(metadata)
    metadata["checksum"] = file_checksum(metadata, tensors)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)


def open_safetensors(path, *, fmt: str, versions: tuple[str, ...], what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file of format ``fmt``, checksum not yet verified.
    ``FileNotFoundError`` when missing; ``CorruptFileError`` when unreadable (truncated), its header
    is over the size bound, or of another format or version."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} file at {path}")
    header_length(path, failer(path, CorruptFileError))
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and sizes
        raise CorruptFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if meta.get("format") != fmt:
        raise CorruptFileError(f"{path} is not a {what} file (format {meta.get('format')!r:.80}, expected {fmt!r})")
    if meta.get("format_version") not in versions:
        raise CorruptFileError(f"{path}: unsupported {what} format version {meta.get('format_version')!r:.80}")
    return tensors, meta


def verify_checksum(path, meta: Mapping[str, str], tensors: Mapping[str, Tensor], what: str) -> None:
    if meta.get("checksum") != file_checksum(meta, tensors):
        raise CorruptFileError(f"{os.fspath(path)}: the checksum does not match the contents (corrupt or modified {what} file)")


def read_safetensors(path, *, fmt: str, versions: tuple[str, ...], what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a file written by ``write_safetensors``: (tensors, metadata). ``FileNotFoundError`` when
    missing; ``CorruptFileError`` when unreadable (truncated), of another format, or when its checksum
    does not match its contents."""
    tensors, meta = open_safetensors(path, fmt=fmt, versions=versions, what=what)
    verify_checksum(path, meta, tensors, what)
    return tensors, meta


def json_checksum(obj: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON (sorted keys, no whitespace, ASCII) of every item but
    ``checksum``, prefixed with ``fishkern-json-v1``."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(b"fishkern-json-v1" + text.encode()).hexdigest()


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
    """Invert ``pack``. A malformed tag (a missing tensor, a tuple that is not a list, an unknown
    dtype, a dict entry that is not a [key, value] pair, an unhashable or repeated key) is a
    ``CorruptFileError``. Nesting is bounded by the JSON reader (``_validate.MAX_JSON_DEPTH``)."""
    if isinstance(data, list):
        return [unpack(x, tensors) for x in data]
    if isinstance(data, dict):
        if len(data) == 1:
            (tag, value), = data.items()
            if tag in _TAGS:
                return _unpack_tag(tag, value, tensors)
        return {k: unpack(v, tensors) for k, v in data.items()}
    return data


def _unpack_tag(tag: str, value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if tag == "__tensor__":
        if not isinstance(value, str) or value not in tensors:
            raise CorruptFileError(f"missing tensor {value!r:.80}")
        return tensors[value]
    if tag == "__dtype__":
        try:
            return parse_dtype(value)
        except ValueError as e:
            raise CorruptFileError(str(e)) from None
    if not isinstance(value, list):
        raise CorruptFileError(f"a {tag} entry must hold a list, got {type(value).__name__}")
    if tag == "__tuple__":
        return tuple(unpack(x, tensors) for x in value)
    out = {}
    for pair in value:  # __dict__
        if not isinstance(pair, list) or len(pair) != 2:
            raise CorruptFileError(f"a __dict__ entry must be a [key, value] pair, got {pair!r:.80}")
        key = _hashable(unpack(pair[0], tensors))
        try:
            seen = key in out
        except TypeError:
            raise CorruptFileError(f"a __dict__ key must be hashable, got {key!r:.80}") from None
        if seen:
            raise CorruptFileError(f"a __dict__ holds the key {key!r:.80} twice")
        out[key] = unpack(pair[1], tensors)
    return out


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k
