"""The masked optimizer steps as ops: ``fishkern::masked_adamw_step_`` and ``fishkern::masked_sgd_step_``.

One call steps a *run* — tensors ``first..last`` of a param group that share their step count — on
the group's flat per-entry buffers. The tensors themselves are reached through the group's
``ParamTable`` handle (``param_table.py``), so the call's host cost does not grow with the number
of tensors. Arguments common to both ops:

- ``table, first, last``: the group's table and the run;
- ``grad``: the group's flat gradient buffer [K]; with ``grads_in_flat`` the run's gradients are
  already in it (gathered by the optimizer's hooks), otherwise they are read from each tensor's
  dense ``.grad`` (the default kernel gathers them into ``grad`` first, which it may overwrite; the
  Triton kernel reads them in place; None: a temporary buffer where one is needed);
- ``master``: fp32 masters of the run's entries (the update is applied there, the parameter gets
  the rounded value), or None: the update is applied to the parameter's own values, with ``work``
  as scratch for them (the default kernel; None: a temporary);
- ``lr`` / ``lr_t``: the learning rate as a number, or as a 0-d tensor on the parameters' device
  (``capturable``: nothing is read on the host, so the step can be captured in a CUDA graph);
- ``impl``: "auto" (the device's best kernel), "torch" (the default kernel) or "triton" (the
  Triton kernel; on CPU tensors under TRITON_INTERPRET=1, for tests).

Kernels: the default kernel (any device) is the vectorised PyTorch path — gather the entries,
update them with the same tensor ops as ``torch.optim.AdamW`` / ``SGD``, scatter them back (the
native multi-tensor gather/scatter ops on CPU). The CUDA kernel is one fused Triton launch over the
run (``adamw_triton.py`` / ``sgd_triton.py``). Parameters are written in place through the table;
the state buffers are the op's declared mutable arguments.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from . import library
from .triton_support import device_type, triton_usable_on
from .adamw import adamw_scalars, adamw_step_scalars, adamw_update_, adamw_update_capturable_
from .masked_copy import gather_masked, scatter_masked_
from .param_table import DENSE, NEEDS_SLOW_PATH, ParamTable, table
from .sgd import sgd_update_

IMPLS = ("auto", "torch", "triton")
# CPU tensors move their entries with the multi-tensor gather/scatter ops (native kernels: one
# threaded call per run); False: one index_select / index_put_ per tensor (tests compare the two)
MULTI_TENSOR_COPIES = True

_COMMON = ("int table, int first, int last, Tensor(a!)? grad, bool grads_in_flat, "
           "Tensor(b!)? master, Tensor(c!)? work, ")
ADAMW_SCHEMA = (
    "(" + _COMMON + "Tensor(d!) exp_avg, Tensor(e!) exp_avg_sq, Tensor(f!)? max_exp_avg_sq, "
    "int step, Tensor? step_t, float lr, Tensor? lr_t, float beta1, float beta2, float eps, float weight_decay, "
    "bool maximize, str impl) -> ()"
)
SGD_SCHEMA = (
    "(" + _COMMON + "Tensor(d!)? momentum_buffer, float lr, Tensor? lr_t, float momentum, float dampening, "
    "float weight_decay, bool nesterov, bool maximize, bool first_step, str impl) -> ()"
)


# ---------------------------------------------------------------------- argument checks
def _check(opname: str, t: ParamTable, first: int, last: int, grad: Tensor | None, grads_in_flat: bool,
           work: Tensor | None, impl: str, flat: dict[str, Tensor | None]) -> None:
    n = len(t.params)
    if not (0 <= first <= last < n):
        raise ValueError(f"{opname}: run [{first}, {last}] is outside the table's {n} tensors")
    if impl not in IMPLS:
        raise ValueError(f"{opname}: impl must be one of {IMPLS}, got {impl!r}")
    total = t.starts[-1]
    if grads_in_flat and grad is None:
        raise ValueError(f"{opname}: grads_in_flat needs the grad buffer")
    for name, buf in (("grad", grad), ("work", work), *flat.items()):
        if buf is None:
            continue
        if buf.dim() != 1 or buf.numel() < total or buf.device != t.device or not buf.is_contiguous() \
                or buf.dtype != t.state_dtype:
            raise ValueError(
                f"{opname}: {name} must be a contiguous 1-D {t.state_dtype} buffer of at least {total} entries on "
                f"{t.device}, got a {buf.dtype} tensor of shape {tuple(buf.shape)} on {buf.device}"
            )


def _fake(*args, **kwargs) -> None:
    return None  # the ops return nothing; their mutable arguments keep their metadata


# ---------------------------------------------------------------------- default kernel pieces
def _gather_grads(t: ParamTable, first: int, last: int, grad: Tensor) -> None:
    """Copy the dense .grad entries of tensors first..last into ``grad`` (state dtype)."""
    native = t.device.type == "cpu" and MULTI_TENSOR_COPIES
    batched = []
    for i in range(first, last + 1):
        if not t.k(i):
            continue
        p, g = t.params[i], t.params[i].grad
        if g is None:
            raise RuntimeError(f"tensor {i} of the run (shape {tuple(p.shape)}) has no gradient")
        if g.is_sparse:
            raise RuntimeError(
                f"tensor {i} (shape {tuple(p.shape)}) has a sparse gradient; masked optimizers need dense gradients "
                "(use sparse=False in nn.Embedding)"
            )
        if g.shape != p.shape:
            raise RuntimeError(f"gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")
        if native and g.layout == torch.strided and g.stride() == p.stride() and type(g) is Tensor:
            batched.append(i)
            continue
        out = grad[t.starts[i] : t.starts[i + 1]]
        if g.layout == torch.strided and g.stride() == p.stride():
            src, idx = _flat_memory(g), t.mem_index_of(i)
        else:
            src, idx = g.reshape(-1), t.index_of(i)
        if src.dtype == out.dtype:
            torch.index_select(src, 0, idx, out=out)
        else:
            out.copy_(src.index_select(0, idx))
    if batched:
        gather_masked([t.params[i].grad for i in batched], t.mem_index, [t.starts[i] for i in batched],
                      [t.starts[i + 1] for i in batched], grad)


def _gather_values(t: ParamTable, first: int, last: int, work: Tensor) -> None:
    selected = [i for i in range(first, last + 1) if t.k(i)]
    if t.device.type == "cpu" and MULTI_TENSOR_COPIES:
        gather_masked([t.params[i] for i in selected], t.mem_index, [t.starts[i] for i in selected],
                      [t.starts[i + 1] for i in selected], work)
        return
    for i in selected:
        src, out = _flat_memory(t.params[i]), work[t.starts[i] : t.starts[i + 1]]
        if src.dtype == out.dtype:
            torch.index_select(src, 0, t.mem_index_of(i), out=out)
        else:
            out.copy_(src.index_select(0, t.mem_index_of(i)))


def _scatter_values(t: ParamTable, first: int, last: int, values: Tensor) -> None:
    selected = [i for i in range(first, last + 1) if t.k(i)]
    if t.device.type == "cpu" and MULTI_TENSOR_COPIES:
        # the op bumps the autograd versions of what it writes, as an in-place torch op does
        scatter_masked_([t.params[i] for i in selected], t.mem_index, [t.starts[i] for i in selected],
                        [t.starts[i + 1] for i in selected], values)
        return
    for i in selected:
        p = t.params[i]
        _flat_memory(p).index_put_((t.mem_index_of(i),), values[t.starts[i] : t.starts[i + 1]].to(p.dtype))


def _flat_memory(x: Tensor) -> Tensor:
    from ..mask.indices import flat_memory_view

    return flat_memory_view(x)


def _torch_run(t: ParamTable, first: int, last: int, grad: Tensor, grads_in_flat: bool, master: Tensor | None,
               work: Tensor, update) -> None:
    """Gather, update (``update(values, grads, lo, hi)``), scatter: the default kernel's frame."""
    lo, hi = t.segment(first, last)
    if hi == lo:
        return
    if grad is None:
        grad = torch.empty(t.starts[-1], dtype=t.state_dtype, device=t.device)
    if work is None and master is None:
        work = torch.empty(t.starts[-1], dtype=t.state_dtype, device=t.device)
    if not grads_in_flat:
        _gather_grads(t, first, last, grad)
    if master is None:
        _gather_values(t, first, last, work)
        values = work
    else:
        values = master
    update(values[lo:hi], grad[lo:hi], lo, hi)
    _scatter_values(t, first, last, values)


