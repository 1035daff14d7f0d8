"""The AdamW update on flat buffers of masked entries.

``adamw_update_`` is the pure-PyTorch path (CPU, and any device without Triton). It performs the
same tensor operations, in the same order and with the same Python-double scalars, as
``torch.optim.AdamW``'s single-tensor implementation (torch/optim/adam.py, ``_single_tensor_adam``
with decoupled weight decay), so on fp32 data it is bit-identical to AdamW run on a model whose
only parameters are the selected entries.

``adamw_scalars`` computes those scalars once per step; the Triton kernel
(``fishkern.ops.adamw_triton``) receives the same values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AdamWScalars:
    decay: float  # 1 - lr * weight_decay (decoupled weight decay factor)
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    step_size: float  # lr / (1 - beta1**step)
    bias_correction2_sqrt: float  # sqrt(1 - beta2**step)
    eps: float
    has_weight_decay: bool


def adamw_scalars(*, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> AdamWScalars:
    decay, step_size, bias_correction2_sqrt = adamw_step_scalars(lr, beta1, beta2, weight_decay, step)
    return AdamWScalars(
        decay=decay,
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        step_size=step_size,
        bias_correction2_sqrt=bias_correction2_sqrt,
        eps=eps,
        has_weight_decay=weight_decay != 0,
    )


def adamw_step_scalars(lr: float, beta1: float, beta2: float, weight_decay: float, step: int) -> tuple[float, float, float]:
    """The scalars that change with the step or the lr: (decay, step_size, sqrt(bias_correction2))."""
    return 1 - lr * weight_decay, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


def adamw_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    s: AdamWScalars,
    *,
    maximize: bool,
) -> None:
    """One AdamW step, in place, on 1-D buffers of equal length (all in the state dtype)."""
    if maximize:
        grad = torch.neg(grad)
    if s.has_weight_decay:
        param.mul_(s.decay)
    exp_avg.lerp_(grad, s.one_minus_beta1)
    exp_avg_sq.mul_(s.beta2).addcmul_(grad, grad, value=s.one_minus_beta2)
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = (max_exp_avg_sq.sqrt() / s.bias_correction2_sqrt).add_(s.eps)
    else:
        denom = (exp_avg_sq.sqrt() / s.bias_correction2_sqrt).add_(s.eps)
    param.addcdiv_(exp_avg, denom, value=-s.step_size)


def adamw_update_capturable_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    *,
    step_t: Tensor,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One AdamW step with the step count (and possibly lr) as device tensors: nothing is read on
    the host. The ops of torch.optim.AdamW's single-tensor ``capturable=True`` branch."""
    if maximize:
        grad = torch.neg(grad)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - torch.pow(beta1, step_t)
    bias_correction2 = 1 - torch.pow(beta2, step_t)
    step_size_neg = (lr / bias_correction1).neg()
    bias_correction2_sqrt = bias_correction2.sqrt()
    v = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    denom = (v.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(eps / step_size_neg)
    param.addcdiv_(exp_avg, denom)
