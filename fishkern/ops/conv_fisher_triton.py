"""The Triton kernel of the Conv2d Fisher op (``fishkern::conv2d_fisher_acc_``, declared and validated
in ``conv_fisher.py``, which registers ``launch`` as its CUDA kernel; tests also run it on CPU under
TRITON_INTERPRET=1). This module imports triton.

For a Conv2d weight (Cout, Cin/G, kh, kw) with stride s, zero padding p, dilation d and G groups,
sample n's weight gradient is

    G_n[o, c, a, b] = sum_{oh, ow} g[n, o, oh, ow] * xpad[n, grp(o) * Cin_g + c, oh*sh + a*dh, ow*sw + b*dw]

and the kernel adds ``sum_n G_n ** 2`` to ``acc``. Per group this is the Linear Fisher form of
``linear_fisher_triton.py`` with T = Ho * Wo positions, IN = Cin_g * kh * kw and OUT = Cout / G:
``G_n = g_n (OUT, T) @ cols_n (T, IN)``. The (T, IN) operand tile is gathered straight from the
image by address arithmetic (implicit im2col: column k is (c, a, b), row t is (oh, ow); padding is a
masked load of 0), so no unfolded copy of x is ever made; each sample's gradient tile is formed with
``tl.dot`` in fp32 registers and squared there, and only the accumulator is written.

Grid: (groups x OUT tiles, IN tiles, sample splits), the group folded into the first axis (the
only one allowed more than 65535 programs: depthwise layers have one group per channel). A program
owns one BLOCK_O x BLOCK_I tile of one group and a contiguous range of samples, visited in order;
for each sample it loops over the output positions in BLOCK_T steps. With one split the program adds
its tile into ``acc``; with several (small layers whose tiles do not fill the GPU) each split writes
a partial tile into an fp32 workspace [splits, Cout, IN] and ``acc += workspace.sum(0)`` follows: a
fixed-order reduction, no atomics, so equal inputs give bit-identical results on every run (the
split count is fixed for a shape on a given GPU model; another count rounds differently).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .linear_fisher_triton import _UNALIGNED_WARPS, TileConfig, _block, _cdiv, _num_splits
from .triton_support import triton_interpreting


@triton.jit
def _conv_fisher_kernel(
    x_ptr, g_ptr, out_ptr,
    B, OUT, IN, o_tiles,
    H, W, Wo, T, KHW, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_gb, stride_gc, stride_gh, stride_gw,
    num_splits, acc_numel,
    G_FLAT: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_go = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_s = tl.program_id(2)
    grp = pid_go // o_tiles
    pid_o = pid_go % o_tiles

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # output channel within the group
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # im2col column k = (c * kh + a) * kw + b
    offs_t = tl.arange(0, BLOCK_T)
    mask_o = offs_o < OUT
    mask_i = offs_i < IN
    # Column k's input channel and kernel tap, and its fixed part of the x offset (int64: offsets
    # within a sample may pass 2**31 for large images or strided views).
    cin = offs_i // KHW
    tap = offs_i % KHW
    ka = (tap // KW) * dil_h  # row offset of the tap in the padded image
    kb = (tap % KW) * dil_w
    # this group's first input / output channel: grp * IN // KHW = grp * Cin_g
    chan0 = grp * (IN // KHW)
    x_col = (chan0 + cin).to(tl.int64) * stride_xc + ka.to(tl.int64) * stride_xh + kb.to(tl.int64) * stride_xw
    g_row = (grp * OUT + offs_o).to(tl.int64) * stride_gc

    if SPLIT:  # this split's slice of the workspace [splits, G * OUT, IN]
        out_ptr += pid_s.to(tl.int64) * acc_numel
    fisher = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    # Split s takes samples [s * B // S, (s + 1) * B // S): sizes differ by at most one.
    b_start = pid_s * B // num_splits
    b_end = (pid_s + 1) * B // num_splits
    g_base = g_ptr + b_start.to(tl.int64) * stride_gb
    x_base = x_ptr + b_start.to(tl.int64) * stride_xb
    for n in range(b_start, b_end):
        grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            t_ok = t < T
            oh = t // Wo
            ow = t % Wo
            if G_FLAT:  # g's (Ho, Wo) read as one axis of stride stride_gw
                g_col = t.to(tl.int64) * stride_gw
            else:
                g_col = oh.to(tl.int64) * stride_gh + ow.to(tl.int64) * stride_gw
            gt = tl.load(g_base + g_row[:, None] + g_col[None, :], mask=mask_o[:, None] & t_ok[None, :], other=0.0)
            # Row t's top-left corner in the unpadded image; taps outside it are the zero padding.
            ih0 = oh * stride_h - pad_h
            iw0 = ow * stride_w - pad_w
            ih = ih0[:, None] + ka[None, :]
            iw = iw0[:, None] + kb[None, :]
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = ih0.to(tl.int64) * stride_xh + iw0.to(tl.int64) * stride_xw
            xt = tl.load(x_base + x_row[:, None] + x_col[None, :],
                         mask=inside & t_ok[:, None] & mask_i[None, :], other=0.0)
            if DOT_FP32:  # interpreter only, see _launch
                gt = gt.to(tl.float32)
                xt = xt.to(tl.float32)
            # Inputs in their own dtype, fp32 accumulation; "ieee" keeps fp32 inputs exact (no TF32)
            # and is ignored for bf16/fp16.
            grad = tl.dot(gt, xt, acc=grad, input_precision="ieee")
        fisher += grad * grad
        g_base += stride_gb
        x_base += stride_xb

    tile = (grp * OUT + offs_o).to(tl.int64)[:, None] * IN + offs_i[None, :]
    mask = mask_o[:, None] & mask_i[None, :]
    if SPLIT:  # this split's partial tile
        tl.store(out_ptr + tile, fisher, mask=mask)
    else:
        tl.store(out_ptr + tile, tl.load(out_ptr + tile, mask=mask, other=0.0) + fisher, mask=mask)


def tile_config(out_per_group: int, cols: int, positions: int, block_o: int | None = None,
                block_i: int | None = None, block_t: int | None = None, half: bool = False) -> TileConfig:
    """Tiles and warps for a group of ``out_per_group`` output channels, ``cols`` = Cin_g * kh * kw
    im2col columns and ``positions`` = Ho * Wo output positions.

    Tiles shrink to the layer as in the Linear kernel (BLOCK_O / BLOCK_I: the next power of two of
    OUT / IN, 16 to 64; BLOCK_T 16 for T <= 16, else 32). The gathered x tile has one address per
    element (the column -> (c, a, b) and row -> (oh, ow) maps defeat vector loads), the situation of
    the Linear kernel's unaligned rows, so its swept warps (``_UNALIGNED_WARPS``) and no software
    pipelining are used: they keep the tiles in registers (scripts/triton_aot_gate.py compiles
    every reachable config for sm_80 and sm_90 and fails on spills).
    """
    bo = block_o or _block(out_per_group, 64)
    bi = block_i or _block(cols, 64)
    bt = block_t or (16 if positions <= 16 else 32)
    warps = _UNALIGNED_WARPS[(bo, bi)]
    if half and (bo, bi, bt) == (64, 64, 16):
        # bf16 / fp16 64 x 64 tiles with BLOCK_T 16 (ResNet-34's 4 px layers): with 8 warps sm_80's
        # ptxas caps the kernel at 64 registers and spills (24 B stores); 4 warps use 128, no spill
        warps = 4
    return TileConfig(bo, bi, bt, warps, 1)


def _pair(v) -> tuple[int, int]:
    a, b = (v, v) if isinstance(v, int) else tuple(v)
    return int(a), int(b)


def _geometry(acc: Tensor, x: Tensor, g: Tensor, stride, padding, dilation, groups: int):
    """Cheap invariants of valid inputs (the op module checks them with messages; here they are
    asserts), and the kernel's (OUT, IN, T) per group."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    assert x.dim() == 4 and g.dim() == 4 and acc.dim() == 4, (x.shape, g.shape, acc.shape)
    batch, cin, h, w = x.shape
    cout, cin_g, kh, kw = acc.shape
    assert acc.dtype == torch.float32 and acc.is_contiguous()
    assert x.dtype == g.dtype and x.dtype in (torch.float32, torch.bfloat16, torch.float16), (x.dtype, g.dtype)
    assert x.device == g.device == acc.device
    assert groups >= 1 and cin == cin_g * groups and cout % groups == 0 and g.shape[:2] == (batch, cout)
    assert min(sh, sw, dh, dw) >= 1 and min(ph, pw) >= 0
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    assert tuple(g.shape[2:]) == (max(ho, 0), max(wo, 0)), (tuple(g.shape), ho, wo)
    return (sh, sw), (ph, pw), (dh, dw)