_LAUNCHERS: dict[str, object] = {}


def _launcher(module: str, name: str):
    """A Triton launcher, imported on first use (importing triton is left to the first CUDA step) and
    kept (an import statement per call costs a microsecond or two)."""
    fn = _LAUNCHERS.get(name)
    if fn is None:
        import importlib

        fn = _LAUNCHERS[name] = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    return fn


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


# Which kernel runs: the dispatcher picks by device (the default kernel for CPU and any device
# without its own kernel, the CUDA kernel for CUDA tensors); `impl` can then ask for the other one.
# float64 state always takes the PyTorch path (Triton passes scalar arguments as fp32).
_DEVICE = {"default": False, "cuda": True}  # whether "auto" means Triton on this kernel


def _triton_for(t: ParamTable, impl: str, kernel: str) -> bool:
    if impl == "torch" or t.state_dtype == torch.float64:
        return False
    if impl == "triton":
        if not triton_usable_on(t.device):
            raise RuntimeError(
                f"impl='triton' cannot run on {t.device} tensors here: Triton needs CUDA tensors, or CPU tensors "
                "with TRITON_INTERPRET=1 set before triton is imported"
            )
        return True
    return _DEVICE[kernel] and triton_usable_on(t.device)


def _triton_grads(t: ParamTable, first: int, last: int, grad: Tensor, grads_in_flat: bool):
    """(grad_flat or None, grad address table or None) for a Triton launch: dense gradients are
    read in place when the table's check says they all are where it last saw them."""
    if grads_in_flat:
        return grad, None
    if t.take_clean(DENSE) or not (t.check(DENSE) & NEEDS_SLOW_PATH):
        return None, t.addresses()[1]
    if grad is None:
        grad = torch.empty(t.starts[-1], dtype=t.state_dtype, device=t.device)
    _gather_grads(t, first, last, grad)
    return grad, None


