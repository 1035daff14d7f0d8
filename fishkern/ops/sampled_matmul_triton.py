"""The Triton kernel of ``fishkern::sampled_matmul`` (``out[e] = sum_t a[t, r_e] * b[t, c_e]`` with
``(r_e, c_e) = divmod(index[e], C)``), launched by ``sampled_matmul_triton`` in ``sampled_matmul.py``
(which validates; tests also run it on CPU under TRITON_INTERPRET=1). This module imports triton.

A program owns BLOCK_E consecutive entries and walks the tokens in BLOCK_T steps, loading a
[BLOCK_T, BLOCK_E] tile of each operand at the entries' rows / columns and summing the products over
the tokens in fp32 registers (elementwise products, no tl.dot: fp32 operands are multiplied exactly,
no TF32). Each program writes its own entries once: no atomics, deterministic. With the operands
transposed (token stride 1, as the op's CUDA kernel passes them) each entry's tokens are contiguous.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

BLOCK_E = 64
BLOCK_T = 32


@triton.jit
def _sampled_matmul_kernel(
    a_ptr, b_ptr, idx_ptr, out_ptr,
    K, T, C,
    stride_at, stride_ar, stride_bt, stride_bc,
    BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_e = pid.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < K
    flat = tl.load(idx_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
    rows = flat // C
    cols = flat - rows * C
    a_base = a_ptr + rows[None, :] * stride_ar
    b_base = b_ptr + cols[None, :] * stride_bc
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        m = (offs_t < T)[:, None] & mask_e[None, :]
        av = tl.load(a_base + offs_t[:, None] * stride_at, mask=m, other=0.0).to(tl.float32)
        bv = tl.load(b_base + offs_t[:, None] * stride_bt, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(av * bv, axis=0)
    tl.store(out_ptr + offs_e, acc, mask=mask_e)


def launch(a: Tensor, b: Tensor, index: Tensor, out: Tensor) -> None:
    k = index.numel()
    grid = (triton.cdiv(k, BLOCK_E),)
    _sampled_matmul_kernel[grid](
        a, b, index, out, k, a.shape[0], b.shape[1],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        BLOCK_E=BLOCK_E, BLOCK_T=BLOCK_T, num_warps=4,
    )
