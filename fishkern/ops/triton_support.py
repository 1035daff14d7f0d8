"""Triton availability, checked without importing triton (importing it costs ~0.5 s and must not
happen at `import fishkern`). Kernel modules import triton themselves, lazily, when first used."""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os

import torch


# The oldest triton whose interpreter runs every fishkern kernel exactly (checked with 3.2.0 and
# 3.5.1; 3.0/3.1, which torch 2.4/2.5 pin, reject them). An older triton is ignored: the PyTorch paths run.
MIN_TRITON = (3, 2)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache  # read once: the optimizers ask at every step
def triton_version() -> tuple[int, ...] | None:
    """The installed triton's (major, minor), read from its metadata without importing it."""
    if not triton_installed():
        return None
    try:
        text = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on the path
        return MIN_TRITON
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@functools.cache  # the installed triton does not change within a process
def triton_supported() -> bool:
    """triton is installed and new enough for fishkern's kernels (MIN_TRITON)."""
    v = triton_version()
    return v is not None and v >= MIN_TRITON


def triton_status() -> str:
    """One line on triton for messages: missing, too old, or usable."""
    v = triton_version()
    if v is None:
        return "triton is not installed"
    if v < MIN_TRITON:
        return (f"triton {'.'.join(map(str, v))} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest fishkern's "
                "kernels run on")
    return f"triton {'.'.join(map(str, v))}"


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (for tests)."""
    if _ENV_BYTES is not None:  # the optimizers ask at every step; os.environ.get costs ~1-2 µs
        v = _ENV_BYTES.get(b"TRITON_INTERPRET")
        return v is not None and v not in (b"", b"0")
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# On POSIX, os.environ keeps its entries as bytes in `_data` (and updates it on every change made
# through os.environ): reading that dict skips the str encode/decode of os.environ.get.
_ENV_BYTES = os.environ._data if os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict) else None


def triton_usable_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of this device in this process."""
    kind = device_type(device)
    if not triton_supported():
        if kind == "cuda" and triton_installed():
            _warn_old_triton()
        return False
    if kind == "cuda":
        return not triton_interpreting()
    return kind == "cpu" and triton_interpreting()


_DEVICE_TYPES: dict = {}


def device_type(device: torch.device) -> str:
    """``device.type``, memoised: the attribute builds a new str per read (~0.7 µs), and the step
    paths ask at every step. Bounded by the devices a process uses."""
    kind = _DEVICE_TYPES.get(device)
    if kind is None:
        kind = _DEVICE_TYPES[device] = device.type
    return kind


_WARNED_OLD = False


def _warn_old_triton() -> None:
    global _WARNED_OLD
    if not _WARNED_OLD:
        _WARNED_OLD = True
        import warnings

        warnings.warn(f"fishkern: {triton_status()}: the CUDA paths use PyTorch instead of the fused Triton kernels "
                      "(upgrade triton for them)", RuntimeWarning, stacklevel=3)


_TL_DTYPES: dict = {}


def tl_dtype(dtype: torch.dtype):
    """triton.language's dtype for a torch dtype (the map is built on first use: importing triton is
    left to the first launch)."""
    if not _TL_DTYPES:
        import triton.language as tl

        _TL_DTYPES.update({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                           torch.float64: tl.float64})
    return _TL_DTYPES[dtype]