# ---------------------------------------------------------------------- AdamW
def _adamw(kernel, table_h, first, last, grad, grads_in_flat, master, work, exp_avg, exp_avg_sq, max_exp_avg_sq,
           step, step_t, lr, lr_t, beta1, beta2, eps, weight_decay, maximize, impl, trusted=False,
           bumped=False) -> None:
    t = table(table_h)
    if not trusted:
        _check("masked_adamw_step_", t, first, last, grad, grads_in_flat, work, impl,
               {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "max_exp_avg_sq": max_exp_avg_sq, "master": master})
    capturable = step_t is not None
    if _triton_for(t, impl, kernel):
        masked_adamw_triton = _launcher("adamw_triton", "masked_adamw_triton")
        grad_flat, grad_addr = _triton_grads(t, first, last, grad, grads_in_flat)
        bt = t.block_table()
        param_addr = t.addresses()[0]
        if capturable:
            s = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=1)
            dev = (step_t, lr_t, lr, _log(beta1), _log(beta2))
        else:
            s, dev = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step), None
        masked_adamw_triton(bt, bt.blocks_of(first, last), param_addr, grad_addr, t.mem_index, grad_flat, exp_avg,
                            exp_avg_sq, max_exp_avg_sq, master, s, param_dtype=t.params[first].dtype,
                            maximize=maximize, capturable=dev, weight_decay=weight_decay)
        if not bumped:
            t.bump_versions(first, last)
        return

    def update(values, grads, lo, hi):
        sl = slice(lo, hi)
        mx = max_exp_avg_sq[sl] if max_exp_avg_sq is not None else None
        if capturable:
            adamw_update_capturable_(values, grads, exp_avg[sl], exp_avg_sq[sl], mx, step_t=step_t,
                                     lr=lr_t if lr_t is not None else lr, beta1=beta1, beta2=beta2, eps=eps,
                                     weight_decay=weight_decay, maximize=maximize)
        else:
            s = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
            adamw_update_(values, grads, exp_avg[sl], exp_avg_sq[sl], mx, s, maximize=maximize)

    _torch_run(t, first, last, grad, grads_in_flat, master, work, update)


# ---------------------------------------------------------------------- SGD
def _sgd(kernel, table_h, first, last, grad, grads_in_flat, master, work, momentum_buffer, lr, lr_t, momentum,
         dampening, weight_decay, nesterov, maximize, first_step, impl, trusted=False, bumped=False) -> None:
    t = table(table_h)
    if not trusted:
        _check("masked_sgd_step_", t, first, last, grad, grads_in_flat, work, impl,
               {"momentum_buffer": momentum_buffer, "master": master})
    if momentum != 0 and momentum_buffer is None:
        raise ValueError("masked_sgd_step_: momentum != 0 needs a momentum_buffer")
    if _triton_for(t, impl, kernel):
        masked_sgd_triton = _launcher("sgd_triton", "masked_sgd_triton")
        grad_flat, grad_addr = _triton_grads(t, first, last, grad, grads_in_flat)
        bt = t.block_table()
        masked_sgd_triton(bt, bt.blocks_of(first, last), t.addresses()[0], grad_addr, t.mem_index, grad_flat,
                          momentum_buffer if momentum != 0 else None, master, lr=lr, lr_t=lr_t, momentum=momentum,
                          dampening=dampening, nesterov=nesterov, weight_decay=weight_decay, maximize=maximize,
                          first_step=first_step, param_dtype=t.params[first].dtype, state_dtype=t.state_dtype)
        if not bumped:
            t.bump_versions(first, last)
        return

    def update(values, grads, lo, hi):
        sgd_update_(values, grads, momentum_buffer[lo:hi] if momentum != 0 else None,
                    lr=lr_t if lr_t is not None else lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                    weight_decay=weight_decay, maximize=maximize, first_step=first_step)

    _torch_run(t, first, last, grad, grads_in_flat, master, work, update)


