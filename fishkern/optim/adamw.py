"""MaskedAdamW: torch.optim.AdamW on the masked entries only, with state of size k."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

from ..mask.fishmask import FishMask
from ..ops.masked_step import masked_adamw_step_eager, prepare_masked_adamw_step
from ._masked import MaskedOptimizer, Run


class MaskedAdamW(MaskedOptimizer):
    """AdamW that trains only the entries selected by a fixed sparse mask.

    Equivalent to ``torch.optim.AdamW`` run on a model whose only parameters are the selected
    entries (same bias correction, eps placement and decoupled weight decay); every unselected
    entry stays bit-identical for the whole run, also with weight decay, amsgrad and maximize.
    ``exp_avg`` / ``exp_avg_sq`` (and ``max_exp_avg_sq``) hold k_i entries per parameter, in fp32
    (fp64 for fp64 parameters): 8·k bytes of state instead of 8·|θ|, allocated by the first step.
    With the indices and the gathered-gradient and scratch buffers the optimizer holds 24·k bytes
    in all on the PyTorch path (``memory_footprint()`` gives the parts).

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer. A param group
            may carry its own ``"mask_indices"`` (one tensor per parameter of the group). Or the
            model itself (an ``nn.Module``): its ``named_parameters()``, and sparse backward on.
        mask_indices: one 1-D integer tensor of flat (row-major) indices per parameter, aligned with
            all parameters in order (across groups). Unsorted indices are sorted; duplicates,
            negative or out-of-range indices are refused. An empty tensor freezes its parameter.
            Or a ``FishMask``, with ``params`` given by name (``model.named_parameters()``).
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW`` (same defaults).
        free_dense_grads: gather each parameter's k gradient entries in a post-accumulate-grad hook
            and free its dense ``.grad`` at once (peak dense-gradient memory: one parameter). Parameters
            with no selected entry get ``requires_grad=False``. ``.grad`` then holds a
            ``fishkern.optim.MaskedGrad``: the parameter's shape and dtype, stored as its k entries
            only, so ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` and
            ``GradScaler.unscale_`` work on exactly what ``step()`` reads. Gradients accumulate over
            several backward passes (in the k entries) until ``step()`` consumes them (``.grad`` is
            then ``None``); a ``.grad`` set to ``None`` or replaced before ``step()`` is respected, as
            in torch. FSDP2-sharded parameters get ``.grad = None`` (use ``clip_grad_norm_`` of the
            optimizer there). ``remove_grad_hooks()`` undoes it.
        master_weights: keep fp32 master copies of the k selected entries of bf16/fp16 parameters
            (the update is applied to the master, the parameter receives its rounded value).
        implementation: ``"auto"`` (fused Triton kernel for CUDA tensors, vectorised PyTorch
            otherwise), ``"torch"``, or ``"triton"``. float64 groups always use the PyTorch path.
        capturable: read the step count (one per param group, kept on the parameters' device, as
            ``state["step"]``) and a tensor ``lr`` on the device, so that ``step()`` reads nothing on
            the host and can be captured in a CUDA graph (``torch.cuda.graph``), as torch's
            ``capturable=True`` optimizers. Every trained parameter must then have a gradient at every
            step. For a graph: warm up a few steps eagerly (buffers, tables and kernels are made
            then), capture ``step()``, and keep the gradients where the graph reads them: either
            ``free_dense_grads=True`` (the hooks gather into a fixed buffer) with
            ``zero_grad(set_to_none=True)`` between replays, or dense gradients kept in place with
            ``zero_grad(set_to_none=False)``. A changed parameter address (``p.data = ...``) needs a new
            capture. Bias corrections are then computed in fp32 on the device (to rounding of the
            host-scalar step).
        sparse_backward: ``"auto"`` (default): when ``params`` is the model, its Linear / Conv1D /
            Embedding layers compute their weight gradients at the masked entries only
            (``fishkern.optim.sparse_backward``; no dense weight gradient, implies
            ``free_dense_grads=True``), except under DistributedDataParallel; with plain parameters
            nothing changes (``enable_sparse_backward(model)`` turns it on later). ``True``: the
            same, refusing what cannot work; needs the model. ``False``: torch's dense backward.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        mask_indices: Sequence[Tensor] | FishMask | None = None,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        free_dense_grads: bool = False,
        master_weights: bool = False,
        implementation: str = "auto",
        capturable: bool = False,
        sparse_backward: bool | str = "auto",
    ):
        _check_hyper(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
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
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])

    def _call_op(self, gi: int, group: dict[str, Any], run: Run, has_master: bool, grads_in_flat: bool,
                 impl: str, bumped: bool = False) -> None:
        rt = self._runtime[gi]
        bufs = rt.buffers
        beta1, beta2 = group["betas"]
        lr, lr_t = self._lr_of(group, self._layouts[gi])
        masked_adamw_step_eager(
            self._layouts[gi].device, rt.table.handle, run.first, run.last, self._grad_arg(gi, grads_in_flat, impl),
            grads_in_flat,
            bufs["master"] if has_master else None, rt.work,
            bufs["exp_avg"], bufs["exp_avg_sq"], bufs["max_exp_avg_sq"] if group["amsgrad"] else None,
            run.step, self._step_arg(gi), lr, lr_t, float(beta1), float(beta2), float(group["eps"]),
            float(group["weight_decay"]), bool(group["maximize"]), impl, bumped=bumped,
        )

    def _prepared_key(self, group: dict[str, Any]) -> tuple:
        beta1, beta2 = group["betas"]
        return (float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]), bool(group["maximize"]),
                bool(group["amsgrad"]))

    def _prepare_op(self, gi: int, group: dict[str, Any], first: int, last: int, has_master: bool,
                    grad: Tensor | None, grads_in_flat: bool, impl: str, lr_t: Tensor | None):
        rt, lay = self._runtime[gi], self._layouts[gi]
        bufs = rt.buffers
        beta1, beta2, eps, weight_decay, maximize, amsgrad = self._prepared_key(group)
        return prepare_masked_adamw_step(
            lay.device, rt.table.handle, first, last, grad, grads_in_flat, bufs["master"] if has_master else None,
            bufs["exp_avg"], bufs["exp_avg_sq"], bufs["max_exp_avg_sq"] if amsgrad else None, self._step_arg(gi), lr_t,
            beta1, beta2, eps, weight_decay, maximize, impl,
        )


def _check_hyper(*, lr, betas, eps, weight_decay) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("a tensor lr must have one element")
    if not 0.0 <= float(lr):
        raise ValueError(f"invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"invalid epsilon value: {eps}")
    if len(betas) != 2 or not (0.0 <= float(betas[0]) < 1.0 and 0.0 <= float(betas[1]) < 1.0):
        raise ValueError(f"invalid betas {betas}: each must lie in [0, 1)")
    if not 0.0 <= weight_decay:
        raise ValueError(f"invalid weight_decay value: {weight_decay}")
