"""Machinery shared by the masked optimizers: masks per param group, flat per-entry state,
gradient gathering (at step time or in post-accumulate-grad hooks), runs of tensors updated in one
vectorised op or one kernel launch, and a state_dict that knows its mask.

Subclasses name their per-entry state buffers and implement ``_update_run_torch`` and
``_update_run_triton``.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._native import native_available
from ..mask.fishmask import FishMask
from ..ops.masked_copy import gather_masked, scatter_masked_
from ..ops._triton import triton_interpreting, triton_status, triton_supported, triton_usable_on
from ..ops.multi_tensor import AddressTable, BlockTable, build_block_table
from . import _ddp
from ._grad_proxy import MaskedGrad
from ._layout import GroupLayout, build_group_layout, check_mask_indices, flat_memory_view
from ._sharded import is_dtensor, local_tensor, shard_info

STATE_DICT_FORMAT = 1
IMPLEMENTATIONS = ("auto", "torch", "triton")


@dataclass
class Run:
    """Consecutive tensors of a group (first..last, inclusive) stepped with the same scalars."""

    first: int
    last: int
    start: int  # flat slice [start, end) in the group's buffers
    end: int
    step: int
    dtype: torch.dtype
    key: Any = None  # optimizer-specific state that must be equal within a run (see _run_key)

    @property
    def positions(self) -> range:
        return range(self.first, self.last + 1)


class _GroupRuntime:
    """Mutable per-group state: step counts, flat buffers, gathered gradients, kernel tables."""

    def __init__(self, layout: GroupLayout):
        n = len(layout.params)
        self.steps = [0] * n
        # torch.optim convention: state['step'] is a float32 CPU scalar; ours are views of this.
        self.step_tensor = torch.zeros(n, dtype=torch.float32)
        self.buffers: dict[str, Tensor] = {}
        self.grad: Tensor | None = None  # gathered gradients, [K]
        self.grad_ready = [False] * n  # set by hooks: this tensor's gradient is in self.grad
        # the MaskedGrad each gathered tensor's .grad was set to (None: none, or a sharded tensor,
        # whose .grad stays None); a .grad that is no longer it was dropped or replaced by the user
        self.proxies: list[MaskedGrad | None] = [None] * n
        # whether a step has initialised this tensor's history buffers (SGD's momentum buffer
        # starts as a copy of the gradient, whenever momentum first applies to the tensor)
        self.started = [False] * n
        self.work: Tensor | None = None  # scratch for gathered parameter values, [K]
        self.block_table: BlockTable | None = None
        self.param_addr: AddressTable | None = None
        self.grad_addr: AddressTable | None = None
        self.strides = [p.stride() for p in layout.params]
        self.shapes = [p.shape for p in layout.params]
        self.dtypes = [p.dtype for p in layout.params]
        self.trainable_index: Tensor | None = None


class MaskedOptimizer(torch.optim.Optimizer):
    """Base class of MaskedAdamW / MaskedSGD. Not meant to be used directly."""

    #: per-entry state buffers; (name, whether present given the group's hyperparameters)
    _state_names: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        mask_indices: Sequence[Tensor] | None,
        defaults: dict[str, Any],
        *,
        free_dense_grads: bool,
        master_weights: bool,
        implementation: str,
    ):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        if implementation == "triton" and not triton_supported():
            raise RuntimeError(
                f"implementation='triton' was requested but {triton_status()}; install it (pip install -U triton, "
                "CUDA machines) or use implementation='auto' or 'torch' (the vectorised PyTorch path, any device)"
            )
        if isinstance(mask_indices, Tensor):
            mask_indices = [mask_indices]
        self._fishmask = mask_indices if isinstance(mask_indices, FishMask) else None
        self._pending_masks = None if mask_indices is None or self._fishmask is not None else list(mask_indices)
        self._layouts: list[GroupLayout] = []
        self._runtime: list[_GroupRuntime] = []
        self._hooks: list[Any] = []
        self._frozen_by_us: list[Tensor] = []
        self.free_dense_grads = bool(free_dense_grads)
        self.master_weights = bool(master_weights)
        self.implementation = implementation
        self._native: bool | None = None
        self._hook_finalizer = None
        try:
            super().__init__(params, defaults)
        except BaseException:
            self.remove_grad_hooks()  # a failed construction leaves no hooks or frozen parameters behind
            raise
        if self._pending_masks:
            self.remove_grad_hooks()
            raise ValueError(
                f"mask_indices has {len(self._pending_masks)} more tensors than there are parameters; "
                "it must hold exactly one index tensor per parameter, in order"
            )
        self._pending_masks = None

    # ------------------------------------------------------------------ groups and masks
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raw = param_group["params"]
        if isinstance(raw, set):
            raise TypeError(
                "optimizer parameters must be an ordered collection (a list), not a set: the masks are "
                "matched to parameters by position, and a set's order changes between runs"
            )
        raw = [raw] if isinstance(raw, Tensor) else list(raw)
        param_group["params"] = raw  # torch splits (name, tensor) pairs into params / param_names
        named = bool(raw) and isinstance(raw[0], tuple)
        params = [p[1] if isinstance(p, tuple) else p for p in raw]
        names = [p[0] for p in raw] if named else param_group.get("param_names")
        group_no = len(self.param_groups)
        masks = param_group.pop("mask_indices", None)
        fishmask = masks if isinstance(masks, FishMask) else (self._fishmask if masks is None else None)
        if fishmask is not None:
            if names is None:
                raise ValueError(
                    "a FishMask selects parameters by name: pass model.named_parameters() (or param groups of "
                    "(name, parameter) pairs) instead of model.parameters()"
                )
            masks = fishmask.indices_for(list(names), [tuple(p.shape) for p in params], [p.device for p in params])
        elif masks is not None:
            if self._pending_masks is not None:
                raise ValueError(
                    f"param group {group_no} carries its own 'mask_indices' and mask_indices was also passed "
                    "to the optimizer; give the masks one way only"
                )
            masks = [masks] if isinstance(masks, Tensor) else list(masks)
        else:
            if self._pending_masks is None:
                raise ValueError(
                    f"no mask for param group {group_no}: pass mask_indices=[...] (one flat index tensor per "
                    "parameter) or put 'mask_indices' in the param group"
                )
            if len(self._pending_masks) < len(params):
                raise ValueError(
                    f"mask_indices has fewer tensors than there are parameters (param group {group_no} needs "
                    f"{len(params)}, {len(self._pending_masks)} left); it must hold one index tensor per parameter"
                )
            masks, self._pending_masks = self._pending_masks[: len(params)], self._pending_masks[len(params) :]
        layout = self._build_layout(params, masks, group_no)
        self._check_implementation(layout, group_no)
        super().add_param_group(param_group)
        self._layouts.append(layout)
        self._runtime.append(_GroupRuntime(layout))
        if self.free_dense_grads:
            self._register_grad_hooks(len(self._layouts) - 1)

    @staticmethod
    def _build_layout(params: list, masks: list, group_no: int) -> GroupLayout:
        """The group's layout; sharded (DTensor) parameters are laid out over their local shard with
        the part of the (global) mask that falls in it."""
        shards = [None] * len(params)
        local, local_masks = list(params), list(masks)
        global_k = {}
        for j, p in enumerate(params):
            if j < len(masks) and is_dtensor(p):
                where = f"param group {group_no}, parameter {j} (shape {tuple(p.shape)})"
                shards[j] = shard_info(p, where)
                local[j] = local_tensor(p)
                checked = check_mask_indices(p, masks[j], where)  # global indices, sorted
                global_k[j] = checked.numel()
                local_masks[j] = shards[j].localize(checked.to(torch.int64)).to(local[j].device)
        layout = build_group_layout(local, local_masks, group_no)
        layout.owners, layout.shards = list(params), shards
        layout.global_k = [global_k.get(j, layout.k(j)) for j in range(len(params))]
        return layout

    @staticmethod
    def _grad_of(lay: GroupLayout, i: int) -> Tensor | None:
        """Parameter i's dense gradient as a plain tensor laid out like ``lay.params[i]``."""
        g = lay.owners[i].grad
        if g is not None and lay.shards[i] is not None:
            g = local_tensor(g)
        return g

    def _check_implementation(self, layout: GroupLayout, group_no: int) -> None:
        """implementation='triton' is refused at construction when this group's kernels could not
        run (rather than at the first step())."""
        if self.implementation != "triton" or layout.state_dtype == torch.float64:
            return  # float64 groups take the PyTorch path whatever was asked
        if triton_usable_on(layout.device):
            return
        raise RuntimeError(_triton_refusal(layout.device, f"param group {group_no}'s parameters"))

    def _use_triton(self, layout: GroupLayout) -> bool:
        # float64 groups always take the PyTorch path: Triton passes scalar arguments (lr, bias
        # corrections) as fp32, which would cost fp64 state its precision.
        if self.implementation == "torch" or layout.state_dtype == torch.float64:
            return False
        usable = triton_usable_on(layout.device)
        if self.implementation == "triton":
            if not usable:  # checked at construction too; TRITON_INTERPRET may have changed since
                raise RuntimeError(_triton_refusal(layout.device, "the parameters"))
            return True
        return usable and layout.device.type == "cuda" and not triton_interpreting()

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
            # gathers it then (see optim/_ddp.py).
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
        self._free_dense(gi, i)

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
        proxy = MaskedGrad(self._grad_buffer(gi)[lay.slice(i)], lay.indices[i], lay.mem_indices[i], lay.params[i])
        owner.grad = proxy
        rt.proxies[i] = proxy

    def _sync_proxies(self) -> None:
        """A tensor whose .grad is no longer the proxy it was given has had its gradient dropped
        (model.zero_grad(), p.grad = None) or replaced (p.grad = g): .grad is the truth, as in torch."""
        for lay, rt in zip(self._layouts, self._runtime):
            for i, proxy in enumerate(rt.proxies):
                if proxy is not None and lay.owners[i].grad is not proxy:
                    rt.proxies[i] = None
                    rt.grad_ready[i] = False

    def _drop_proxies(self, rt: _GroupRuntime, lay: GroupLayout, positions) -> None:
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

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step on the masked entries. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_proxies()
        # Check every group before touching any: a refusal in group 1 must not leave group 0 stepped.
        actives = [self._active(gi) for gi in range(len(self.param_groups))]
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, actives[gi])
        return loss

    def _active(self, gi: int) -> list[int]:
        lay, rt = self._layouts[gi], self._runtime[gi]
        active = []
        for i in lay.trainable:
            p, grad = lay.params[i], self._grad_of(lay, i)
            if rt.grad_ready[i] or grad is not None:
                if (
                    (lay.shards[i] is not None and local_tensor(lay.owners[i]) is not p)
                    or p.stride() != rt.strides[i]
                    or p.shape != rt.shapes[i]
                    or p.device != lay.device
                    or p.dtype != rt.dtypes[i]
                ):
                    raise RuntimeError(
                        f"param group {gi}, parameter {i} (shape {tuple(p.shape)}) changed its shape, memory layout, "
                        "dtype or device after the optimizer was built (e.g. model.to(...) or a memory_format change); "
                        "build the optimizer after moving the model"
                    )
                if not rt.grad_ready[i]:
                    self._check_grad(gi, i, p, grad)
                active.append(i)
        if active:
            self._use_triton(lay)  # raises here, before any group is touched, if the forced path cannot run
        return active

    @staticmethod
    def _check_grad(gi: int, i: int, p: Tensor, grad: Tensor) -> None:
        where = f"param group {gi}, parameter {i} (shape {tuple(p.shape)})"
        if grad.is_sparse:
            raise RuntimeError(
                f"{where} has a sparse gradient; masked optimizers need dense gradients (use sparse=False in nn.Embedding)"
            )
        if grad.shape != p.shape:
            raise RuntimeError(f"{where}: its gradient has shape {tuple(grad.shape)}")
        if grad.device != p.device:
            raise RuntimeError(f"{where}: its gradient is on {grad.device}, the parameter on {p.device}")

    def _run_key(self, rt: _GroupRuntime, i: int) -> Any:
        """Per-tensor state that must be equal within a run besides step and dtype (subclasses)."""
        return None

    def _runs(self, lay: GroupLayout, rt: _GroupRuntime, active: list[int]) -> list[Run]:
        """Split active tensors into maximal runs sharing (step, dtype, key) with no active gap."""
        runs: list[Run] = []
        prev = -1
        for i in active:
            p = lay.params[i]
            step, key = rt.steps[i], self._run_key(rt, i)
            last = runs[-1] if runs else None
            # extend the run only if no trainable tensor between prev and i was left out
            if (
                last is not None
                and (step, p.dtype, key) == (last.step, last.dtype, last.key)
                and lay.rank[i] == lay.rank[prev] + 1
            ):
                last.last = i
                last.end = lay.starts[i + 1]
            else:
                runs.append(Run(i, i, lay.starts[i], lay.starts[i + 1], step, p.dtype, key))
            prev = i
        return runs

    def _ensure_buffers(self, gi: int, group: dict[str, Any]) -> dict[str, Tensor]:
        """The group's per-entry buffers, created (zeroed) on first need. A buffer that appears
        later (e.g. momentum switched on mid-training) is added to every published state."""
        lay, rt = self._layouts[gi], self._runtime[gi]
        added = False
        if self._needs_master(lay) and "master" not in rt.buffers:
            rt.buffers["master"] = torch.zeros(lay.total, dtype=lay.state_dtype, device=lay.device)
        for name in self._state_buffer_names(group):
            if name not in rt.buffers:
                rt.buffers[name] = torch.zeros(lay.total, dtype=lay.state_dtype, device=lay.device)
                added = True
        if added:
            for i, p in enumerate(lay.owners):
                if p in self.state:
                    self._publish_state(gi, i)
        return rt.buffers

    def _needs_master(self, lay: GroupLayout) -> bool:
        # decided by the dtypes at construction (a dtype change afterwards is refused in _active)
        return self.master_weights and any(p.dtype != lay.state_dtype for p in lay.params)

    def _master_for(self, lay: GroupLayout, run: Run) -> bool:
        return self._needs_master(lay) and run.dtype != lay.state_dtype

    def _step_group(self, gi: int, group: dict[str, Any], active: list[int]) -> None:
        lay, rt = self._layouts[gi], self._runtime[gi]
        read_dense = [i for i in active if not rt.grad_ready[i]] if self.free_dense_grads else []
        if not active:
            return
        bufs = self._ensure_buffers(gi, group)
        for i in active:
            rt.steps[i] += 1
        new_state = [i for i in active if rt.steps[i] == 1]
        use_triton = self._use_triton(lay)
        for run in self._runs(lay, rt, active):
            has_master = self._master_for(lay, run)
            if has_master and run.step == 1:
                self._init_master(lay, run, bufs["master"])
            if use_triton:
                self._update_run_triton(gi, group, run, has_master)
                # the kernel writes through raw pointers: tell autograd, as an in-place op would
                torch.autograd.graph.increment_version([lay.params[i] for i in run.positions if lay.k(i)])
            else:
                self._update_run_torch(gi, group, run, has_master)
            if bufs.keys() - {"master"}:  # history buffers exist (momentum off: SGD has none)
                for i in run.positions:
                    rt.started[i] = True
        # keep state['step'] (torch's float32 CPU scalars) in sync in one op
        if len(active) == len(lay.trainable) and all(rt.steps[i] == rt.steps[active[0]] for i in active):
            if rt.trainable_index is None:
                rt.trainable_index = torch.tensor(lay.trainable, dtype=torch.int64)
            rt.step_tensor.index_fill_(0, rt.trainable_index, float(rt.steps[active[0]]))
        else:
            rt.step_tensor[torch.tensor(active)] = torch.tensor([float(rt.steps[i]) for i in active])
        for i in new_state:
            self._publish_state(gi, i)
        if any(rt.grad_ready):
            self._drop_proxies(rt, lay, range(len(rt.proxies)))
            rt.grad_ready = [False] * len(rt.grad_ready)  # gathered gradients are consumed by step()
        for i in read_dense:  # gathered here, not in backward (under DDP): free them now
            lay.owners[i].grad = None

    def _init_master(self, lay: GroupLayout, run: Run, master: Tensor) -> None:
        for i in run.positions:
            sl = lay.slice(i)
            master[sl].copy_(flat_memory_view(lay.params[i]).index_select(0, lay.mem_indices[i]))

    def _publish_state(self, gi: int, i: int) -> None:
        """Expose tensor i's slices of the flat buffers as torch-style per-parameter state."""
        lay, rt = self._layouts[gi], self._runtime[gi]
        sl = lay.slice(i)
        st = {"step": rt.step_tensor[i]}
        for name, buf in rt.buffers.items():
            if name == "master" and lay.params[i].dtype == lay.state_dtype:
                continue
            st[name] = buf[sl]
        self.state[lay.owners[i]] = st

    # --- the torch path: gather, one vectorised update per run, scatter
    def _native_copies(self, lay: GroupLayout) -> bool:
        """Whether the CPU gather/scatter can use the native multi-tensor ops (one threaded call per
        run instead of one index_select / index_put_ per parameter)."""
        if self._native is None:
            self._native = native_available()
        return self._native and lay.device.type == "cpu"

    def _gather_run(self, gi: int, run: Run, has_master: bool) -> tuple[Tensor, Tensor]:
        """(gradients, parameter values) of the run's entries as flat state-dtype slices of the
        group's buffers. Pure data movement: the values are exactly the selected entries."""
        lay, rt = self._layouts[gi], self._runtime[gi]
        grad = self._grad_buffer(gi)
        native = self._native_copies(lay)
        batched = []  # gradients laid out like their parameter: gathered in one native call
        for i in run.positions:
            if lay.k(i) and not rt.grad_ready[i]:
                p, g = lay.params[i], self._grad_of(lay, i)
                if native and type(g) is not MaskedGrad and not g.is_sparse and g.shape == p.shape and g.stride() == p.stride():
                    batched.append(i)
                else:
                    self._gather_grad(lay, i, g, grad[lay.slice(i)], accumulate=False)
        if batched:
            gather_masked([self._grad_of(lay, i) for i in batched], lay.flat_mem_indices, *lay.segments(batched), grad)
        if has_master:
            values = rt.buffers["master"]
        else:
            if rt.work is None:
                rt.work = torch.empty(lay.total, dtype=lay.state_dtype, device=lay.device)
            values = rt.work
            selected = [i for i in run.positions if lay.k(i)]
            if native:
                gather_masked([lay.params[i] for i in selected], lay.flat_mem_indices, *lay.segments(selected), values)
            else:
                for i in selected:
                    src = flat_memory_view(lay.params[i])
                    out = values[lay.slice(i)]
                    if src.dtype == out.dtype:
                        torch.index_select(src, 0, lay.mem_indices[i], out=out)
                    else:
                        out.copy_(src.index_select(0, lay.mem_indices[i]))
        return grad[run.start : run.end], values[run.start : run.end]

    def _scatter_run(self, gi: int, run: Run, has_master: bool) -> None:
        """Write the run's updated values (in the group's master or work buffer) into the
        parameters, rounded to each parameter's dtype."""
        lay, rt = self._layouts[gi], self._runtime[gi]
        values = rt.buffers["master"] if has_master else rt.work
        selected = [i for i in run.positions if lay.k(i)]
        if self._native_copies(lay):
            written = [lay.params[i] for i in selected]
            scatter_masked_(written, lay.flat_mem_indices, *lay.segments(selected), values)
            # a raw write: tell autograd, as an in-place torch op would (stale graphs then raise)
            torch.autograd.graph.increment_version(written)
            return
        for i in selected:
            p = lay.params[i]
            flat_memory_view(p).index_put_((lay.mem_indices[i],), values[lay.slice(i)].to(p.dtype))

    # --- the Triton path: address tables, one launch per run
    def _triton_tables(self, gi: int, run: Run, has_grad_flat: bool) -> tuple[BlockTable, Tensor, Tensor | None]:
        lay, rt = self._layouts[gi], self._runtime[gi]
        if rt.block_table is None:
            rt.block_table = build_block_table(lay.starts, lay.device)
            rt.param_addr = AddressTable(len(lay.params), lay.device)
            rt.grad_addr = AddressTable(len(lay.params), lay.device)
        param_addr = rt.param_addr.update([p.data_ptr() for p in lay.params])
        grad_addr = None
        if not has_grad_flat:
            grad_addr = rt.grad_addr.update(
                # tensors outside this run may hold a MaskedGrad (no data pointer): the run's blocks never read them
                [
                    g.data_ptr() if (g := self._grad_of(lay, i)) is not None and type(g) is not MaskedGrad and lay.k(i) else 0
                    for i in range(len(lay.params))
                ]
            )
        return rt.block_table, param_addr, grad_addr

    def _run_grads_for_triton(self, gi: int, run: Run) -> Tensor | None:
        """None when the kernel can read every dense .grad in place (same layout as its parameter);
        otherwise gathers the run's gradients into the flat buffer and returns it."""
        lay, rt = self._layouts[gi], self._runtime[gi]
        direct = True
        for i in run.positions:
            if not lay.k(i):
                continue
            g = self._grad_of(lay, i)
            if (
                rt.grad_ready[i] or g is None or type(g) is MaskedGrad or g.is_sparse
                or g.stride() != lay.params[i].stride() or g.dtype != lay.params[i].dtype
            ):
                direct = False
                break
        if direct:
            return None
        grad = self._grad_buffer(gi)
        for i in run.positions:
            if lay.k(i) and not rt.grad_ready[i]:
                self._gather_grad(lay, i, self._grad_of(lay, i), grad[lay.slice(i)], accumulate=False)
        return grad

    # ------------------------------------------------------------------ subclass interface
    def _state_buffer_names(self, group: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def _update_run_torch(self, gi: int, group: dict[str, Any], run: Run, has_master: bool) -> None:
        raise NotImplementedError

    def _update_run_triton(self, gi: int, group: dict[str, Any], run: Run, has_master: bool) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ gradient clipping
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Clip the gradients of the trained entries to a total norm of ``max_norm``, like
        ``torch.nn.utils.clip_grad_norm_`` on a model whose only parameters are those entries.

        Works everywhere ``torch.nn.utils.clip_grad_norm_`` does with these optimizers (with
        ``free_dense_grads`` ``.grad`` holds a MaskedGrad that torch's clip measures and scales),
        and also on FSDP2-sharded parameters, whose ``.grad`` is None after backward with
        ``free_dense_grads``: the norm is reduced over the shards. Unlike torch's clip on dense
        gradients, unselected gradient entries are ignored. Returns the total norm before clipping;
        call it between ``backward()`` and ``step()``.
        """
        self._sync_proxies()
        pieces = []  # flat gradient entries, as views that can be scaled in place
        sharded = []  # whether the piece is one rank's shard of a parameter (its norm spans ranks)
        for gi, (lay, rt) in enumerate(zip(self._layouts, self._runtime)):
            for i in lay.trainable:
                if rt.grad_ready[i]:
                    pieces.append(rt.grad[lay.slice(i)])
                elif (g := self._grad_of(lay, i)) is not None:
                    # gather once, and stash in the flat buffer so step() uses the clipped values
                    out = self._grad_buffer(gi)[lay.slice(i)]
                    self._gather_grad(lay, i, g, out, accumulate=False)
                    rt.grad_ready[i] = True
                    if self.free_dense_grads:
                        self._free_dense(gi, i)
                    pieces.append(out)
                else:
                    continue
                sharded.append(lay.shards[i] is not None and lay.shards[i].group is not None)
        shard_group = self._shard_group()
        if shard_group is not None:
            total = self._sharded_total_norm(pieces, sharded, float(norm_type), shard_group)
        elif not pieces:
            return torch.tensor(0.0)
        else:
            norms = [torch.linalg.vector_norm(g, norm_type) for g in pieces]
            total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), norm_type)
        if not pieces:
            return total
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the masked gradients is non-finite")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in pieces:
            g.mul_(coef.to(g.device, g.dtype))
        return total

    def _shard_group(self):
        """The process group over which this optimizer's sharded parameters are split, or None."""
        groups = {id(sh.group): sh.group for lay in self._layouts for sh in lay.shards if sh is not None and sh.group is not None}
        if len(groups) > 1:
            raise RuntimeError("clip_grad_norm_: the sharded parameters are split over different process groups")
        return next(iter(groups.values()), None)

    @staticmethod
    def _sharded_total_norm(pieces: list[Tensor], sharded: list[bool], p: float, group) -> Tensor:
        """Norm over all ranks' shards: the shards' sum of |g|^p (max for p=inf) is all-reduced over
        the shard group; replicated parameters count once. Every rank must call it (it is a collective),
        also one whose shard holds no entries."""
        import torch.distributed as dist

        inf = p == float("inf")
        device = pieces[0].device if pieces else torch.device("cpu")
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())

        def agg(ps: list[Tensor]) -> Tensor:
            if not ps:
                return torch.zeros((), dtype=torch.float64, device=device)
            n = torch.stack([torch.linalg.vector_norm(g, p).to(device, torch.float64) for g in ps])
            return n.max() if inf else n.pow(p).sum()

        local = agg([g for g, sh in zip(pieces, sharded) if sh]).reshape(1)
        dist.all_reduce(local, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
        rep = agg([g for g, sh in zip(pieces, sharded) if not sh])
        total = torch.maximum(local[0], rep) if inf else (local[0] + rep).pow(1.0 / p)
        dtype = pieces[0].dtype if pieces else torch.float32
        return total.to(dtype)

    # ------------------------------------------------------------------ introspection
    def num_masked(self) -> int:
        """Total number of trained entries k over all param groups."""
        return sum(lay.total for lay in self._layouts)

    def state_bytes(self) -> int:
        """Bytes held now as optimizer state: the per-entry buffers (moments / momentum) and fp32
        masters. They are allocated by the first ``step()``, so this is 0 before it; afterwards
        8·k for AdamW (12·k with amsgrad, +4·k with masters of bf16/fp16 entries). Excludes the
        indices and the gradient and scratch buffers: ``memory_footprint()`` counts everything."""
        return sum(b.numel() * b.element_size() for rt in self._runtime for b in rt.buffers.values())

    def memory_footprint(self) -> dict[str, int]:
        """Bytes this optimizer holds now, by part, and their ``"total"``:

        - ``"state"``: per-entry optimizer state (exp_avg, exp_avg_sq, max_exp_avg_sq; momentum_buffer);
        - ``"master"``: fp32 master copies of the bf16/fp16 entries (``master_weights=True``);
        - ``"indices"``: the mask, as each entry's row-major index and its memory offset (int32 for
          tensors under 2**31 entries, int64 above);
        - ``"grad"``: the gathered gradients (what ``.grad`` proxies point into with ``free_dense_grads``);
        - ``"work"``: scratch for the gathered parameter values (PyTorch path, entries without masters);
        - ``"tables"``: step counters and the Triton path's block and address tables (O(tensors + k/1024)).

        The indices exist from construction; the state, masters, gradient and work buffers are
        allocated when first needed (the first backward with ``free_dense_grads``, the first
        ``step()``), so the total grows over the first step and then stays. Dense ``.grad`` tensors
        that autograd holds between backward and step are the model's, not counted here.
        """
        def nbytes(t: Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        parts = dict.fromkeys(("state", "master", "indices", "grad", "work", "tables"), 0)
        for lay, rt in zip(self._layouts, self._runtime):
            for name, buf in rt.buffers.items():
                parts["master" if name == "master" else "state"] += nbytes(buf)
            parts["indices"] += nbytes(lay.flat_indices) + nbytes(lay.flat_mem_indices)
            parts["grad"] += nbytes(rt.grad)
            parts["work"] += nbytes(rt.work)
            parts["tables"] += nbytes(rt.step_tensor) + nbytes(rt.trainable_index)
            if rt.block_table is not None:
                bt = rt.block_table
                parts["tables"] += nbytes(bt.block_tensor) + nbytes(bt.block_start) + nbytes(bt.seg_end)
            for table in (rt.param_addr, rt.grad_addr):
                if table is not None:
                    parts["tables"] += nbytes(table.table)
        parts["total"] = sum(parts.values())
        return parts

    def mask_digests(self) -> list[list[str]]:
        """Per group, per parameter: the digest of its mask (see ``fishkern.mask.indices.indices_digest``)."""
        return [list(lay.digests) for lay in self._layouts]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["fishkern"] = {
            "format": STATE_DICT_FORMAT,
            "optimizer": type(self).__name__,
            "master_weights": self.master_weights,
            "masks": [
                [[lay.digests[i], lay.k(i), lay.params[i].numel()] for i in range(len(lay.params))]
                for lay in self._layouts
            ],
        }
        return sd

    def _check_saved_masks(self, masks: Any, saved_groups: list) -> None:
        """The saved per-parameter mask records must exist for every group and parameter and match
        this optimizer's masks: an empty or missing record must not pass as 'nothing to compare'."""
        if not isinstance(masks, list) or len(masks) != len(self._layouts):
            got = f"{len(masks)} groups" if isinstance(masks, list) else repr(type(masks).__name__)
            raise ValueError(
                f"state dict: the mask records ('fishkern'/'masks') must list {len(self._layouts)} param groups, got {got}; "
                "the saved state cannot be matched to this optimizer's masks"
            )
        for gi, (lay, saved, saved_masks) in enumerate(zip(self._layouts, saved_groups, masks)):
            if len(saved["params"]) != len(lay.params):
                raise ValueError(
                    f"param group {gi}: state dict has {len(saved['params'])} parameters, this optimizer {len(lay.params)}"
                )
            if not isinstance(saved_masks, list) or len(saved_masks) != len(lay.params):
                raise ValueError(
                    f"param group {gi}: the state dict's mask records must list {len(lay.params)} parameters, got "
                    f"{len(saved_masks) if isinstance(saved_masks, list) else type(saved_masks).__name__}"
                )
            for i, rec in enumerate(saved_masks):
                if not (isinstance(rec, (list, tuple)) and len(rec) == 3 and isinstance(rec[0], str)
                        and all(isinstance(x, int) and not isinstance(x, bool) for x in rec[1:])):
                    raise ValueError(f"param group {gi}, parameter {i}: malformed mask record {rec!r} in the state dict")
                digest, k, numel = rec
                if digest != lay.digests[i] or k != lay.k(i) or numel != lay.params[i].numel():
                    raise ValueError(
                        f"param group {gi}, parameter {i} (shape {tuple(lay.params[i].shape)}): the saved state "
                        f"belongs to a different mask (k={k}, {numel} entries, digest {digest}) than this "
                        f"optimizer's (k={lay.k(i)}, {lay.params[i].numel()} entries, digest {lay.digests[i]})"
                    )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_state_dict expects a dict (from state_dict()), got {type(state_dict).__name__}")
        meta = state_dict.get("fishkern")
        if not isinstance(meta, dict):
            raise ValueError(
                f"this state dict was not saved by a fishkern masked optimizer (no 'fishkern' entry); "
                f"{type(self).__name__} can only resume from its own state_dict()"
            )
        if meta.get("format") != STATE_DICT_FORMAT:
            raise ValueError(f"unsupported fishkern optimizer state format {meta.get('format')!r}")
        if meta.get("optimizer") != type(self).__name__:
            raise ValueError(f"state dict of a {meta.get('optimizer')} cannot be loaded into a {type(self).__name__}")
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in saved_groups
        ):
            raise ValueError("state dict: 'param_groups' must be a list of dicts, each with a 'params' list")
        if not isinstance(saved_state, Mapping):
            raise ValueError("state dict: 'state' must be a dict")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}")
        self._check_saved_masks(meta.get("masks"), saved_groups)
        # Validate everything before touching anything, so a bad state dict changes nothing.
        plan = []
        for gi, (lay, saved) in enumerate(zip(self._layouts, saved_groups)):
            names = self._state_buffer_names({**self.param_groups[gi], **saved})
            for i, pid in enumerate(saved["params"]):
                st = saved_state.get(pid)
                if st is None:
                    continue
                where = f"param group {gi}, parameter {i}"
                if not isinstance(st, Mapping):
                    raise ValueError(f"{where}: saved state must be a dict, got {type(st).__name__}")
                for name in names + (["master"] if "master" in st else []):
                    if name not in st:
                        raise ValueError(f"{where}: saved state lacks '{name}'")
                    v = st[name]
                    if not isinstance(v, Tensor) or not v.is_floating_point():
                        kind = f"a {v.dtype} tensor" if isinstance(v, Tensor) else f"a {type(v).__name__}"
                        raise ValueError(f"{where}: saved '{name}' must be a floating-point tensor, got {kind}")
                    if v.numel() != lay.k(i):
                        raise ValueError(
                            f"{where}: saved '{name}' has {v.numel()} entries, the mask selects {lay.k(i)}"
                        )
                # copies: `st` may hold views of this very optimizer's buffers (a live state_dict())
                saved_copy = {name: v.detach().clone() for name, v in st.items() if isinstance(v, Tensor) and name != "step"}
                saved_copy["step"] = _saved_step(st.get("step"), where)
                plan.append((gi, i, saved_copy))
        self.state.clear()
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
            rt = self._runtime[gi]
            rt.buffers.clear()
            rt.steps = [0] * len(rt.steps)
            rt.step_tensor.zero_()
            self._drop_proxies(rt, self._layouts[gi], range(len(rt.proxies)))  # gathered gradients are discarded
            rt.grad_ready = [False] * len(rt.grad_ready)
            rt.started = [False] * len(rt.started)
        touched = set()
        for gi, i, st in plan:
            lay, rt = self._layouts[gi], self._runtime[gi]
            bufs = self._ensure_buffers(gi, self.param_groups[gi])
            sl = lay.slice(i)
            for name, buf in bufs.items():
                if name in st:
                    buf[sl].copy_(st[name].reshape(-1))
            if "master" in bufs and "master" not in st and lay.params[i].dtype != lay.state_dtype:
                # saved without fp32 masters: start them from the parameter's current values
                bufs["master"][sl].copy_(flat_memory_view(lay.params[i]).index_select(0, lay.mem_indices[i]))
            step = st["step"]
            rt.steps[i] = step
            rt.started[i] = any(name in st for name in self._state_buffer_names(self.param_groups[gi]))
            rt.step_tensor[i] = float(step)
            touched.add((gi, i))
        for gi, i in sorted(touched):
            self._publish_state(gi, i)


def _saved_step(step: Any, where: str) -> int:
    """A saved step count as an int: a 0-d tensor or a number, integral and non-negative."""
    if isinstance(step, Tensor):
        if step.numel() != 1:
            raise ValueError(f"{where}: saved 'step' must be a scalar, got shape {tuple(step.shape)}")
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step != step or step < 0 or step != int(step):
        raise ValueError(f"{where}: saved 'step' must be a non-negative whole number, got {step!r}")
    return int(step)


def _triton_refusal(device: torch.device, what: str) -> str:
    """Why implementation='triton' cannot run on ``device`` here, and what to use instead."""
    if device.type == "cuda":
        why = "TRITON_INTERPRET=1 is set, and the interpreter runs on CPU tensors only"
        fix = "unset TRITON_INTERPRET before Python starts"
    else:
        cuda = torch.cuda.is_available()  # at construction only, never at import
        if cuda:
            here = f"CUDA is available here ({torch.cuda.device_count()} device(s))"
            fix = "move the model to CUDA (model.to('cuda')) before building the optimizer"
        elif torch.version.cuda is None:
            here = "this torch build has no CUDA"
            fix = "install a CUDA build of torch on a machine with an NVIDIA GPU"
        else:
            here = "this torch has CUDA but finds no GPU"
            fix = "run on a machine with a visible GPU"
        why = f"Triton kernels need CUDA tensors and {here}"
        fix += "; or set TRITON_INTERPRET=1 before triton is imported to run the kernels on CPU (slow: for tests)"
    return (
        f"implementation='triton' cannot run: {what} are on {device}. {why}. Use implementation='auto' or "
        f"'torch' (the vectorised PyTorch path, on any device), or {fix}"
    )


def _remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()

