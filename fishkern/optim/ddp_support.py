"""When the masked optimizers may gather a gradient during backward, under torch.distributed.

With ``free_dense_grads=True`` the optimizer copies a parameter's k gradient entries and frees its
dense ``.grad`` in a post-accumulate-grad hook. Under DistributedDataParallel that hook runs
*before* DDP's own hook on the same parameter and long before DDP writes the averaged gradient back
(at the end of the outermost backward — after every nested backward of reentrant activation
checkpointing, and only outside ``no_sync()``): gathering there takes the rank's local gradient and
hands DDP an empty ``.grad``, so every rank trains on its own gradient, silently.

So in a process with an initialised process group, a plain parameter's gradient is *not* gathered
in the hook: ``.grad`` stays as DDP leaves it, and ``step()`` / ``clip_grad_norm_`` gather the k
entries from it (by then reduced) and free it. That needs no knowledge of which DDP module reduces
what, nor of checkpointing, ``no_sync`` or re-wrapping, and it costs no memory compared with
gathering at the end of backward (only clipping lies between). Gathering in the hook stays on where
it is known to be right:

- no process group (one process);
- sharded (DTensor) parameters: FSDP2 runs the hook after its reduce-scatter has written the
  reduced shard;
- parameters registered as reduced by fishkern itself, not by DDP (``mark_locally_reduced``:
  SparseAverager's local-SGD setting, where each rank trains on its own gradient by design).
"""
from __future__ import annotations

import gc
from collections.abc import Iterable

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_locally_reduced: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> True


def mark_locally_reduced(params: Iterable[Tensor]) -> None:
    """These parameters' gradients are never reduced by DDP (e.g. local SGD with SparseAverager):
    a masked optimizer may gather and free them during backward, also in a process group."""
    for p in params:
        _locally_reduced[p] = True


def distributed_initialized() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()


def gather_in_backward(p: Tensor, sharded: bool) -> bool:
    """Whether the post-accumulate-grad hook may gather and free ``p``'s gradient now."""
    return sharded or p in _locally_reduced or not distributed_initialized()


def ddp_managed() -> set[int]:
    """ids of the parameters that live DistributedDataParallel modules reduce (one scan of the
    garbage collector's objects). Used at construction only, for a clear error."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        return set()
    ids: set[int] = set()
    for o in gc.get_objects():
        if issubclass(type(o), DistributedDataParallel):  # type(): no __class__ lookups on odd objects
            ignored = getattr(o, "parameters_to_ignore", set()) or set()
            ids.update(id(q) for n, q in o.module.named_parameters() if n not in ignored)
    return ids
