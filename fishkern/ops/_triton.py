"""Triton availability, checked without importing triton (importing it costs ~0.5 s and must not
happen at `import fishkern`). Kernel modules import triton themselves, lazily, when first used."""
from __future__ import annotations

import importlib.util
import os

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of this device in this process."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return not triton_interpreting()
    return device.type == "cpu" and triton_interpreting()


def tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {
        torch.float32: tl.float32,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
        torch.float64: tl.float64,
    }[dtype]
