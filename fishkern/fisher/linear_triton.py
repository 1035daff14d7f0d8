"""Compatibility names for the sequence-Linear Fisher kernels, which now live in ``fishkern.ops``:
the op ``fishkern::linear_fisher_acc_`` (``fishkern/ops/linear_fisher.py``: schema, fake, default
PyTorch kernel) and its Triton kernel (``fishkern/ops/linear_fisher_triton.py``, registered for CUDA).

``linear_fisher_triton_`` calls the Triton kernel directly (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1); ``linear_fisher_reference`` is the float64 oracle. Importing this module does not
import triton.
"""
from __future__ import annotations

from ..ops.linear_fisher import linear_fisher_reference, linear_fisher_triton_

__all__ = ["linear_fisher_reference", "linear_fisher_triton_"]