masked_adamw_step_ = library.define("masked_adamw_step_", ADAMW_SCHEMA, fake=_fake,
                                    default=functools.partial(_adamw, "default"),
                                    doc="masked AdamW step of a run of tensors (fused Triton kernel on CUDA)")
masked_sgd_step_ = library.define("masked_sgd_step_", SGD_SCHEMA, fake=_fake, default=functools.partial(_sgd, "default"),
                                  doc="masked SGD step of a run of tensors (fused Triton kernel on CUDA)")
library.register_kernel("masked_adamw_step_", "cuda", functools.partial(_adamw, "cuda"))
library.register_kernel("masked_sgd_step_", "cuda", functools.partial(_sgd, "cuda"))


def _eager(op, kernel):
    """``op``, callable as ``f(device, *args)``, for the optimizers' step: in eager mode it calls the
    kernel the dispatcher would pick for ``device`` directly — turning this schema's ~20 arguments
    into dispatcher values and back costs ~10 µs per call on the host, more than the CUDA kernel
    itself — and skips the argument checks (the optimizer made every buffer for its table);
    ``bumped``: the caller bumped the parameters' autograd versions already (ParamTable.commit). Under
    torch.compile tracing or a dispatch mode (FakeTensorMode, FlopCounterMode, ...) the call goes
    through the dispatcher, checks included."""

    def call(device: torch.device, *args, bumped: bool = False):
        if torch._C._len_torch_dispatch_stack() or torch.compiler.is_compiling():
            return op(*args)
        return kernel("cuda" if device_type(device) == "cuda" else "default", *args, trusted=True, bumped=bumped)

    return call


masked_adamw_step_eager = _eager(masked_adamw_step_, _adamw)
masked_sgd_step_eager = _eager(masked_sgd_step_, _sgd)


def prepare_masked_adamw_step(device: torch.device, table_h: int, first: int, last: int, grad: Tensor | None,
                              grads_in_flat: bool, master: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor,
                              max_exp_avg_sq: Tensor | None, step_t: Tensor | None, lr_t: Tensor | None,
                              beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool, impl: str):
    """The steady state's ``masked_adamw_step_eager`` for one run, bound once: a callable
    ``run(step, lr) -> bool`` that launches the fused kernel with only the per-step scalars computed
    (the tables, buffers and constexprs stay bound), or None where this run does not take the Triton
    kernel (the default kernel's own work outweighs its host overhead). ``run`` returns False, and
    does nothing, when the eager shortcut does not apply to this call: under torch.compile tracing or
    a dispatch mode (the caller then makes the op call), or when dense gradients are not where this
    step's table check found them. The arguments are the op's (``lr`` and ``step`` excepted); the
    caller rebinds when any of them changes."""
    t = table(table_h)
    if not _triton_for(t, impl, "cuda" if device.type == "cuda" else "default"):
        return None
    from .adamw_triton import PreparedAdamW

    bt = t.block_table()
    param_addr, grad_addr = t.addresses()
    capturable = step_t is not None
    launch = PreparedAdamW(bt, bt.blocks_of(first, last), param_addr, None if grads_in_flat else grad_addr,
                           t.mem_index, grad if grads_in_flat else None, exp_avg, exp_avg_sq, max_exp_avg_sq,
                           master, param_dtype=t.params[first].dtype, maximize=maximize, capturable=capturable,
                           lr_tensor=lr_t, step_tensor=step_t,
                           log_betas=(_log(beta1), _log(beta2)) if capturable else (0.0, 0.0),
                           weight_decay=weight_decay, has_weight_decay=weight_decay != 0)
    one_minus_beta1, one_minus_beta2 = 1 - beta1, 1 - beta2
    dispatch_modes, compiling = torch._C._len_torch_dispatch_stack, torch.compiler.is_compiling

    def run(step: int, lr: float) -> bool:
        if dispatch_modes() or compiling() or not (grads_in_flat or t.take_clean(DENSE)):
            return False
        decay, step_size, bc2_sqrt = adamw_step_scalars(lr, beta1, beta2, weight_decay, 1 if capturable else step)
        launch(decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, lr if capturable else 0.0)
        return True

    return run
