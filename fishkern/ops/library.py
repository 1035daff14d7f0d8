"""The one place where fishkern's ops are declared.

Every op is declared once, here or by a module of ``fishkern.ops`` through ``define``: its schema,
its fake (meta) implementation, which checks what needs no data and gives output shapes to
``torch.compile`` / FakeTensor tracing, and a ``default`` kernel in plain PyTorch that runs on any
device (registered as ``CompositeExplicitAutograd``). Faster kernels are registered beside it per
device: the native extension (``csrc/``) adds CPU and CUDA kernels from C++ through
``TORCH_LIBRARY_IMPL``; Triton kernels are added from Python with ``register_kernel(name, "cuda",
fn)``. The dispatcher then picks the kernel by the tensors' device, so callers never branch on it,
and an installation without the native extension or without triton still has every op, running its
default kernel.

Importing this module defines nothing by itself and never imports triton or touches CUDA; the op
modules call ``define`` at their import.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

NAMESPACE = "fishkern"

# A fragment, not the namespace's definition: the native extension registers kernels (and a few
# internal ops) into the same namespace from C++.
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_DEFINED: dict[str, str] = {}


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def define(name: str, schema: str, *, fake: Callable, default: Callable, doc: str = ""):
    """Declare ``fishkern::<name><schema>`` with its fake and default kernels; returns the op
    overload (``torch.ops.fishkern.<name>.default``). Idempotent per process."""
    if name not in _DEFINED:
        _LIB.define(f"{name}{schema}")
        torch.library.register_fake(qualname(name), fake, lib=_LIB)
        torch.library.impl(qualname(name), "CompositeExplicitAutograd", default, lib=_LIB)
        _DEFINED[name] = doc
    return op(name)


def register_kernel(name: str, device_type: str, fn: Callable) -> None:
    """Register a Python kernel (e.g. a Triton launcher) for one device type ("cuda", "cpu")."""
    torch.library.register_kernel(qualname(name), device_type, fn, lib=_LIB)


def op(name: str):
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether ``fishkern::<name>`` has its own kernel for a dispatch key ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), dispatch_key)


def defined_ops() -> dict[str, str]:
    """name -> one-line description, for every op declared so far (see ``fishkern.ops.all_ops``)."""
    return dict(_DEFINED)
