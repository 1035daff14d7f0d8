"""MaskedSGD: torch.optim.SGD (momentum, dampening, Nesterov, weight decay) on the masked entries
only, with a momentum buffer of size k."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

from ..mask.fishmask import FishMask
from ..ops.masked_step import masked_sgd_step_eager
from ._masked import MaskedOptimizer, Run


class MaskedSGD(MaskedOptimizer):
    """SGD that trains only the entries selected by a fixed sparse mask.

    Equivalent to ``torch.optim.SGD`` run on a model whose only parameters are the selected entries:
    weight decay and momentum act on those entries alone, every other entry stays bit-identical.
    The momentum buffer holds k_i fp32 entries per parameter (none when momentum is 0).

    Args: as ``MaskedAdamW`` for ``params``, ``mask_indices``, ``free_dense_grads``, ``sparse_backward``,
    ``master_weights``, ``implementation`` and ``capturable`` (a tensor ``lr`` read on the device;
    capture after the first step, which initialises the momentum buffer); ``lr``, ``momentum``, ``dampening``,
    ``weight_decay``, ``nesterov``, ``maximize`` as ``torch.optim.SGD`` (same defaults).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        mask_indices: Sequence[Tensor] | FishMask | None = None,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        free_dense_grads: bool = False,
        master_weights: bool = False,
        implementation: str = "auto",
        capturable: bool = False,
        sparse_backward: bool | str = "auto",
    ):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("a tensor lr must have one element")
        if float(lr) < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize
        )
        super().__init__(
            params,
            mask_indices,
            defaults,
            free_dense_grads=free_dense_grads,
            master_weights=master_weights,
            implementation=implementation,
            capturable=capturable,
            sparse_backward=sparse_backward,
        )

    def _state_buffer_names(self, group: dict[str, Any]) -> list[str]:
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _run_key(self, rt, i: int) -> bool:
        # torch.optim.SGD clones the gradient into a momentum buffer that does not exist yet, at
        # whatever step momentum first applies; afterwards it decays and adds
        return rt.started[i]

    def _call_op(self, gi: int, group: dict[str, Any], run: Run, has_master: bool, grads_in_flat: bool,
                 impl: str, bumped: bool = False) -> None:
        rt = self._runtime[gi]
        lr, lr_t = self._lr_of(group, self._layouts[gi])
        masked_sgd_step_eager(
            self._layouts[gi].device, rt.table.handle, run.first, run.last, self._grad_arg(gi, grads_in_flat, impl),
            grads_in_flat,
            rt.buffers["master"] if has_master else None, rt.work,
            rt.buffers["momentum_buffer"] if group["momentum"] != 0 else None,
            lr, lr_t, float(group["momentum"]), float(group["dampening"]), float(group["weight_decay"]),
            bool(group["nesterov"]), bool(group["maximize"]), not run.key, impl, bumped=bumped,
        )
