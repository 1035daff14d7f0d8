"""Diagonal empirical Fisher of a Linear layer's weight, accumulated in Triton straight from the
layer input and the output gradient, without materialising per-sample gradients.

For a Linear layer ``y = x @ W.T`` applied to a batch of B sequences, the gradient of sample b is
``G_b = g[b].T @ x[b]`` (OUT x IN, summed over the sample's tokens) with ``x`` the layer input
(B, T, IN) and ``g`` the gradient with respect to the output (B, T, OUT). The empirical Fisher
diagonal adds ``sum_b G_b**2`` (elementwise). The kernel computes each G_b tile with ``tl.dot`` in
fp32 registers and squares it there, so it costs the FLOPs of the weight-gradient GEMM and writes
only the (OUT, IN) accumulator.

Grid: (OUT tiles, IN tiles, sample splits). A program owns one BLOCK_O x BLOCK_I tile of the
accumulator and a contiguous range of samples; for each sample it loops over that sample's tokens in
BLOCK_T steps. With one split the tile is added with a plain load/add/store (deterministic); with
several it is added with ``tl.atomic_add`` (fp32 addition order then varies between runs).

Importing this module does not import triton: the kernel is jitted on first use (``_kernel()``).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..ops._triton import triton_interpreting, triton_usable_on

# triton.language, bound by _kernel() on first use. The kernel body below refers to it as a module
# global: Triton's compiler and its interpreter both resolve names in the function's globals.
tl = None

_BLOCK_O = 64
_BLOCK_I = 64
_BLOCK_T = 32
_NUM_WARPS = 4
# Rows of x or g that do not start 16-element aligned (a batch or token stride not divisible by 16,
# or a base pointer not 16-byte aligned) cannot be read with vector loads: every element of the two
# operand tiles then has its own address, and with the T loop software-pipelined (Triton's default
# stages) fp32 tiles need more than 255 registers and spill (ptxas, sm_80 and sm_90, e.g. B=3, T=5,
# OUT=9, IN=100). Twice the warps and no pipelining keep those launches at <= 160 registers;
# scripts/triton_aot_gate.py compiles every launched variant and fails on spills.
_UNALIGNED_NUM_WARPS = 8
_UNALIGNED_NUM_STAGES = 1
_DOT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LENGTH_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _linear_fisher_kernel(
    x_ptr, g_ptr, acc_ptr, len_ptr,
    B, T, OUT, IN,
    stride_xb, stride_xt, stride_xi,
    stride_gb, stride_gt, stride_go,
    num_splits,
    HAS_LENGTHS: tl.constexpr, ATOMIC: tl.constexpr, DOT_FP32: tl.constexpr,
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

    fisher = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    # Split s takes samples [s * B // S, (s + 1) * B // S): sizes differ by at most one.
    b_start = pid_s * B // num_splits
    b_end = (pid_s + 1) * B // num_splits
    # Per-sample base pointers advance by the batch stride (64-bit pointer arithmetic).
    g_base = g_ptr + b_start.to(tl.int64) * stride_gb
    x_base = x_ptr + b_start.to(tl.int64) * stride_xb
    for b in range(b_start, b_end):
        if HAS_LENGTHS:
            n_t = tl.load(len_ptr + b).to(tl.int32)
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

    acc_ptrs = acc_ptr + offs_o.to(tl.int64)[:, None] * IN + offs_i[None, :]
    mask = mask_o[:, None] & mask_i[None, :]
    if ATOMIC:
        tl.atomic_add(acc_ptrs, fisher, mask=mask, sem="relaxed")
    else:
        tl.store(acc_ptrs, tl.load(acc_ptrs, mask=mask, other=0.0) + fisher, mask=mask)


@functools.cache
def _kernel():
    """Import triton and jit the kernel (once per process)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_linear_fisher_kernel)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _num_splits(batch: int, tiles: int, device: torch.device) -> int:
    """Sample splits: enough programs to fill the GPU (~2 per SM), never more than B (so no split
    is empty). One split (no atomics, deterministic) whenever the tiles alone fill the GPU."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another: splitting only adds work
        target = 1
    return max(1, min(batch, _cdiv(target, tiles)))


def _validate(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a 3-D tensor (B, T, IN), got shape {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(g, Tensor) or g.dim() != 3:
        raise ValueError(f"g must be a 3-D tensor (B, T, OUT), got shape {tuple(getattr(g, 'shape', ()))}")
    if x.shape[:2] != g.shape[:2]:
        raise ValueError(f"x {tuple(x.shape)} and g {tuple(g.shape)} must agree on (B, T)")
    if x.dtype not in _DOT_DTYPES or g.dtype != x.dtype:
        raise ValueError(
            f"x and g must share one dtype among float32, bfloat16, float16; got {x.dtype} and {g.dtype}"
        )
    out_features, in_features = g.shape[2], x.shape[2]
    if not isinstance(acc, Tensor) or acc.shape != (out_features, in_features):
        raise ValueError(
            f"acc must have shape (OUT, IN) = {(out_features, in_features)}, got {tuple(getattr(acc, 'shape', ()))}"
        )
    if acc.dtype != torch.float32:
        raise ValueError(f"acc must be float32, got {acc.dtype}")
    if not acc.is_contiguous():
        raise ValueError("acc must be contiguous")
    if x.device != acc.device or g.device != acc.device:
        raise ValueError(f"acc ({acc.device}), x ({x.device}) and g ({g.device}) must be on one device")
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.shape != (x.shape[0],):
            got = tuple(getattr(lengths, "shape", ()))
            raise ValueError(f"lengths must have shape (B,) = ({x.shape[0]},), got {got}")
        if lengths.dtype not in _LENGTH_DTYPES:
            raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.device != acc.device:
            raise ValueError(f"lengths ({lengths.device}) must be on the device of acc ({acc.device})")
        if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > x.shape[1]):
            raise ValueError(f"lengths must lie in [0, T] = [0, {x.shape[1]}]")
    if not triton_usable_on(acc.device):
        raise RuntimeError(
            f"the Triton Fisher kernel cannot run on {acc.device} tensors here: it needs CUDA tensors, or "
            "CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
        )


def _launch_config(x: Tensor, g: Tensor) -> dict:
    """num_warps / num_stages for these inputs (strides as the kernel will read them)."""
    aligned = all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 and t.stride(1) % 16 == 0 for t in (x, g))
    if aligned:
        return {"num_warps": _NUM_WARPS}  # Triton's default num_stages
    return {"num_warps": _UNALIGNED_NUM_WARPS, "num_stages": _UNALIGNED_NUM_STAGES}


def _launch(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None, *, splits: int,
            block_o: int = _BLOCK_O, block_i: int = _BLOCK_I, block_t: int = _BLOCK_T) -> None:
    """Launch on validated, non-empty inputs with the given number of sample splits (tests use this
    to reach the multi-tile and atomic paths with small shapes)."""
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
    splits = max(1, min(splits, batch))
    grid = (_cdiv(out_features, block_o), _cdiv(in_features, block_i), splits)
    _kernel()[grid](
        x, g, acc, lengths if lengths is not None else acc,
        batch, seq, out_features, in_features,
        x.stride(0), x.stride(1), x.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        splits,
        HAS_LENGTHS=lengths is not None, ATOMIC=splits > 1,
        # Triton's interpreter multiplies bf16 tiles as their raw uint16 bits; upcasting there is
        # exact (bf16 products fit in fp32) and matches a GPU bf16 dot with fp32 accumulation.
        DOT_FP32=x.dtype == torch.bfloat16 and triton_interpreting(),
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t,
        **_launch_config(x, g),
    )


def linear_fisher_triton_(acc: Tensor, x: Tensor, g: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Add the diagonal empirical Fisher of a Linear weight over a batch to ``acc`` in place.

    ``acc[o, i] += sum_b (sum_{t < lengths[b]} g[b, t, o] * x[b, t, i]) ** 2``

    Args:
        acc: float32 (OUT, IN) contiguous accumulator, updated in place and returned.
        x: layer input (B, T, IN), float32 / bfloat16 / float16, any strides.
        g: gradient of the layer output (B, T, OUT), same dtype as ``x``, any strides.
        lengths: optional integer (B,) tensor: only tokens t < lengths[b] of sample b count (right
            padding; the others are not read). Values must lie in [0, T]. Checking them costs one
            device sync.

    fp32 inputs are multiplied exactly (no TF32); bf16 / fp16 inputs are multiplied in their dtype
    with fp32 accumulation. With more than one sample split (small layers on a large GPU) the tiles
    are added atomically, so the fp32 summation order, and the last bits, may vary between runs.
    """
    _validate(acc, x, g, lengths)
    batch, seq = x.shape[:2]
    if acc.numel() == 0 or batch == 0 or seq == 0:
        return acc
    tiles = _cdiv(acc.shape[0], _BLOCK_O) * _cdiv(acc.shape[1], _BLOCK_I)
    _launch(acc, x, g, lengths, splits=_num_splits(batch, tiles, acc.device))
    return acc


def linear_fisher_reference(x: Tensor, g: Tensor, lengths: Tensor | None = None) -> Tensor:
    """``sum_b (g[b, :lengths[b]].T @ x[b, :lengths[b]]) ** 2`` in float64 (OUT, IN), in plain torch."""
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"x (B, T, IN) and g (B, T, OUT) must be 3-D with equal (B, T), got {tuple(x.shape)}, {tuple(g.shape)}"
        )
    out = torch.zeros(g.shape[2], x.shape[2], dtype=torch.float64, device=x.device)
    for b in range(x.shape[0]):
        n = x.shape[1] if lengths is None else int(lengths[b])
        grad = torch.einsum("to,ti->oi", g[b, :n].double(), x[b, :n].double())
        out += grad * grad
    return out
