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

from .triton_support import tl_dtype
from ._triton_common import block_entries, ieee_div, ieee_sqrt, load_grad, to_param_dtype
from .adamw import AdamWScalars
from . import multi_tensor
from .multi_tensor import BlockTable


@triton.jit
def _masked_adamw_kernel(
    block_tensor_ptr, block_start_ptr, seg_end_ptr, block_base,
    param_addr_ptr, grad_addr_ptr, mem_index_ptr,
    grad_flat_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr,
    decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
    step_ptr, lr_ptr, lr, weight_decay, log_beta1, log_beta2,
    BLOCK: tl.constexpr, PARAM_DT: tl.constexpr, STATE_DT: tl.constexpr,
    GRAD_FLAT: tl.constexpr, HAS_MASTER: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, CAPTURABLE: tl.constexpr, LR_PTR: tl.constexpr,
):
    t, e, m = block_entries(block_tensor_ptr, block_start_ptr, seg_end_ptr, block_base, BLOCK)
    if CAPTURABLE:
        # step count (and lr) read on the device, so that a captured CUDA graph replays correctly;
        # beta**step = exp(step * log(beta)) in fp32, as torch's capturable AdamW computes it on the device
        step = tl.load(step_ptr).to(tl.float32)
        if LR_PTR:
            lr_v = tl.load(lr_ptr).to(tl.float32)
        else:
            lr_v = lr
        decay = 1.0 - lr_v * weight_decay
        neg_step_size = -lr_v / (1.0 - tl.exp(step * log_beta1))
        bias_correction2_sqrt = tl.sqrt_rn(1.0 - tl.exp(step * log_beta2))
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
    capturable: tuple | None = None,
    weight_decay: float = 0.0,
) -> None:
    """Launch the fused step over blocks [lo, hi) of ``table``. Flat buffers are whole-group.
    ``capturable``: (step tensor, lr tensor or None, lr, log(beta1), log(beta2)) to read the step
    count (and the lr tensor) on the device instead of the host scalars in ``s``."""
    launch = PreparedAdamW(table, blocks, param_addr, grad_addr, mem_indices, grad_flat, exp_avg, exp_avg_sq,
                           max_exp_avg_sq, master, param_dtype=param_dtype, maximize=maximize,
                           capturable=capturable is not None, lr_tensor=capturable[1] if capturable else None,
                           step_tensor=capturable[0] if capturable else None,
                           log_betas=capturable[3:5] if capturable else (0.0, 0.0),
                           weight_decay=weight_decay, has_weight_decay=s.has_weight_decay)
    launch(s.decay, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.step_size, s.bias_correction2_sqrt, s.eps,
           capturable[2] if capturable else 0.0)


class PreparedAdamW:
    """One run's launch with everything that does not change between steps bound once: the tables,
    buffers, constexprs and grid. A call passes only the per-step scalars, so the steady-state step
    does no per-call argument assembly (the host cost of a step is what a GPU step waits on)."""

    __slots__ = ("grid", "args", "meta", "empty")
    # positions of the per-step scalars in `args`
    _SCALARS = slice(12, 19)  # decay, one_minus_beta1, beta2, one_minus_beta2, -step_size, bc2_sqrt, eps
    _LR = 21

    def __init__(self, table: BlockTable, blocks: tuple[int, int], param_addr: Tensor, grad_addr: Tensor | None,
                 mem_indices: Tensor, grad_flat: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor,
                 max_exp_avg_sq: Tensor | None, master: Tensor | None, *, param_dtype, maximize: bool,
                 capturable: bool, lr_tensor: Tensor | None, step_tensor: Tensor | None, log_betas: tuple,
                 weight_decay: float, has_weight_decay: bool):
        lo, hi = blocks
        self.empty = hi <= lo
        self.grid = (hi - lo,)
        dummy = exp_avg
        self.args = [
            table.block_tensor, table.block_start, table.seg_end, lo,
            param_addr, grad_addr if grad_addr is not None else param_addr, mem_indices,
            grad_flat if grad_flat is not None else dummy, exp_avg, exp_avg_sq,
            max_exp_avg_sq if max_exp_avg_sq is not None else dummy,
            master if master is not None else dummy,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,  # the per-step scalars (_SCALARS)
            step_tensor if step_tensor is not None else dummy, lr_tensor if lr_tensor is not None else dummy,
            0.0, weight_decay, float(log_betas[0]), float(log_betas[1]),  # lr (_LR), ..., log(beta1), log(beta2)
        ]
        self.meta = dict(
            BLOCK=table.block, PARAM_DT=tl_dtype(param_dtype), STATE_DT=tl_dtype(exp_avg.dtype),
            GRAD_FLAT=grad_flat is not None, HAS_MASTER=master is not None, WEIGHT_DECAY=has_weight_decay,
            AMSGRAD=max_exp_avg_sq is not None, MAXIMIZE=maximize,
            CAPTURABLE=capturable, LR_PTR=lr_tensor is not None,
            num_warps=8,  # 4 warps spill registers on sm_90 for fp16 AdamW (scripts/triton_aot_gate.py)
        )

    def __call__(self, decay: float, one_minus_beta1: float, beta2: float, one_minus_beta2: float, step_size: float,
                 bias_correction2_sqrt: float, eps: float, lr: float) -> None:
        if self.empty:
            return
        args = self.args
        args[self._SCALARS] = (decay, one_minus_beta1, beta2, one_minus_beta2, -step_size, bias_correction2_sqrt, eps)
        args[self._LR] = lr
        multi_tensor.launch(_masked_adamw_kernel, self.grid, *args, **self.meta)
