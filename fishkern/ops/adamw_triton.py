"""Fused masked AdamW step in Triton: one launch updates the k masked entries of every tensor in
a run (gather grad, update exp_avg / exp_avg_sq / max, update the parameter or its fp32 master, write
the parameter back), reading each tensor's address from a table.

The arithmetic follows ``fishkern.ops.adamw.adamw_update_`` (itself torch.optim.AdamW's order), with
IEEE-rounded sqrt and division so results match the PyTorch path to rounding.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._triton import tl_dtype
from ._triton_common import block_entries, ieee_div, ieee_sqrt, load_grad, to_param_dtype
from .adamw import AdamWScalars
from .multi_tensor import BlockTable


@triton.jit
def _masked_adamw_kernel(
    block_tensor_ptr, block_start_ptr, seg_end_ptr, block_base,
    param_addr_ptr, grad_addr_ptr, mem_index_ptr,
    grad_flat_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr,
    decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
    BLOCK: tl.constexpr, PARAM_DT: tl.constexpr, STATE_DT: tl.constexpr,
    GRAD_FLAT: tl.constexpr, HAS_MASTER: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
):
    t, e, m = block_entries(block_tensor_ptr, block_start_ptr, seg_end_ptr, block_base, BLOCK)
    mem_idx = tl.load(mem_index_ptr + e, mask=m, other=0).to(tl.int64)
    p_ptr = tl.load(param_addr_ptr + t).to(tl.pointer_type(PARAM_DT))

    g = load_grad(grad_flat_ptr, grad_addr_ptr, t, e, mem_idx, m, PARAM_DT, GRAD_FLAT, STATE_DT)
    if MAXIMIZE:
        g = -g
    if HAS_MASTER:
        p = tl.load(master_ptr + e, mask=m, other=0.0)
    else:
        p = tl.load(p_ptr + mem_idx, mask=m, other=0.0).to(STATE_DT)
    if WEIGHT_DECAY:
        p = p * decay

    exp_avg = tl.load(exp_avg_ptr + e, mask=m, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + e, mask=m, other=0.0)
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)  # lerp with weight < 0.5, as torch
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * (g * g)
    tl.store(exp_avg_ptr + e, exp_avg, mask=m)
    tl.store(exp_avg_sq_ptr + e, exp_avg_sq, mask=m)
    if AMSGRAD:
        v = tl.maximum(tl.load(max_exp_avg_sq_ptr + e, mask=m, other=0.0), exp_avg_sq)
        tl.store(max_exp_avg_sq_ptr + e, v, mask=m)
    else:
        v = exp_avg_sq
    denom = ieee_div(ieee_sqrt(v), bias_correction2_sqrt) + eps
    p = p + neg_step_size * ieee_div(exp_avg, denom)

    if HAS_MASTER:
        tl.store(master_ptr + e, p, mask=m)
    tl.store(p_ptr + mem_idx, to_param_dtype(p, PARAM_DT), mask=m)


def masked_adamw_triton(
    table: BlockTable,
    blocks: tuple[int, int],
    param_addr: Tensor,
    grad_addr: Tensor | None,
    mem_indices: Tensor,
    grad_flat: Tensor | None,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    master: Tensor | None,
    s: AdamWScalars,
    *,
    param_dtype,
    maximize: bool,
) -> None:
    """Launch the fused step over blocks [lo, hi) of ``table``. Flat buffers are whole-group."""
    lo, hi = blocks
    if hi <= lo:
        return
    dummy = exp_avg
    _masked_adamw_kernel[(hi - lo,)](
        table.block_tensor, table.block_start, table.seg_end, lo,
        param_addr, grad_addr if grad_addr is not None else param_addr, mem_indices,
        grad_flat if grad_flat is not None else dummy, exp_avg, exp_avg_sq,
        max_exp_avg_sq if max_exp_avg_sq is not None else dummy,
        master if master is not None else dummy,
        s.decay, s.one_minus_beta1, s.beta2, s.one_minus_beta2, -s.step_size, s.bias_correction2_sqrt, s.eps,
        BLOCK=table.block, PARAM_DT=tl_dtype(param_dtype), STATE_DT=tl_dtype(exp_avg.dtype),
        GRAD_FLAT=grad_flat is not None, HAS_MASTER=master is not None, WEIGHT_DECAY=s.has_weight_decay,
        AMSGRAD=max_exp_avg_sq is not None, MAXIMIZE=maximize,
        num_warps=8,  # 4 warps spill registers on sm_90 for fp16 AdamW (scripts/triton_aot_gate.py)
    )
