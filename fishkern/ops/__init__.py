"""fishkern's op layer: every kernel is a ``torch.ops.fishkern.*`` op, declared once.

The data path, bottom up:

=========================  ===============================================  =========================
op                         what it does                                     kernels
=========================  ===============================================  =========================
``topk_select``            exact global top-k over many score tensors       default (radix select),
                           (``fishkern.topk``)                              CPU + CUDA (C++)
``linear_fisher_acc_``     a Linear weight's diagonal Fisher over a batch   default (batched torch),
                           of sequences (``linear_fisher.py``)              CUDA (Triton)
``conv2d_fisher_acc_``     a Conv2d (and Conv1d) weight's diagonal Fisher   default (grouped conv /
                           over a batch (``conv_fisher.py``)                unfold+GEMM, per layer),
                                                                            CUDA (Triton)
``sampled_matmul``         a weight gradient at the masked entries only     default (gathered torch),
                           (aᵀ·b sampled, SDDMM; ``sampled_matmul.py``)     CPU (C++, tiled), CUDA
                                                                            (Triton)
``sampled_embedding_grad`` an embedding's gradient at the masked entries   default (torch, rows of
                           of the batch's rows (``sampled_embedding.py``)   the batch only)
``gather_masked``,         the masked entries of many tensors to / from a   default (per tensor),
``scatter_masked_``        flat buffer (``masked_copy.py``)                 CPU (C++, threaded)
``masked_adamw_step_``,    one optimizer step of a run of tensors           default (vectorised torch),
``masked_sgd_step_``       (``masked_step.py``, over a ``ParamTable``)      CUDA (fused Triton)
=========================  ===============================================  =========================

``library.py`` declares them (schema, fake, default kernel) and registers the device kernels; the
dispatcher picks the kernel by the tensors' device. Nothing here imports triton or touches CUDA at
import: the Triton modules (``*_triton.py``) are imported by the CUDA kernels on first use.
``all_ops()`` imports every op module and lists the ops (tests run ``torch.library.opcheck`` on each).
"""
from __future__ import annotations

import importlib

# modules that declare ops, in data-path order
OP_MODULES = (
    "fishkern.topk.ops",
    "fishkern.ops.linear_fisher",
    "fishkern.ops.conv_fisher",
    "fishkern.ops.sampled_matmul",
    "fishkern.ops.sampled_embedding",
    "fishkern.ops.masked_copy",
    "fishkern.ops.masked_step",
)


def all_ops() -> dict[str, str]:
    """Every fishkern op (name -> one line), after importing the modules that declare them."""
    from . import library

    for name in OP_MODULES:
        importlib.import_module(name)
    return library.defined_ops()
