"""``fishkern::sampled_matmul``: chosen entries of the product ``aᵀ·b`` (a sampled dense-dense
matrix product, SDDMM), the weight gradient of a layer at the k entries of a FISH mask only:

    out[e] = sum_t a[t, index[e] // C] * b[t, index[e] % C]      a: [T, R], b: [T, C]

``index`` holds flat row-major indices into the R x C product (int32 or int64, any order; sorted
is fastest). For ``nn.Linear`` (weight [OUT, IN]) a is the output gradient and b the input; for
HF's ``Conv1D`` (weight [IN, OUT]) the roles swap. 2·T·k multiply-adds instead of 2·T·R·C.

The result is float32 for float32 / bfloat16 / float16 operands (products and sums in float32:
low-precision gradients are accumulated in fp32) and float64 for float64 ones. Every kernel checks
every index (one device sync on a GPU for the default and CUDA kernels).

Kernels (the dispatcher picks one by the tensors' device):

* ``default`` (any device, plain PyTorch): the operands transposed and upcast once, then chunks
  of at most ``_CHUNK_ELEMS`` gathered products summed over the tokens. Slow on the CPU (it moves
  T values per entry through memory twice); it is the reference the others are tested against.
* CPU (``csrc/sampled_matmul_cpu.cpp``): both operands packed once into token tiles (transposed,
  converted to the accumulation type, a tile of b sized for L2), each entry one contiguous dot
  product, threaded over entries; AVX-512 / AVX2 / baseline versions picked at load time.
* ``cuda`` (``sampled_matmul_triton.py``, imported on the first CUDA call): the operands
  transposed on the device so each entry reads contiguous tokens, a program per block of entries
  summing over token tiles in fp32 registers. Deterministic (no atomics). float64 runs the
  default kernel.

Importing this module declares the op and registers the CUDA kernel's launcher; it never imports
triton or touches CUDA.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._native import ensure_loaded
from . import library
from .triton_support import triton_usable_on

NAME = "sampled_matmul"
SCHEMA = "(Tensor a, Tensor b, Tensor index) -> Tensor"
OPERAND_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
_CHUNK_ELEMS = 1 << 22  # gathered products alive at once in the default kernel (16 MiB in fp32)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The result's (and the sums') dtype for operands of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_arguments(a: Tensor, b: Tensor, index: Tensor) -> None:
    """What needs no data: shapes, dtypes, devices (the C++ kernel says the same)."""
    op = f"fishkern::{NAME}"
    torch._check(
        a.dim() == 2 and b.dim() == 2,
        lambda: f"{op}: a and b must be 2-D ([tokens, rows] and [tokens, cols]), got shapes {tuple(a.shape)} and {tuple(b.shape)}",
    )
    torch._check(a.shape[0] == b.shape[0], lambda: f"{op}: a has {a.shape[0]} tokens (rows) but b has {b.shape[0]}")
    torch._check(a.dtype == b.dtype, lambda: f"{op}: a is {a.dtype} but b is {b.dtype}")
    torch._check(
        a.dtype in OPERAND_DTYPES, lambda: f"{op}: dtype {a.dtype}; expected float32, float64, bfloat16 or float16"
    )
    torch._check(index.dtype in INDEX_DTYPES, lambda: f"{op}: index has dtype {index.dtype}; expected int32 or int64")
    torch._check(index.dim() == 1, lambda: f"{op}: index must be 1-D, got shape {tuple(index.shape)}")
    torch._check(
        a.device == b.device == index.device,
        lambda: f"{op}: a, b and index must be on one device, got {a.device}, {b.device}, {index.device}",
    )


def check_index_values(a: Tensor, b: Tensor, index: Tensor) -> None:
    """Every index inside the R x C product (one device sync on a GPU)."""
    numel = a.shape[1] * b.shape[1]
    if index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= numel:
        bad = int((index < 0).nonzero()[0]) if lo < 0 else int((index >= numel).nonzero()[0])
        raise RuntimeError(
            f"fishkern::{NAME}: index[{bad}] = {int(index[bad])} is outside the {a.shape[1]} x {b.shape[1]} product "
            f"({numel} entries)"
        )


def _fake(a, b, index):
    check_arguments(a, b, index)
    return a.new_empty((index.shape[0],), dtype=accumulation_dtype(a.dtype))


def sampled_matmul_default(a: Tensor, b: Tensor, index: Tensor) -> Tensor:
    check_arguments(a, b, index)
    check_index_values(a, b, index)
    acc = accumulation_dtype(a.dtype)
    k, tokens, cols = index.numel(), a.shape[0], b.shape[1]
    out = torch.zeros(k, dtype=acc, device=a.device)
    if k == 0 or tokens == 0:
        return out
    at, bt = a.t().to(acc).contiguous(), b.t().to(acc).contiguous()
    idx = index.to(torch.int64)
    step = max(1, _CHUNK_ELEMS // tokens)
    for s in range(0, k, step):
        f = idx[s : s + step]
        rows = torch.div(f, cols, rounding_mode="floor")
        out[s : s + step] = (at.index_select(0, rows) * bt.index_select(0, f - rows * cols)).sum(1)
    return out


def sampled_matmul_triton(a: Tensor, b: Tensor, index: Tensor) -> Tensor:
    """The Triton kernel called directly (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1):
    float32 / bfloat16 / float16 operands, a float32 result. The operands are read with their own
    strides; the CUDA kernel passes transposed copies (each entry then reads contiguous tokens)."""
    check_arguments(a, b, index)
    if a.dtype == torch.float64:
        raise ValueError(f"the Triton kernel of fishkern::{NAME} takes float32 / bfloat16 / float16 operands, "
                         "not float64 (the op runs float64 on its default kernel)")
    if not triton_usable_on(a.device):
        raise RuntimeError(
            f"the Triton kernel of fishkern::{NAME} cannot run on {a.device} tensors here: it needs CUDA tensors, "
            "or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
        )
    check_index_values(a, b, index)
    out = torch.empty(index.numel(), dtype=torch.float32, device=a.device)
    if index.numel() == 0:
        return out
    if a.shape[0] == 0:
        return out.zero_()
    from . import sampled_matmul_triton

    sampled_matmul_triton.launch(a, b, index, out)
    return out


def _cuda_kernel(a, b, index):
    if a.dtype == torch.float64 or not triton_usable_on(a.device):
        return sampled_matmul_default(a, b, index)
    # transposed on the device (cheap, bandwidth-bound): each entry's tokens become contiguous
    return sampled_matmul_triton(a.t().contiguous().t(), b.t().contiguous().t(), index)


OP = library.define(NAME, SCHEMA, fake=_fake, default=sampled_matmul_default,
                    doc="out[e] = (a.T @ b).flatten()[index[e]] (a weight gradient at masked entries, SDDMM)")
library.register_kernel(NAME, "cuda", _cuda_kernel)


def sampled_matmul(a: Tensor, b: Tensor, index: Tensor) -> Tensor:
    """``torch.ops.fishkern.sampled_matmul`` (the kernel for the tensors' device): the entries
    ``(a.T @ b).flatten()[index]`` without forming the product; float32 (float64 for float64 a, b).

    Args:
        a: [T, R] (any strides); b: [T, C], a's dtype and device.
        index: 1-D int32 / int64 flat row-major indices into the R x C product.
    """
    ensure_loaded()
    return OP(a, b, index)


def sampled_matmul_reference(a: Tensor, b: Tensor, index: Tensor) -> Tensor:
    """The dense product in float64, gathered: the oracle for tests."""
    return (a.double().t() @ b.double()).reshape(-1).index_select(0, index.to(torch.int64))
