"""Distributed / federated FISH-mask training on torch.distributed (gloo on CPU, NCCL on GPU).

Two settings. Synchronous data parallel (DDP, FSDP2, torchrun, accelerate): every step's gradient
is averaged — ``masked_ddp`` / ``register_masked_comm_hook`` all-reduce only the k masked gradient
entries (ddp.py), ``fisher_mask_distributed`` computes one mask from a Fisher pass split across the
ranks (fisher.py), ``ShardedBatches`` gives each rank its rows of every global batch (loop.py); the
masked optimizers handle DDP's reduction order and FSDP2's DTensor shards themselves. Periodic
averaging (the paper's local-SGD / federated setting) is ``SparseAverager``, below.

M workers take H local steps on the same FISH mask, then exchange only the k masked values — one
flat buffer, one collective per exchange; the indices are shared and never travel — and average
(or sum) them. Importing this package initialises nothing and never touches CUDA.

    # torchrun --nproc-per-node 2 train.py
    import torch, fishkern
    from fishkern.distributed import SparseAverager, init_from_env, shutdown

    init_from_env(timeout=300)                         # a rank that hangs fails the others after 300 s
    model = build_model()
    avg = SparseAverager(model, None)                  # no mask yet: dense warm-up first
    avg.sync_parameters(src=0)                         # every rank starts from rank 0's weights
    for epoch in range(warmup_epochs):
        train_dense(model, ...); avg.dense_exchange()
    mask = fishkern.FishMask.from_scores(fisher(model), 0.005) if avg.rank == 0 else None
    mask = avg.set_mask(mask, broadcast_from=0)        # rank 0's mask, serialised and broadcast
    opt = fishkern.MaskedAdamW(model.named_parameters(), mask, lr=5e-5)
    for step in range(steps):
        train_step(model, opt, ...)
        if (step + 1) % H == 0:
            sent = avg.exchange()                      # 4·k bytes per rank in fp32
    print(avg.stats()); shutdown()

* ``SparseAverager(model, mask, op="mean"|"sum", mode="shared"|"disjoint",
  reduction="gather"|"allreduce", comm_dtype=None, timeout=None, optimizers=())`` — see its
  docstring (averager.py) for the exact arithmetic, and ``exchange()``, ``dense_exchange()``,
  ``set_mask(mask, broadcast_from=0)``, ``verify()``, ``sync_parameters()``,
  ``assert_in_sync()``, ``stats()``, ``state_dict()`` / ``load_state_dict()``.
* Determinism: with ``reduction="gather"`` (default) the values are all-gathered and summed in
  rank order locally, so every rank computes bit-identical results, equal to a single-process
  reference, for any number of ranks and any backend.
* Disjoint (per-worker) masks: each rank trains its own mask; the masks are all-gathered once
  when set; an exchange sends each rank's own values and writes the union on every rank —
  ``op="sum"`` merges the workers' updates (each applied in full), ``op="mean"`` averages the M
  full models (an untrained entry counts with its last synchronised value).
* Timeouts: collectives run with the averager's ``timeout`` or the process group's
  (``init_process_group(timeout=datetime.timedelta(seconds=...))``); a rank that dies or hangs
  gives ``CollectiveTimeoutError`` / ``CollectiveError`` naming the operation on the others.
* Optimizer state (moments, momentum) stays per worker, as in local SGD / FedAvg: only the
  parameters are averaged. With ``master_weights=True`` pass the optimizer in ``optimizers=`` so
  its fp32 masters follow the exchange.
"""
from .averager import SparseAverager
from .ddp import (
    MaskedCommState,
    comm_stats,
    masked_allreduce_hook,
    masked_bf16_compress_hook,
    masked_ddp,
    register_masked_comm_hook,
)
from .fisher import fisher_mask_distributed, samples_of_rank
from .loop import FisherSamples, ShardedBatches
from .errors import (
    CollectiveError,
    CollectiveMismatchError,
    ModelChangedError,
    CollectiveTimeoutError,
    ConfigMismatchError,
    DistributedError,
    MaskMismatchError,
)
from .launch import DistInfo, init_from_env, shutdown
from .masks import all_gather_masks, broadcast_mask, mask_from_tensors, mask_to_tensors

__all__ = [
    "SparseAverager",
    "masked_ddp",
    "register_masked_comm_hook",
    "masked_allreduce_hook",
    "masked_bf16_compress_hook",
    "MaskedCommState",
    "comm_stats",
    "fisher_mask_distributed",
    "samples_of_rank",
    "ShardedBatches",
    "FisherSamples",
    "broadcast_mask",
    "all_gather_masks",
    "mask_to_tensors",
    "mask_from_tensors",
    "init_from_env",
    "shutdown",
    "DistInfo",
    "DistributedError",
    "CollectiveTimeoutError",
    "CollectiveError",
    "CollectiveMismatchError",
    "ModelChangedError",
    "MaskMismatchError",
    "ConfigMismatchError",
]
