"""MaskedSGD: torch.optim.SGD (momentum, dampening, Nesterov, weight decay) on the masked entries
only, with a momentum buffer of size k."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

from ..mask.fishmask import FishMask
from ..ops.sgd import sgd_update_
from ._masked import MaskedOptimizer, Run


class MaskedSGD(MaskedOptimizer):
    """SGD that trains only the entries selected by a fixed sparse mask.

    Equivalent to ``torch.optim.SGD`` run on a model whose only parameters are the selected entries:
    weight decay and momentum act on those entries alone, every other entry stays bit-identical.
    The momentum buffer holds k_i fp32 entries per parameter (none when momentum is 0).

    Args: as ``MaskedAdamW`` for ``params``, ``mask_indices``, ``free_dense_grads``,
    ``master_weights`` and ``implementation``; ``lr``, ``momentum``, ``dampening``,
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
        )

    def _state_buffer_names(self, group: dict[str, Any]) -> list[str]:
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _run_key(self, rt, i: int) -> bool:
        # torch.optim.SGD clones the gradient into a momentum buffer that does not exist yet, at
        # whatever step momentum first applies; afterwards it decays and adds
        return rt.started[i]

    def _update_run_torch(self, gi: int, group: dict[str, Any], run: Run, has_master: bool) -> None:
        bufs = self._runtime[gi].buffers
        grad, values = self._gather_run(gi, run, has_master)
        sl = slice(run.start, run.end)
        sgd_update_(
            values,
            grad,
            bufs["momentum_buffer"][sl] if group["momentum"] != 0 else None,
            lr=float(group["lr"]),
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            first_step=not run.key,
        )
        self._scatter_run(gi, run, has_master)

    def _update_run_triton(self, gi: int, group: dict[str, Any], run: Run, has_master: bool) -> None:
        from ..ops.sgd_triton import masked_sgd_triton

        lay, bufs = self._layouts[gi], self._runtime[gi].buffers
        grad_flat = self._run_grads_for_triton(gi, run)
        table, param_addr, grad_addr = self._triton_tables(gi, run, grad_flat is not None)
        masked_sgd_triton(
            table,
            table.blocks_of(run.first, run.last),
            param_addr,
            grad_addr,
            lay.flat_mem_indices,
            grad_flat,
            bufs.get("momentum_buffer") if group["momentum"] != 0 else None,
            bufs["master"] if has_master else None,
            lr=float(group["lr"]),
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            first_step=not run.key,
            param_dtype=run.dtype,
            state_dtype=lay.state_dtype,
        )
