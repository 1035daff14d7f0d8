"""The masked optimizers' core: masks per param group, flat per-entry state, and the step — one
op call (``fishkern.ops.masked_step``) per run of tensors that share their step count.

The steady state costs the host the same whatever the number of tensors: when every trained
tensor has its gradient where the group's ``ParamTable`` expects it (one native check), the whole
group is one run per parameter dtype, and nothing loops over the tensors in Python. Anything else
(a tensor without gradient this step, a replaced ``.grad``, a moved parameter, sharded
parameters) takes the general path, which looks at each tensor and explains what it refuses.

The parts: ``_grads.py`` (hooks, ``MaskedGrad`` proxies, zero_grad), ``_clip.py``
(``clip_grad_norm_``), ``_checkpoint.py`` (``state_dict``), ``_layout.py`` (where each entry lives).
Subclasses (``adamw.py``, ``sgd.py``) name their state buffers and call their op.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer

from ..mask.fishmask import FishMask
from ..ops import param_table as pt
from ..ops.triton_support import device_type, triton_status, triton_supported, triton_usable_on
from ._checkpoint import CheckpointMixin
from ._clip import ClipMixin
from ._grads import GradientsMixin
from ._layout import GroupLayout, build_group_layout, check_mask_indices, flat_memory_view
from ._sharded import is_dtensor, local_tensor, shard_info
from .sparse_backward import SparseBackward
from .sparse_backward import install as install_sparse_backward

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
    """Mutable per-group state: step counts, flat buffers, gathered gradients, the param table."""

    def __init__(self, layout: GroupLayout, capturable: bool = False):
        n = len(layout.params)
        self._trained = [layout.k(i) > 0 for i in range(n)]
        self._steps = [0] * n  # per tensor, while `uniform` is None (see the `steps` property)
        # (step, started) shared by every trained tensor, or None: then `steps` / `started` are per tensor
        self.uniform: tuple[int, Any] | None = (0, False)
        # torch.optim convention: state['step'] is a float32 CPU scalar (on the parameters' device
        # with capturable=True, as in torch); ours are views of this, one entry per trained tensor
        # (layout.rank), so that a step of all of them is one fill_.
        step_device = layout.device if capturable else torch.device("cpu")
        self.step_tensor = torch.zeros(len(layout.trainable), dtype=torch.float32, device=step_device)
        self.step_array = self.step_tensor.numpy() if step_device.type == "cpu" else None
        # capturable: the group's step count on the device, read there by the kernels
        self.step_dev = torch.zeros((), dtype=torch.float32, device=layout.device) if capturable else None
        self.buffers: dict[str, Tensor] = {}
        self.buffers_for: Any = None  # (buffer names, impl) the buffers were last ensured for
        self.grad: Tensor | None = None  # gathered gradients, [K]
        self.grad_ready = [False] * n  # set by hooks: this tensor's gradient is in self.grad
        # the MaskedGrad each gathered tensor's .grad was set to (None: none, or a sharded tensor,
        # whose .grad stays None); a .grad that is no longer it was dropped or replaced by the user
        self.proxies: list[Any] = [None] * n
        self.proxy_cache: list[Any] = [None] * n  # one persistent MaskedGrad per tensor (see _free_dense)
        # whether a step has initialised this tensor's history buffers (SGD's momentum buffer
        # starts as a copy of the gradient, whenever momentum first applies to the tensor)
        self._started = [False] * n
        self.work: Tensor | None = None  # scratch for gathered parameter values, [K]
        # the steady state's bound launches of full_runs and what they were bound for (_prepared_launches)
        self.prepared: list | None = None
        self.prepared_key: Any = None
        self.strides = [p.stride() for p in layout.params]
        self.shapes = [p.shape for p in layout.params]
        self.dtypes = [p.dtype for p in layout.params]
        self.sharded = any(sh is not None for sh in layout.shards)
        self.table = pt.ParamTable(layout.params, layout.starts, layout.flat_mem_indices, layout.flat_indices,
                                   layout.trainable, layout.device, layout.state_dtype)
        # the runs of a step in which every trained tensor takes part: consecutive trained tensors of
        # one dtype (a kernel launch is specialised on the parameter dtype)
        self.full_runs: list[tuple[int, int, torch.dtype]] = []
        for i in layout.trainable:
            dt = layout.params[i].dtype
            if self.full_runs and self.full_runs[-1][2] == dt:
                self.full_runs[-1] = (self.full_runs[-1][0], i, dt)
            else:
                self.full_runs.append((i, i, dt))


    # Per-tensor step counts and started flags. In the uniform state (the steady state) they are
    # one pair for the whole group and the lists are made only when read; code that writes them
    # leaves the uniform state first (materialize), and `_maybe_uniform` returns to it.
    @property
    def steps(self) -> list[int]:
        if self.uniform is not None:
            return [self.uniform[0] if t else 0 for t in self._trained]  # a copy: materialize() to write
        return self._steps

    @steps.setter
    def steps(self, value: list[int]) -> None:
        self.materialize()
        self._steps = value

    @property
    def started(self) -> list[bool]:
        if self.uniform is not None:
            return [bool(self.uniform[1]) and t for t in self._trained]
        return self._started

    @started.setter
    def started(self, value: list[bool]) -> None:
        self.materialize()
        self._started = value

    def materialize(self) -> None:
        """Leave the uniform state: per-tensor lists from it."""
        if self.uniform is not None:
            self._steps, self._started = self.steps, self.started
            self.uniform = None


class MaskedOptimizer(GradientsMixin, ClipMixin, CheckpointMixin, torch.optim.Optimizer):
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
        capturable: bool = False,
        sparse_backward: bool | str = "auto",
    ):
        if sparse_backward not in (True, False, "auto"):
            raise ValueError(f"sparse_backward must be True, False or 'auto', got {sparse_backward!r}")
        model = params if isinstance(params, torch.nn.Module) else None
        if model is not None:
            params = list(model.named_parameters())
        elif sparse_backward is True:
            raise ValueError(
                "sparse_backward=True patches the model's layers, so it needs the model: pass the model itself as "
                "params (MaskedAdamW(model, mask, ...)), or call opt.enable_sparse_backward(model) after construction"
            )
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
        self.capturable = bool(capturable)
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
        self.sparse_backward: SparseBackward | None = None
        if model is not None and sparse_backward:
            self.enable_sparse_backward(model, strict=sparse_backward is True)

    # ------------------------------------------------------------------ sparse backward
    def enable_sparse_backward(self, model: torch.nn.Module, *, dense_above: float | None = None,
                               strict: bool = True) -> SparseBackward:
        """Make ``model``'s Linear / Conv1D / Embedding layers whose weights this optimizer trains
        compute their weight gradients at the masked entries only (``fishkern.optim.sparse_backward``).
        Turns on ``free_dense_grads``: the k gradient values go into the optimizer's buffer and
        ``.grad`` holds a ``MaskedGrad``; parameters with no masked entry are frozen.

        ``dense_above``: density (k / entries) above which a layer forms its dense weight gradient
        in a temporary and gathers (default per device, ``sparse_backward.DENSE_ABOVE``).
        ``strict=False`` leaves layers that cannot take it dense instead of raising. Returns the
        handle, also kept as ``opt.sparse_backward`` (``.layers()`` lists the patched layers)."""
        if self.sparse_backward is not None and self.sparse_backward.active:
            raise RuntimeError("sparse backward is already on for this optimizer; call disable_sparse_backward() first")
        handle = install_sparse_backward(self, model, dense_above=dense_above, strict=strict)
        if handle.layers() and not (self.free_dense_grads and self._hooks):
            self.free_dense_grads = True
            try:
                for gi in range(len(self._layouts)):
                    self._register_grad_hooks(gi)
            except BaseException:
                handle.remove()
                self.remove_grad_hooks()
                raise
        self.sparse_backward = handle
        return handle

    def sparse_backward_layers(self) -> list[dict]:
        """The layers computing their weight gradients sparsely for this optimizer (name, kind, path:
        "sampled" or "dense-then-gather", k, entries, density); empty when sparse backward is off."""
        return self.sparse_backward.layers() if self.sparse_backward is not None else []

    def disable_sparse_backward(self) -> None:
        """Give every patched layer back its own forward (torch's dense backward). ``free_dense_grads``
        stays on (``remove_grad_hooks()`` turns it off)."""
        if self.sparse_backward is not None:
            self.sparse_backward.remove()
            self.sparse_backward = None

    def __getstate__(self):
        # torch's Optimizer pickles only defaults/state/param_groups: the copy would have no masks,
        # buffers or tables and fail later, far from here
        raise TypeError(
            f"a {type(self).__name__} cannot be copied or pickled (its masks, flat buffers and hooks do not travel): "
            "save opt.state_dict() and load it into a new optimizer built on the new parameters"
        )

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
        self._runtime.append(_GroupRuntime(layout, self.capturable))
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

    def _kernel_impl(self, layout: GroupLayout) -> str:
        """The step ops' ``impl``: checked here, before any group is touched, when Triton is forced."""
        if self.implementation == "triton" and layout.state_dtype != torch.float64 and not triton_usable_on(layout.device):
            # checked at construction too; TRITON_INTERPRET may have changed since
            raise RuntimeError(_triton_refusal(layout.device, "the parameters"))
        return self.implementation

    def _use_triton(self, layout: GroupLayout, impl: str | None = None) -> bool:
        """Whether this group's steps run the Triton kernel (for introspection and tests); ``impl``:
        what ``_kernel_impl`` returned this step, if known."""
        if impl is None:
            impl = self._kernel_impl(layout)
        if impl == "torch" or layout.state_dtype == torch.float64:
            return False
        return impl == "triton" or (device_type(layout.device) == "cuda" and triton_usable_on(layout.device))

    # ------------------------------------------------------------------ stepping
    def step(self, closure=None):
        """Perform one optimisation step on the masked entries. Returns the closure's loss."""
        # torch.optim.Optimizer wraps every step() in a profiler range and its step hooks, ~10 µs of
        # Python per call. This step is marked `hooked`, so torch leaves it unwrapped, and it takes
        # torch's wrapper only when a hook is registered or a profiler records.
        if type(self).step is MaskedOptimizer.step and _step_wrapper_needed(self):
            return _TORCH_WRAPPED_STEP(self, closure)
        return self._step(closure)

    step.hooked = True  # read by torch.optim.Optimizer._patch_step_function

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad() without building a context object per step
        try:
            # Plan every group before touching any: a refusal in group 1 must not leave group 0 stepped.
            last = len(self.param_groups) - 1
            plans = [self._plan(gi, commit=gi == last) for gi in range(last + 1)]
            for gi, (group, (plan, impl, committed)) in enumerate(zip(self.param_groups, plans)):
                if plan is True:
                    self._step_all(gi, group, impl, committed)
                else:
                    self._step_group(gi, group, plan)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        return loss

    def _plan(self, gi: int, commit: bool) -> tuple[Any, str | None, bool]:
        """(True, impl, committed): every trained tensor of the group steps and its gradient is where
        the kernels read it (the steady state, checked by one native call), and the ops run with
        ``impl``; ``committed``: the check also did the table's ``commit`` (asked for by ``commit``,
        when no later group is left to plan, so nothing can refuse the step any more). Else (the list
        of tensors that step, None, False)."""
        lay, rt = self._layouts[gi], self._runtime[gi]
        if rt.uniform is not None and not rt.sharded and lay.trainable:
            mode = pt.PROXIES if self.free_dense_grads and self._hooks else pt.DENSE
            # DENSE: no gradient may wait in the flat buffer already (clip_grad_norm_ gathers there)
            if mode == pt.PROXIES or True not in rt.grad_ready:
                impl = self._kernel_impl(lay)  # may refuse: before the commit
                if not rt.table.check(mode, remember=True, commit=commit) & pt.NEEDS_SLOW_PATH:
                    return True, impl, commit
        self._sync_proxies(gi)
        return self._active(gi), None, False

    def _step_all(self, gi: int, group: dict[str, Any], impl: str, committed: bool) -> None:
        """The steady state: one op call per full run, no per-tensor work in Python. The table's
        commit (autograd versions, proxies off .grad) is one native pass, here or in the check."""
        rt = self._runtime[gi]
        if not committed:
            rt.table.commit(pt.PROXIES if self.free_dense_grads and self._hooks else pt.DENSE)
        try:
            self._step_all_runs(gi, group, impl)
        finally:
            self._runtime[gi].table.forget_clean()  # the check of _plan stands for this step only

    def _step_all_runs(self, gi: int, group: dict[str, Any], impl: str) -> None:
        lay, rt = self._layouts[gi], self._runtime[gi]
        bufs = self._ensure_buffers(gi, group, impl)
        step, key = rt.uniform
        step += 1
        in_flat = self.free_dense_grads and bool(self._hooks)
        if rt.step_dev is not None:
            rt.step_dev.add_(1)  # on the device: a captured graph advances it at every replay
        lr, lr_t = self._lr_of(group, lay)
        launches = self._prepared_launches(gi, group, impl, in_flat, lr_t)
        for r, (first, last, dtype) in enumerate(rt.full_runs):
            has_master = self._master_for_dtype(lay, dtype)
            if has_master and step == 1:
                self._init_master(lay, Run(first, last, lay.starts[first], lay.starts[last + 1], step, dtype, key),
                                  bufs["master"])
            launch = launches[r] if launches is not None else None
            if launch is None or not launch(step, lr):
                run = Run(first, last, lay.starts[first], lay.starts[last + 1], step, dtype, key)
                self._call_op(gi, group, run, has_master, in_flat, impl, bumped=True)
        started = bool(bufs.keys() - {"master"}) or key
        rt.uniform = (step, started)
        if rt.step_dev is not None:
            rt.step_tensor.fill_(rt.step_dev)
        else:  # a CPU tensor: written through its numpy view, without a dispatcher call
            rt.step_array.fill(step)
        if step == 1:
            for i in lay.trainable:
                self._publish_state(gi, i)
        if in_flat:  # the gathered gradients are consumed (the commit took the proxies off .grad)
            n = len(lay.params)
            rt.proxies = [None] * n
            rt.grad_ready = [False] * n

    def _prepared_launches(self, gi: int, group: dict[str, Any], impl: str, in_flat: bool,
                           lr_t: Tensor | None) -> list | None:
        """The steady state's launches of the group's full runs, bound once (``_prepare_op``) and
        rebound when anything they bind changes: the buffers, the gradient buffer, the tensor lr,
        the hyper-parameters, ``impl``, or whether Triton is usable here. None: the optimizer has no
        prepared launches; an entry None: that run takes the op call."""
        rt, lay = self._runtime[gi], self._layouts[gi]
        hyper = self._prepared_key(group)
        if hyper is None:
            return None
        usable = triton_usable_on(lay.device)

        def key() -> tuple:
            return impl, in_flat, usable, id(rt.grad) if in_flat else 0, id(lr_t), tuple(map(id, rt.buffers.values())), hyper

        if rt.prepared_key != key():
            grad = self._grad_arg(gi, in_flat, impl)  # may allocate rt.grad: the key is taken after
            rt.prepared = [self._prepare_op(gi, group, first, last, self._master_for_dtype(lay, dtype), grad, in_flat,
                                            impl, lr_t) for first, last, dtype in rt.full_runs]
            rt.prepared_key = key()
        return rt.prepared

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
            self._kernel_impl(lay)  # raises here, before any group is touched, if the forced path cannot run
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

    def _ensure_buffers(self, gi: int, group: dict[str, Any], impl: str | None = None) -> dict[str, Tensor]:
        """The group's per-entry buffers, created (zeroed) on first need. A buffer that appears
        later (e.g. momentum switched on mid-training) is added to every published state."""
        lay, rt = self._layouts[gi], self._runtime[gi]
        names = self._state_buffer_names(group)
        if rt.buffers_for == (names, impl) and impl is not None:
            return rt.buffers  # as at the last step: nothing to create
        added = False
        if self._needs_master(lay) and "master" not in rt.buffers:
            rt.buffers["master"] = torch.zeros(lay.total, dtype=lay.state_dtype, device=lay.device)
        for name in names:
            if name not in rt.buffers:
                rt.buffers[name] = torch.zeros(lay.total, dtype=lay.state_dtype, device=lay.device)
                added = True
        if rt.work is None and not self._use_triton(lay, impl) and not all(self._master_for_dtype(lay, dt) for *_, dt in rt.full_runs):
            # scratch for the entries' values on the PyTorch path (the Triton kernel needs none)
            rt.work = torch.empty(lay.total, dtype=lay.state_dtype, device=lay.device)
        if added:
            for i, p in enumerate(lay.owners):
                if p in self.state:
                    self._publish_state(gi, i)
        rt.buffers_for = (names, impl)
        return rt.buffers

    def _needs_master(self, lay: GroupLayout) -> bool:
        # decided by the dtypes at construction (a dtype change afterwards is refused in _active)
        return self.master_weights and lay.low_precision

    def _master_for_dtype(self, lay: GroupLayout, dtype: torch.dtype) -> bool:
        return self._needs_master(lay) and dtype != lay.state_dtype

    def _master_for(self, lay: GroupLayout, run: Run) -> bool:
        return self._master_for_dtype(lay, run.dtype)

    def _step_group(self, gi: int, group: dict[str, Any], active: list[int]) -> None:
        """The general path: per-tensor bookkeeping, then one op call per run."""
        lay, rt = self._layouts[gi], self._runtime[gi]
        read_dense = [i for i in active if not rt.grad_ready[i]] if self.free_dense_grads else []
        if not active:
            return
        if rt.step_dev is not None:
            if active != lay.trainable:
                missing = next(i for i in lay.trainable if i not in set(active))
                raise RuntimeError(
                    f"capturable=True steps every trained tensor at every step (one step count per group, on the "
                    f"device), but param group {gi}, parameter {missing} (shape {tuple(lay.params[missing].shape)}) "
                    "has no gradient this step; give every trained parameter a gradient, or use capturable=False"
                )
            rt.step_dev.add_(1)
        rt.materialize()
        impl = self._kernel_impl(lay)
        bufs = self._ensure_buffers(gi, group, impl)
        for i in active:
            rt.steps[i] += 1
        new_state = [i for i in active if rt.steps[i] == 1]
        for run in self._runs(lay, rt, active):
            has_master = self._master_for(lay, run)
            if has_master and run.step == 1:
                self._init_master(lay, run, bufs["master"])
            self._call_op(gi, group, run, has_master, self._grads_to_flat(gi, run), impl)
            if bufs.keys() - {"master"}:  # history buffers exist (momentum off: SGD has none)
                for i in run.positions:
                    rt.started[i] = True
        # keep state['step'] (torch's float32 CPU scalars) in sync in one op
        if len(active) == len(lay.trainable) and all(rt.steps[i] == rt.steps[active[0]] for i in active):
            rt.step_tensor.fill_(float(rt.steps[active[0]]))
        else:
            ranks = torch.tensor([lay.rank[i] for i in active])
            rt.step_tensor[ranks] = torch.tensor([float(rt.steps[i]) for i in active])
        for i in new_state:
            self._publish_state(gi, i)
        if any(rt.grad_ready):
            self._drop_proxies(rt, lay, range(len(rt.proxies)))
            rt.grad_ready = [False] * len(rt.grad_ready)  # gathered gradients are consumed by step()
        for i in read_dense:  # gathered here, not in backward (under DDP): free them now
            lay.owners[i].grad = None
        self._maybe_uniform(rt, lay)

    def _maybe_uniform(self, rt: _GroupRuntime, lay: GroupLayout) -> None:
        """Back to the uniform state when every trained tensor has the same step and key."""
        if not lay.trainable:
            return
        first = lay.trainable[0]
        step, key = rt.steps[first], self._run_key(rt, first)
        if all(rt.steps[i] == step and self._run_key(rt, i) == key for i in lay.trainable):
            rt.uniform = (step, rt.started[first])  # the lists are rebuilt from it when read

    def _grads_to_flat(self, gi: int, run: Run) -> bool:
        """Whether the run's gradients are (made) all in the flat buffer before its op call: yes when
        any of them was gathered already or cannot be read in place (sharded, a proxy of another
        step, not laid out like its parameter); no when every one is a plain dense ``.grad``."""
        lay, rt = self._layouts[gi], self._runtime[gi]
        selected = [i for i in run.positions if lay.k(i)]
        in_place = not rt.sharded and not any(rt.grad_ready[i] for i in selected) and all(
            type(g := lay.owners[i].grad) is Tensor and g.layout == torch.strided and g.shape == lay.params[i].shape
            for i in selected
        )
        if in_place:
            return False
        grad = self._grad_buffer(gi)
        for i in selected:
            if not rt.grad_ready[i]:
                self._gather_grad(lay, i, self._grad_of(lay, i), grad[lay.slice(i)], accumulate=False)
        return True

    def _init_master(self, lay: GroupLayout, run: Run, master: Tensor) -> None:
        for i in run.positions:
            sl = lay.slice(i)
            master[sl].copy_(flat_memory_view(lay.params[i]).index_select(0, lay.mem_indices[i]))

    def _publish_state(self, gi: int, i: int) -> None:
        """Expose tensor i's slices of the flat buffers as torch-style per-parameter state."""
        lay, rt = self._layouts[gi], self._runtime[gi]
        sl = lay.slice(i)
        st = {"step": rt.step_tensor[lay.rank[i]]}
        for name, buf in rt.buffers.items():
            if name == "master" and lay.params[i].dtype == lay.state_dtype:
                continue
            st[name] = buf[sl]
        self.state[lay.owners[i]] = st

    def _grad_arg(self, gi: int, grads_in_flat: bool, impl: str | None = None) -> Tensor | None:
        """The flat gradient buffer for an op call; not allocated for the Triton kernel when it reads
        dense gradients in place."""
        if grads_in_flat or not self._use_triton(self._layouts[gi], impl):
            return self._grad_buffer(gi)
        return self._runtime[gi].grad

    def _lr_of(self, group: dict[str, Any], lay: GroupLayout) -> tuple[float, Tensor | None]:
        """(lr as a number, lr as a device tensor or None). A tensor lr on the parameters' device is
        read on the device with ``capturable=True``; otherwise it is read on the host, as torch does."""
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if self.capturable and lr.device == lay.device:
                return 0.0, lr.reshape(())
            return float(lr), None
        return float(lr), None

    def _step_arg(self, gi: int) -> Tensor | None:
        """capturable: the group's step count as a device tensor (the op reads it there)."""
        return self._runtime[gi].step_dev if self.capturable else None

    # ------------------------------------------------------------------ subclass interface
    def _state_buffer_names(self, group: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def _call_op(self, gi: int, group: dict[str, Any], run: Run, has_master: bool, grads_in_flat: bool,
                 impl: str, bumped: bool = False) -> None:
        """Step the run with the optimizer's op (one call); ``bumped``: the table's commit bumped the
        parameters' autograd versions already."""
        raise NotImplementedError

    def _prepared_key(self, group: dict[str, Any]) -> tuple | None:
        """The hyper-parameters a prepared launch binds (as plain values), or None: this optimizer
        has no prepared launches and every run takes ``_call_op``."""
        return None

    def _prepare_op(self, gi: int, group: dict[str, Any], first: int, last: int, has_master: bool,
                    grad: Tensor | None, grads_in_flat: bool, impl: str, lr_t: Tensor | None):
        """The steady-state launch of run first..last, bound once: ``run(step, lr) -> bool`` (False:
        make the op call instead), or None where the run takes the op call."""
        return None

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
            parts["tables"] += nbytes(rt.step_tensor)
            parts["tables"] += rt.table.nbytes()
        parts["total"] = sum(parts.values())
        return parts

    def mask_digests(self) -> list[list[str]]:
        """Per group, per parameter: the digest of its mask (see ``fishkern.mask.indices.indices_digest``)."""
        return [list(lay.digests) for lay in self._layouts]

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


_TORCH_WRAPPED_STEP = torch.optim.Optimizer.profile_hook_step(MaskedOptimizer._step)


def _step_wrapper_needed(opt: torch.optim.Optimizer) -> bool:
    """Whether torch's step wrapper has work to do: a step hook (of this optimizer or global) or a
    running profiler, which records the ``Optimizer.step#...`` range."""
    return bool(opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or _GLOBAL_PRE_HOOKS
                or _GLOBAL_POST_HOOKS) or _profiler_enabled()


# the registries torch.optim.register_optimizer_step_pre_hook / _post_hook fill (dicts, mutated in place)
_GLOBAL_PRE_HOOKS = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", {})
_GLOBAL_POST_HOOKS = getattr(_torch_optimizer, "_global_optimizer_post_hooks", {})
_profiler_enabled = torch.autograd._profiler_enabled

