"""Content validation of what fishkern reads back from its own files.

Checksums catch accidental damage; these checks catch everything else: a well-formed file whose
checksum is consistent but whose values are of the wrong type, out of range, inconsistent with each
other or absurdly large. Every error names the file and the field, and is of the exception class
the caller gives (``CorruptFileError`` or ``CheckpointChainError``, both ``ValueError``s), never a
bare ``TypeError`` / ``KeyError`` / ``RecursionError`` / ``OverflowError``.

Bounds (all far above what fishkern writes):
- a safetensors header (tensor table + metadata) is at most ``MAX_HEADER_BYTES`` (64 MiB);
- a JSON document (a metadata field, a manifest) is at most ``MAX_JSON_BYTES`` (64 MiB) and
  nested at most ``MAX_JSON_DEPTH`` (100) levels;
- a tensor shape has non-negative integer dimensions and at most ``MAX_NUMEL`` (2**63 - 1) entries.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

MAX_HEADER_BYTES = 64 * 2**20
MAX_JSON_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 100
MAX_NUMEL = 2**63 - 1

HEX64 = re.compile(r"[0-9a-f]{64}")
HEX32 = re.compile(r"[0-9a-f]{32}")
_INT = re.compile(r"-?[0-9]{1,19}")

#: dtypes a fishkern file may name: those ``dtype_name`` writes and ``bits`` can compare
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
        "complex64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint16", "uint32",
        "uint64",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
}

#: ``fail(field, message)`` -> the exception to raise (it names the file)
Fail = Callable[[str, str], Exception]


def failer(where: str, error: type[Exception]) -> Fail:
    """An error factory for one file: ``raise fail("shapes", "must be ...")``."""

    def fail(field_name: str, message: str) -> Exception:
        return error(f"{where}: field {field_name!r} {message}")

    return fail


# ------------------------------------------------------------------------------------------ JSON
def json_depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest, stack = 0, [(obj, 0)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list, tuple)):
            d += 1
            deepest = max(deepest, d)
            stack.extend((v, d) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def check_depth(obj: Any, what: str) -> None:
    """At save time: refuse what load would refuse (more than ``MAX_JSON_DEPTH`` levels)."""
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise ValueError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep; fishkern files hold at most {MAX_JSON_DEPTH}")


def load_json(text: str | bytes, field_name: str, fail: Fail) -> Any:
    """``json.loads`` with bounds on size and nesting; any failure is ``fail(field, ...)``."""
    if len(text) > MAX_JSON_BYTES:
        raise fail(field_name, f"is {len(text):,} bytes of JSON, more than the limit of {MAX_JSON_BYTES:,}")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise fail(field_name, f"is JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise fail(field_name, f"is not valid JSON ({e})") from None
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise fail(field_name, f"is JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return obj


# ------------------------------------------------------------------------------------------ values
def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def int_in(x: Any, field_name: str, fail: Fail, lo: int = 0, hi: int | None = None) -> int:
    """A JSON integer in [lo, hi]."""
    if not is_int(x) or x < lo or (hi is not None and x > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise fail(field_name, f"must be an integer {bound}, got {x!r:.80}")
    return x


def optional_int(x: Any, field_name: str, fail: Fail, lo: int | None = None) -> int | None:
    if x is None:
        return None
    if not is_int(x) or (lo is not None and x < lo) or abs(x) > MAX_NUMEL:
        raise fail(field_name, f"must be null or an integer, got {x!r:.80}")
    return x


def meta_int(meta: Mapping[str, str], key: str, fail: Fail, *, lo: int | None = 0, optional: bool = False) -> int | None:
    """A decimal integer stored as a metadata string (``""`` is None where ``optional``)."""
    text = meta_str(meta, key, fail)
    if optional and text == "":
        return None
    if not _INT.fullmatch(text) or (lo is not None and int(text) < lo):
        what = "a decimal integer" + (f" >= {lo}" if lo is not None else "") + (" or empty" if optional else "")
        raise fail(key, f"must be {what}, got {text!r:.80}")
    return int(text)


def meta_str(meta: Mapping[str, str], key: str, fail: Fail, pattern: re.Pattern | None = None, *, empty: bool = False) -> str:
    """A required metadata string, optionally of a pattern (``empty``: ``""`` allowed too)."""
    if key not in meta:
        raise fail(key, "is missing")
    text = meta[key]
    if not isinstance(text, str):
        raise fail(key, f"must be a string, got {type(text).__name__}")
    if pattern is not None and not (empty and text == "") and not pattern.fullmatch(text):
        raise fail(key, f"must match {pattern.pattern}{' or be empty' if empty else ''}, got {text!r:.80}")
    return text


def hex_or_none(x: Any, pattern: re.Pattern, field_name: str, fail: Fail) -> str | None:
    if x is None:
        return None
    if not isinstance(x, str) or not pattern.fullmatch(x):
        raise fail(field_name, f"must be null or match {pattern.pattern}, got {x!r:.80}")
    return x


def shape_of(value: Any, field_name: str, fail: Fail) -> tuple[int, ...]:
    """A shape: a list of non-negative integers with at most ``MAX_NUMEL`` entries in all."""
    if not isinstance(value, list) or not all(is_int(s) and s >= 0 for s in value):
        raise fail(field_name, f"must be a list of non-negative integers, got {value!r:.80}")
    n = 1
    for s in value:
        n *= s
        if n > MAX_NUMEL:
            raise fail(field_name, f"has more than {MAX_NUMEL} entries ({value!r:.80})")
    return tuple(value)


def shapes_of(obj: Any, field_name: str, fail: Fail) -> dict[str, tuple[int, ...]]:
    """{name: shape} from a JSON object."""
    if not isinstance(obj, dict):
        raise fail(field_name, f"must be a JSON object of shapes, got {type(obj).__name__}")
    return {n: shape_of(s, f"{field_name}[{n!r}]", fail) for n, s in obj.items()}


def dtype_of(name: Any, field_name: str, fail: Fail) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise fail(field_name, f"names no supported dtype ({name!r:.40}; known: {', '.join(DTYPES)})")
    return DTYPES[name]


def dtypes_of(obj: Any, field_name: str, fail: Fail) -> dict[str, torch.dtype]:
    if not isinstance(obj, dict):
        raise fail(field_name, f"must be a JSON object of dtype names, got {type(obj).__name__}")
    return {n: dtype_of(d, f"{field_name}[{n!r}]", fail) for n, d in obj.items()}


def names_of(obj: Any, field_name: str, fail: Fail, known: Mapping[str, Any] | None = None) -> list[str]:
    """A JSON list of distinct strings (each a key of ``known`` when given)."""
    if not isinstance(obj, list) or not all(isinstance(n, str) for n in obj):
        raise fail(field_name, f"must be a list of names, got {obj!r:.80}")
    if len(set(obj)) != len(obj):
        raise fail(field_name, "names a tensor twice")
    if known is not None:
        unknown = [n for n in obj if n not in known]
        if unknown:
            raise fail(field_name, f"names tensors that are not in the file's shapes: {unknown[:3]}")
    return obj


def sorted_indices(idx: Tensor, n: int, field_name: str, fail: Fail, *, allow_empty: bool = False) -> Tensor:
    """A 1-D int32/int64 tensor of strictly increasing indices in [0, n)."""
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise fail(field_name, f"must be a 1-D int32/int64 tensor, got {str(idx.dtype)[6:]} of shape {tuple(idx.shape)}")
    if idx.numel() == 0:
        if not allow_empty:
            raise fail(field_name, "is empty")
        return idx
    if idx.numel() > n:
        raise fail(field_name, f"holds {idx.numel()} indices for a tensor of {n} entries")
    if int(idx[0]) < 0 or int(idx[-1]) >= n or not bool((idx[1:] > idx[:-1]).all()):
        raise fail(field_name, f"must be strictly increasing (sorted, no duplicates) in [0, {n})")
    return idx


# ------------------------------------------------------------------------------------------ files
def header_length(path: str, fail: Fail) -> int:
    """The safetensors header length, refused above ``MAX_HEADER_BYTES`` or beyond the file's end
    (before safetensors parses or allocates anything)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise fail("header", f"is missing: the file is {size} bytes (truncated or corrupt?)")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise fail("header", f"claims {n:,} bytes, more than the limit of {MAX_HEADER_BYTES:,} (truncated or corrupt?)")
    if 8 + n > size:
        raise fail("header", f"claims {n:,} bytes but the file is only {size:,} (truncated or corrupt?)")
    return n


def member_path(directory: str, name: Any, pattern: re.Pattern, field_name: str, fail: Fail) -> str:
    """The path of the file ``name`` (read from a file fishkern wrote) inside ``directory``.
    ``name`` must be of fishkern's own naming ``pattern`` (so no ``..``, no absolute path, no path
    separator), and the file must not be a symbolic link that leads out of ``directory``."""
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise fail(field_name, f"must be a file name of the form {pattern.pattern} inside {directory}, got {name!r:.120}")
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(directory):
        raise fail(field_name, f"{name} is a symbolic link that leads out of {directory} (to {real})")
    return path
