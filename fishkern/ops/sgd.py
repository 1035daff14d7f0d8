"""The SGD update (momentum, dampening, Nesterov, weight decay) on flat buffers of masked entries.

``sgd_update_`` mirrors ``torch.optim.SGD``'s single-tensor implementation (torch/optim/sgd.py,
``_single_tensor_sgd``) operation for operation, so on fp32 data it is bit-identical to SGD run on
a model whose only parameters are the selected entries. Weight decay and momentum therefore touch
the masked entries only (the original FISH CIFAR code let them move every weight).
"""
from __future__ import annotations

import torch
from torch import Tensor


def sgd_update_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    first_step: bool,
) -> None:
    """One SGD step, in place. ``first_step`` initialises the momentum buffer with the gradient."""
    if maximize:
        grad = torch.neg(grad)
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum != 0:
        assert momentum_buffer is not None
        if first_step:
            momentum_buffer.copy_(grad)
        else:
            momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        if nesterov:
            grad = grad.add(momentum_buffer, alpha=momentum)
        else:
            grad = momentum_buffer
    if isinstance(lr, Tensor):  # a device lr (capturable): no host read
        param.addcmul_(grad, lr, value=-1)
    else:
        param.add_(grad, alpha=-lr)
