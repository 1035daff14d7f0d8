"""Fused masked SGD step (momentum, dampening, Nesterov, weight decay) in Triton: one launch per
run of tensors, following ``fishkern.ops.sgd.sgd_update_`` (torch.optim.SGD's order)."""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .triton_support import tl_dtype
from ._triton_common import block_entries, load_grad, to_param_dtype
from . import multi_tensor
from .multi_tensor import BlockTable


@triton.jit
def _masked_sgd_kernel(
    block_tensor_ptr, block_start_ptr, seg_end_ptr, block_base,
    param_addr_ptr, grad_addr_ptr, mem_index_ptr,
    grad_flat_ptr, momentum_buffer_ptr, master_ptr,
    neg_lr, lr_ptr, momentum, one_minus_dampening, weight_decay,
    BLOCK: tl.constexpr, PARAM_DT: tl.constexpr, STATE_DT: tl.constexpr,
    GRAD_FLAT: tl.constexpr, HAS_MASTER: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
    MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    LR_PTR: tl.constexpr,
):
    t, e, m = block_entries(block_tensor_ptr, block_start_ptr, seg_end_ptr, block_base, BLOCK)
    if LR_PTR:  # the lr tensor is read on the device (capturable: no host read of it)
        neg_lr = -tl.load(lr_ptr).to(tl.float32)
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
        g = g + weight_decay * p
    if MOMENTUM:
        if FIRST_STEP:
            buf = g
        else:
            buf = tl.load(momentum_buffer_ptr + e, mask=m, other=0.0) * momentum + one_minus_dampening * g
        tl.store(momentum_buffer_ptr + e, buf, mask=m)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p + neg_lr * g

    if HAS_MASTER:
        tl.store(master_ptr + e, p, mask=m)
    tl.store(p_ptr + mem_idx, to_param_dtype(p, PARAM_DT), mask=m)


def masked_sgd_triton(
    table: BlockTable,
    blocks: tuple[int, int],
    param_addr: Tensor,
    grad_addr: Tensor | None,
    mem_indices: Tensor,
    grad_flat: Tensor | None,
    momentum_buffer: Tensor | None,
    master: Tensor | None,
    *,
    lr: float,
    lr_t: Tensor | None = None,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    first_step: bool,
    param_dtype,
    state_dtype,
) -> None:
    lo, hi = blocks
    if hi <= lo:
        return
    dummy = mem_indices if momentum_buffer is None else momentum_buffer
    multi_tensor.launch(_masked_sgd_kernel, (hi - lo,),
        table.block_tensor, table.block_start, table.seg_end, lo,
        param_addr, grad_addr if grad_addr is not None else param_addr, mem_indices,
        grad_flat if grad_flat is not None else dummy,
        momentum_buffer if momentum_buffer is not None else dummy,
        master if master is not None else dummy,
        -lr, lr_t if lr_t is not None else dummy, momentum, 1 - dampening, weight_decay,
        BLOCK=table.block, PARAM_DT=tl_dtype(param_dtype), STATE_DT=tl_dtype(state_dtype),
        GRAD_FLAT=grad_flat is not None, HAS_MASTER=master is not None, WEIGHT_DECAY=weight_decay != 0,
        MOMENTUM=momentum != 0, FIRST_STEP=first_step, NESTEROV=nesterov, MAXIMIZE=maximize,
        LR_PTR=lr_t is not None,
        num_warps=8,  # 4 warps spill registers on sm_90 for fp16 AdamW (scripts/triton_aot_gate.py)
    )
