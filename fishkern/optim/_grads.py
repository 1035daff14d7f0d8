"""Gradient handling of the masked optimizers: gathering each parameter's k gradient entries
(in post-accumulate-grad hooks with ``free_dense_grads``, or at step time), the ``MaskedGrad``
proxies that then stand in for ``.grad``, and ``zero_grad``."""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from . import ddp_support as _ddp
from ._grad_proxy import MaskedGrad
from ._layout import GroupLayout, flat_memory_view


class GradientsMixin:
    """Part of ``MaskedOptimizer``: everything about ``.grad``."""

    # ------------------------------------------------------------------ gradients
    def _gather_grad(self, layout: GroupLayout, i: int, grad: Tensor, out: Tensor, accumulate: bool) -> None:
        """Copy (or add) tensor i's masked gradient entries into ``out``."""
        p = layout.params[i]
        if grad.is_sparse:
            raise RuntimeError(
                f"parameter {i} (shape {tuple(p.shape)}) has a sparse gradient; masked optimizers need dense "
                "gradients (use sparse=False in nn.Embedding)"
            )
        if grad.shape != p.shape:
            raise RuntimeError(f"gradient of shape {tuple(grad.shape)} for a parameter of shape {tuple(p.shape)}")
        if isinstance(grad, MaskedGrad) and getattr(grad, "_k_partial", False) and grad._k_rows is not layout.indices[i]:
            if not torch.equal(grad._k_rows, layout.indices[i]):
                raise RuntimeError(
                    f"parameter {i} (shape {tuple(p.shape)}): its gradient was computed by sparse backward at the entries "
                    "of another optimizer's mask, so the entries of this optimizer's mask are unknown; one layer can feed "
                    "one masked optimizer (disable_sparse_backward() on the other one)"
                )
            grad = grad._alike(grad._k_values)
            grad._k_rows = layout.indices[i]
        if isinstance(grad, MaskedGrad) and grad._k_rows is layout.indices[i]:
            # sparse backward's gradient: the k values already, in the optimizer's entry order
            if accumulate:
                out.add_(grad._k_values)
            else:
                out.copy_(grad._k_values)
            return
        if grad.stride() == p.stride():  # same shape and strides as the dense parameter: dense too
            src, idx = flat_memory_view(grad), layout.mem_indices[i]
        else:
            src, idx = grad.reshape(-1), layout.indices[i]
        if accumulate:
            out.add_(src.index_select(0, idx))
        elif src.dtype == out.dtype:
            torch.index_select(src, 0, idx, out=out)
        else:
            out.copy_(src.index_select(0, idx))

    def _grad_buffer(self, gi: int) -> Tensor:
        rt, lay = self._runtime[gi], self._layouts[gi]
        if rt.grad is None:
            rt.grad = torch.zeros(lay.total, dtype=lay.state_dtype, device=lay.device)
        return rt.grad

    def _register_grad_hooks(self, gi: int) -> None:
        lay = self._layouts[gi]
        reduced_by_ddp = None  # ids of parameters a live DDP module reduces, looked up once if needed
        for i, p in enumerate(lay.owners):
            # global k: a rank whose shard holds none of a parameter's entries must still treat it as
            # trained, or the ranks would disagree on which gradients FSDP reduces
            if lay.global_k[i] == 0:
                # Nothing of it is trained: autograd need not compute its gradient at all.
                if p.requires_grad:
                    if reduced_by_ddp is None:
                        reduced_by_ddp = _ddp.ddp_managed() if _ddp.distributed_initialized() else set()
                    if id(p) in reduced_by_ddp:
                        raise ValueError(
                            f"param group {gi}, parameter {i} (shape {tuple(p.shape)}) has no masked entry and "
                            "free_dense_grads=True would freeze it, but a DistributedDataParallel module already "
                            "reduces it (DDP would then wait for its gradient forever). Build the optimizer before "
                            "wrapping the model in DDP, or wrap with fishkern.distributed.masked_ddp(model, mask), "
                            "which freezes such parameters first"
                        )
                    p.requires_grad_(False)
                    self._frozen_by_us.append(p)
                continue
            if not p.requires_grad:
                continue  # gets no gradient; if it is unfrozen later, its .grad is gathered at step()
            self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(gi, i)))
        if self._hooks and self._hook_finalizer is None:
            # the hooks go with the optimizer (the parameters it froze stay frozen)
            self._hook_finalizer = weakref.finalize(self, _remove_handles, self._hooks)

    def _make_hook(self, gi: int, i: int):
        sharded = self._layouts[gi].shards[i] is not None
        # A weak reference: a hook holding the optimizer would make parameter -> hook -> optimizer ->
        # parameter a cycle that the garbage collector cannot free (tensor hooks are not traversed),
        # so a dropped optimizer would keep its whole model alive.
        owner = weakref.ref(self)

        def hook(p: Tensor) -> None:
            opt = owner()
            # Under DDP the gradient is reduced only after this hook: leave .grad to DDP, step()
            # gathers it then (see optim/ddp_support.py).
            if opt is not None and _ddp.gather_in_backward(p, sharded):
                opt._gather_and_free(gi, i)

        return hook

    def _gather_and_free(self, gi: int, i: int) -> None:
        lay, rt = self._layouts[gi], self._runtime[gi]
        grad = self._grad_of(lay, i)
        if grad is None:
            return
        proxy = rt.proxies[i]
        if proxy is not None and grad is proxy:
            return  # autograd added this backward's gradient into the proxy (MaskedGrad's add_)
        # A dense .grad where a proxy was holds the whole gradient (autograd summed the proxy in,
        # or the user dropped or replaced it): gather it afresh. Sharded tensors have no proxy and
        # accumulate in the buffer.
        accumulate = rt.grad_ready[i] and proxy is None
        out = self._grad_buffer(gi)[lay.slice(i)]
        with torch.no_grad():
            self._gather_grad(lay, i, grad, out, accumulate=accumulate)
        rt.grad_ready[i] = True
        partial = getattr(grad, "_k_partial", False)
        self._free_dense(gi, i)
        if rt.proxies[i] is not None:
            # from sparse backward: the entries outside the mask were never computed (another optimizer
            # over another mask must not read them as zeros)
            rt.proxies[i]._k_partial = partial

    def _free_dense(self, gi: int, i: int) -> None:
        """Replace tensor i's dense .grad (gathered into the buffer) by a MaskedGrad over its k
        entries there, so torch.nn.utils.clip_grad_norm_ & co. still see (and scale) the gradient.
        Sharded (DTensor) parameters get None: their .grad must be a DTensor."""
        lay, rt = self._layouts[gi], self._runtime[gi]
        owner = lay.owners[i]
        if lay.shards[i] is not None:
            owner.grad = None
            rt.proxies[i] = None
            return
        proxy = rt.proxy_cache[i]
        if proxy is None:
            # one proxy per tensor for the optimizer's life, registered with the group's table: the
            # step's native check then tells in one call whether every .grad is still its proxy
            proxy = MaskedGrad(self._grad_buffer(gi)[lay.slice(i)], lay.indices[i], lay.mem_indices[i], lay.params[i])
            rt.proxy_cache[i] = proxy
            rt.table.set_proxies([i], [proxy])
        owner.grad = proxy
        rt.proxies[i] = proxy

    def _sync_proxies(self, gi: int | None = None) -> None:
        """A tensor whose .grad is no longer the proxy it was given has had its gradient dropped
        (model.zero_grad(), p.grad = None) or replaced (p.grad = g): .grad is the truth, as in torch.
        (Of group ``gi`` only, or of all groups.)"""
        groups = range(len(self._layouts)) if gi is None else [gi]
        for lay, rt in ((self._layouts[g], self._runtime[g]) for g in groups):
            for i, proxy in enumerate(rt.proxies):
                if proxy is not None and lay.owners[i].grad is not proxy:
                    rt.proxies[i] = None
                    rt.grad_ready[i] = False

    def _drop_proxies(self, rt, lay: GroupLayout, positions) -> None:
        """The gathered gradients of these tensors are consumed: their proxies leave .grad."""
        for i in positions:
            proxy = rt.proxies[i]
            if proxy is not None:
                if lay.owners[i].grad is proxy:
                    lay.owners[i].grad = None
                rt.proxies[i] = None

    def remove_grad_hooks(self) -> None:
        """Undo ``free_dense_grads``: remove the hooks and give back requires_grad to the
        parameters the optimizer froze. Gradients are then gathered at step time. Call it between
        steps, not while gradients gathered by the hooks wait for ``step()``."""
        self._sync_proxies()
        if any(any(rt.grad_ready) for rt in self._runtime):
            raise RuntimeError(
                "remove_grad_hooks() was called while gradients gathered by the hooks wait for step(); "
                "call it after step() or zero_grad()"
            )
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p in self._frozen_by_us:
            p.requires_grad_(True)
        self._frozen_by_us.clear()
        self.free_dense_grads = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        # torch's zero_grad sets the proxies to None, or zeroes them (MaskedGrad.zero_: their entries)
        super().zero_grad(set_to_none=set_to_none)
        for rt in self._runtime:
            if set_to_none:
                rt.grad_ready = [False] * len(rt.grad_ready)
                rt.proxies = [None] * len(rt.proxies)
            elif rt.grad is not None:
                rt.grad.zero_()


def _remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