def _launch(acc: Tensor, x: Tensor, g: Tensor, stride, padding, dilation, groups: int, *, splits: int,
            block_o: int | None = None, block_i: int | None = None, block_t: int | None = None) -> None:
    """Launch with the given number of sample splits (tests force splits and small blocks here to
    reach the multi-tile and workspace paths with small shapes)."""
    (sh, sw), (ph, pw), (dh, dw) = _geometry(acc, x, g, stride, padding, dilation, groups)
    batch = x.shape[0]
    h, w = x.shape[2:]
    cout, cin_g, kh, kw = acc.shape
    ho, wo = g.shape[2:]
    positions = ho * wo
    if batch == 0 or acc.numel() == 0 or positions == 0:
        return  # no sample, no weight, or no output position: every gradient is empty or zero
    out_g, cols = cout // groups, cin_g * kh * kw
    config = tile_config(out_g, cols, positions, block_o, block_i, block_t, half=x.dtype != torch.float32)
    splits = max(1, min(splits, batch))
    # Any strides are read as they are (channels_last, sliced views). g's (Ho, Wo) is read as one
    # axis when its strides allow, which lets the compiler see runs of contiguous positions.
    g_flat = ho == 1 or g.stride(2) == wo * g.stride(3)
    out = acc if splits == 1 else torch.empty((splits, *acc.shape), dtype=torch.float32, device=acc.device)
    o_tiles = _cdiv(out_g, config.block_o)
    grid = (groups * o_tiles, _cdiv(cols, config.block_i), splits)
    _conv_fisher_kernel[grid](
        x, g, out,
        batch, out_g, cols, o_tiles,
        h, w, wo, positions, kh * kw, kw,
        sh, sw, ph, pw, dh, dw,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        g.stride(0), g.stride(1), g.stride(2), g.stride(3),
        splits, acc.numel(),
        G_FLAT=g_flat, SPLIT=splits > 1,
        # Triton's interpreter multiplies bf16 tiles as their raw uint16 bits; upcasting there is
        # exact (bf16 products fit in fp32) and matches a GPU bf16 dot with fp32 accumulation.
        DOT_FP32=x.dtype == torch.bfloat16 and triton_interpreting(),
        BLOCK_O=config.block_o, BLOCK_I=config.block_i, BLOCK_T=config.block_t,
        **config.launch_options(),
    )
    if splits > 1:
        # Fixed-order reduction over the splits (deterministic for a fixed shape), then one add.
        acc.add_(out.sum(0))


