"""Loads the native extension ``fishkern._C`` (csrc/) on first use, never at import time.

The package works without it; calling a native op then raises ``NativeExtensionMissing`` with
the command that builds it.
"""
from __future__ import annotations

import functools
import glob
import os

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the fishkern source tree (needs a C++ "
    "compiler and ninja; set FISHKERN_NO_NATIVE=0 or leave it unset)"
)


class NativeExtensionMissing(RuntimeError):
    """The compiled extension fishkern._C is not available in this installation."""


@functools.cache
def _load() -> str | None:
    """Path of the loaded library, or None when there is none (the error is kept for the message)."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not candidates:
        return None
    torch.ops.load_library(candidates[0])
    return candidates[0]


def native_available() -> bool:
    try:
        return _load() is not None
    except OSError:
        return False


def require_native(op: str) -> None:
    try:
        path = _load()
    except OSError as e:  # a library that exists but cannot load (e.g. built against another torch)
        raise NativeExtensionMissing(f"fishkern's native extension failed to load for {op}: {e}; re{BUILD_HINT}") from e
    if path is None:
        raise NativeExtensionMissing(f"{op} needs fishkern's native extension, which is not built; {BUILD_HINT}")
