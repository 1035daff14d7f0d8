"""The Triton kernel of ``fishkern::linear_fisher_acc_``, launched by ``linear_fisher_triton_`` in
``linear_fisher.py`` (the op's CUDA kernel, which validates and imports this module on the first
call; tests also run it on CPU under TRITON_INTERPRET=1). This module imports triton.

Sample b's weight gradient ``G_b = g[b].T @ x[b]`` (OUT x IN, over its tokens) is formed tile by
tile with ``tl.dot`` in fp32 registers and squared there: the FLOPs of the weight-gradient GEMM, and
only the (OUT, IN) accumulator is written.

Grid: (OUT tiles, IN tiles, sample splits). A program owns one BLOCK_O x BLOCK_I tile and a
contiguous range of samples, which it visits in order; for each sample it loops over that sample's
tokens in BLOCK_T steps. With one split the program adds its tile into ``acc``. With several (a
small layer whose tiles alone do not fill the GPU) each split writes its partial tile into an fp32
workspace [splits, OUT, IN] and ``acc += workspace.sum(0)`` follows, a reduction whose order is
fixed for a fixed shape: no atomics, so the same inputs give bit-identical scores on every run. The
split count depends on the shapes and the GPU's SM count (it is fixed for a given GPU model);
different split counts round differently (fp32 sums in another order).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_support import triton_interpreting

# Programs per SM aimed at when choosing sample splits.
_PROGRAMS_PER_SM = 2
# Split workspaces stay below this (and below _MAX_WORKSPACE_X times acc): splits only happen for
# layers whose tiles do not fill the GPU, so the bound rarely bites (1024 x 1024 on 132 SMs: 4 splits,
# 16 MiB).
_MAX_WORKSPACE_BYTES = 64 << 20
_MAX_WORKSPACE_X = 64


@triton.jit
def _linear_fisher_kernel(
    x_ptr, g_ptr, out_ptr, len_ptr,
    B, T, OUT, IN,
    stride_xb, stride_xt, stride_xi,
    stride_gb, stride_gt, stride_go,
    num_splits,
    HAS_LENGTHS: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_s = tl.program_id(2)

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    mask_o = offs_o < OUT
    mask_i = offs_i < IN
    # Offsets within one sample in int64: T * IN (or T * OUT) may pass 2**31 for long sequences.
    g_tile = offs_o.to(tl.int64)[:, None] * stride_go + offs_t.to(tl.int64)[None, :] * stride_gt  # (O, T)
    x_tile = offs_t.to(tl.int64)[:, None] * stride_xt + offs_i.to(tl.int64)[None, :] * stride_xi  # (T, I)
    g_step = BLOCK_T * stride_gt
    x_step = BLOCK_T * stride_xt

    if SPLIT:  # this split's slice of the workspace
        out_ptr += pid_s.to(tl.int64) * OUT * IN
    fisher = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    # Split s takes samples [s * B // S, (s + 1) * B // S): sizes differ by at most one.
    b_start = pid_s * B // num_splits
    b_end = (pid_s + 1) * B // num_splits
    # Per-sample base pointers advance by the batch stride (64-bit pointer arithmetic).
    g_base = g_ptr + b_start.to(tl.int64) * stride_gb
    x_base = x_ptr + b_start.to(tl.int64) * stride_xb
    for b in range(b_start, b_end):
        if HAS_LENGTHS:
            # Clamped to [0, T] (in the lengths' own width, then narrowed): unchecked lengths can
            # never make the loop read past a sample.
            n_t = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), T).to(tl.int32)
        else:
            n_t = T
        g_ptrs = g_base + g_tile
        x_ptrs = x_base + x_tile
        grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, n_t, BLOCK_T):
            t_ok = (t0 + offs_t) < n_t
            gt = tl.load(g_ptrs, mask=mask_o[:, None] & t_ok[None, :], other=0.0)
            xt = tl.load(x_ptrs, mask=t_ok[:, None] & mask_i[None, :], other=0.0)
            if DOT_FP32:  # interpreter only, see _launch
                gt = gt.to(tl.float32)
                xt = xt.to(tl.float32)
            # Inputs in their own dtype, fp32 accumulation; "ieee" keeps fp32 inputs exact (no TF32)
            # and is ignored for bf16/fp16.
            grad = tl.dot(gt, xt, acc=grad, input_precision="ieee")
            g_ptrs += g_step
            x_ptrs += x_step
        fisher += grad * grad
        g_base += stride_gb
        x_base += stride_xb

    tile = offs_o.to(tl.int64)[:, None] * IN + offs_i[None, :]
    mask = mask_o[:, None] & mask_i[None, :]
    if SPLIT:  # this split's partial tile
        tl.store(out_ptr + tile, fisher, mask=mask)
    else:
        tl.store(out_ptr + tile, tl.load(out_ptr + tile, mask=mask, other=0.0) + fisher, mask=mask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _sm_count(index: int) -> int:
    """Multiprocessors of CUDA device ``index``, read once per device (the query costs a sync-free
    but slow driver call; it was made on every Linear call)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(batch: int, tiles: int, numel: int, device: torch.device) -> int:
    """Sample splits: enough programs to fill the GPU (~2 per SM), never more than B (so no split
    is empty), and a workspace of at most _MAX_WORKSPACE_BYTES / _MAX_WORKSPACE_X times acc. One
    split (no workspace) whenever the tiles alone fill the GPU."""
    if device.type != "cuda":  # the interpreter runs programs one after another: splitting only adds work
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    splits = max(1, min(batch, _cdiv(_PROGRAMS_PER_SM * _sm_count(index), tiles)))
    if splits > 1:
        splits = min(splits, _MAX_WORKSPACE_X, max(1, _MAX_WORKSPACE_BYTES // (4 * max(1, numel))))
    return splits


# Warps for unaligned rows (no pipelining), per (BLOCK_O, BLOCK_I), for both BLOCK_T. Chosen from a
# sweep of every config through ptxas (scripts/triton_aot_gate.py): besides the register pressure
# of 64 x 64 tiles, sm_80's ptxas (12.9) spills 8 bytes at only 56-79 registers for some other
# pairs (16 x 64 with 4 warps, 32 x 64 and BLOCK_T 16 with 8, 64 x 16 with 4, 16 x 32 with 2);
# these choices compile without spills on sm_80 and sm_90 for fp32, bf16 and fp16.
_UNALIGNED_WARPS = {
    (16, 16): 4, (16, 32): 4, (16, 64): 8,
    (32, 16): 4, (32, 32): 4, (32, 64): 4,
    (64, 16): 8, (64, 32): 4, (64, 64): 8,
}


@dataclass(frozen=True)
class TileConfig:
    block_o: int
    block_i: int
    block_t: int
    num_warps: int
    num_stages: int | None  # None: Triton's default (software pipelining of the T loop)

    def launch_options(self) -> dict:
        opts = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            opts["num_stages"] = self.num_stages
        return opts


def _block(n: int, largest: int) -> int:
    """The smallest power of two >= n in [16, largest] (tl.dot needs every dimension >= 16)."""
    return min(largest, max(16, triton.next_power_of_2(max(1, n))))


def _rows_aligned(t: Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 and t.stride(1) % 16 == 0


def tile_config(x: Tensor, g: Tensor, block_o: int | None = None, block_i: int | None = None,
                block_t: int | None = None) -> TileConfig:
    """Tiles and warps for these inputs (strides as the kernel will read them).

    Tiles shrink to the layer (BLOCK_O / BLOCK_I: the next power of two of OUT / IN, 16 to 64) and
    to short sequences (BLOCK_T 16 for T <= 16, else 32), so small or odd layers do not compute
    mostly masked lanes. Warps follow the tile: 4 for tiles of 2048+ entries, 2 from 512, 1 below
    (aligned rows); unaligned rows: 4 or 8 (_UNALIGNED_WARPS) and no pipelining (see below).

    Rows of x or g that do not start 16-element aligned (a batch or token stride not divisible by
    16, or a base pointer not 16-byte aligned) cannot be read with vector loads: every element of
    the two operand tiles then has its own address, and with the T loop software-pipelined (Triton's
    default stages) fp32 64 x 64 tiles need more than 255 registers and spill (ptxas, sm_80 and
    sm_90, e.g. B=3, T=5, OUT=9, IN=100 with 64-wide tiles). More warps and no pipelining keep
    them in registers (the warps per tile come from a sweep, see _UNALIGNED_WARPS); scripts/triton_aot_gate.py compiles every reachable config and fails on spills.
    """
    seq, in_features, out_features = x.shape[1], x.shape[2], g.shape[2]
    bo = block_o or _block(out_features, 64)
    bi = block_i or _block(in_features, 64)
    bt = block_t or (16 if seq <= 16 else 32)
    elems = bo * bi
    warps = 4 if elems >= 2048 else 2 if elems >= 512 else 1
    if _rows_aligned(x) and _rows_aligned(g):
        return TileConfig(bo, bi, bt, warps, None)
    return TileConfig(bo, bi, bt, _UNALIGNED_WARPS[(bo, bi)], 1)


def _launch(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None, *, splits: int,
            block_o: int | None = None, block_i: int | None = None, block_t: int | None = None) -> None:
    """Launch on validated, non-empty inputs with the given number of sample splits (tests force
    splits and small blocks here to reach the multi-tile and workspace paths with small shapes)."""
    batch, seq = x.shape[:2]
    out_features, in_features = acc.shape
    # Any strides are read as they are; only a non-unit-stride feature dim is copied, since loads
    # along it would not coalesce.
    if x.stride(2) != 1 and in_features > 1:
        x = x.contiguous()
    if g.stride(2) != 1 and out_features > 1:
        g = g.contiguous()
    if lengths is not None:
        lengths = lengths.contiguous()
    config = tile_config(x, g, block_o, block_i, block_t)
    splits = max(1, min(splits, batch))
    out = acc if splits == 1 else torch.empty((splits, out_features, in_features), dtype=torch.float32,
                                              device=acc.device)
    grid = (_cdiv(out_features, config.block_o), _cdiv(in_features, config.block_i), splits)
    _linear_fisher_kernel[grid](
        x, g, out, lengths if lengths is not None else acc,
        batch, seq, out_features, in_features,
        x.stride(0), x.stride(1), x.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        splits,
        HAS_LENGTHS=lengths is not None, SPLIT=splits > 1,
        # Triton's interpreter multiplies bf16 tiles as their raw uint16 bits; upcasting there is
        # exact (bf16 products fit in fp32) and matches a GPU bf16 dot with fp32 accumulation.
        DOT_FP32=x.dtype == torch.bfloat16 and triton_interpreting(),
        BLOCK_O=config.block_o, BLOCK_I=config.block_i, BLOCK_T=config.block_t,
        **config.launch_options(),
    )
    if splits > 1:
        # Fixed-order reduction over the splits (deterministic for a fixed shape), then one add.
        acc.add_(out.sum(0))


def launch(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None) -> None:
    """Tiles and sample splits for these inputs, then the launch. Inputs already validated by
    ``fishkern.ops.linear_fisher.linear_fisher_triton_`` (float32 acc, non-empty)."""
    config = tile_config(x, g)
    tiles = _cdiv(acc.shape[0], config.block_o) * _cdiv(acc.shape[1], config.block_i)
    _launch(acc, x, g, lengths, splits=_num_splits(x.shape[0], tiles, acc.numel(), acc.device))
