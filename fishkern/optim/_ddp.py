"""How the masked optimizers learn that DistributedDataParallel reduces a parameter's gradient.

With ``free_dense_grads=True`` the optimizer copies a parameter's k gradient entries and frees its
dense ``.grad`` in a post-accumulate-grad hook. Under DDP that hook runs *before* DDP's own hook on
the same parameter, so gathering there would take the rank's local, unreduced gradient (and hand
DDP an empty ``.grad``): every rank would train on its own gradient, silently. For parameters a DDP
module reduces, the gather therefore waits until DDP has written the averaged gradient back into
``.grad``: the end of the backward pass, after DDP's own end-of-backward callback. Inside
``no_sync()`` nothing is gathered: DDP accumulates the local gradients in ``.grad`` and reduces the
sum at the next synchronised backward, where the gather then happens.

The optimizer knows which parameters DDP reduces from this registry: ``register_ddp(ddp)`` is
called by fishkern's DDP helpers (``fishkern.distributed.register_masked_comm_hook``,
``masked_ddp``) and by ``FishTrainer``; for DDP modules built by user code, the optimizer finds
them once (a scan of the garbage collector's objects, only in a multi-rank process group).
"""
from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_owner: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> weakref to its DDP module


def _ddp_class():
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        return None
    return DistributedDataParallel


def register_ddp(ddp) -> None:
    """Record that ``ddp`` (a DistributedDataParallel module) reduces its module's parameters."""
    ignored = getattr(ddp, "parameters_to_ignore", set()) or set()
    ref = weakref.ref(ddp)
    for name, p in ddp.module.named_parameters():
        if name not in ignored:
            _owner[p] = ref


def ddp_of(p: Tensor):
    """The live DDP module that reduces ``p``'s gradient, or None."""
    ref = _owner.get(p)
    ddp = ref() if ref is not None else None
    return ddp


def multi_rank() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def discover_ddp() -> int:
    """Register every live DDP module of this process; returns how many were found."""
    cls = _ddp_class()
    if cls is None:
        return 0
    found = [o for o in gc.get_objects() if issubclass(type(o), cls)]  # type(): no __class__ lookups
    for ddp in found:
        register_ddp(ddp)
    return len(found)


def reduces_this_backward(ddp) -> bool:
    """Whether DDP will reduce the gradients of the backward now running: its last forward ran
    outside ``no_sync()`` (DDP records that in ``require_forward_param_sync`` at forward time)."""
    flag = getattr(ddp, "require_forward_param_sync", None)
    return bool(ddp.require_backward_grad_sync if flag is None else flag)


def after_ddp_reduction(fn: Callable[[], None]) -> None:
    """Run ``fn`` at the end of the current backward pass, after DDP's end-of-backward callback.

    DDP queues its finalisation (wait for the all-reduces, write the reduced buckets into ``.grad``)
    on the autograd engine when the last bucket is ready, i.e. after some of our hooks have run. A
    callback queued now runs before it; one queued *from* that callback runs after every callback
    queued so far (the engine runs callbacks in order, including ones added while running), so
    after DDP's."""
    from torch.autograd import Variable

    engine = Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(fn))