def launch(acc: Tensor, x: Tensor, g: Tensor, stride, padding, dilation, groups: int) -> None:
    """``acc[o, c, a, b] += sum_n G_n[o, c, a, b] ** 2`` for the Conv2d weight gradient G_n of each
    sample (see the module docstring). Inputs already validated by the op's CUDA kernel (float32
    contiguous acc (Cout, Cin // groups, kh, kw); x (B, Cin, H, W) and g (B, Cout, Ho, Wo) of one
    dtype among float32 / bfloat16 / float16, any strides; stride, padding, dilation 2-tuples, zero
    padding). fp32 inputs are multiplied exactly (no TF32), bf16 / fp16 with fp32 accumulation;
    deterministic. B == 0, an empty acc or no output position: nothing is launched."""
    cout, cin_g, kh, kw = acc.shape
    config = tile_config(cout // max(1, groups), cin_g * kh * kw, g.shape[2] * g.shape[3], half=x.dtype != torch.float32)
    tiles = groups * _cdiv(cout // max(1, groups), config.block_o) * _cdiv(cin_g * kh * kw, config.block_i)
    splits = _num_splits(x.shape[0], tiles, acc.numel(), acc.device) if x.shape[0] and acc.numel() else 1
    _launch(acc, x, g, stride, padding, dilation, groups, splits=splits)
