"""Native multi-tensor gather / scatter of masked entries (csrc/masked_copy_cpu.cpp): the data
movement of the masked optimizers' CPU path, one threaded call per run of tensors instead of one
index_select / index_put_ per parameter. Exact: values are copied (and rounded to nearest-even
when written into bf16/fp16 parameters, as Tensor.to does)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._native import require_native

_FAKES = False


def _ops():
    global _FAKES
    require_native("the masked gather/scatter")
    if not _FAKES:

        @torch.library.register_fake("fishkern::gather_masked")
        def _(srcs, index, begins, ends, out):
            return None

        @torch.library.register_fake("fishkern::scatter_masked_")
        def _(dsts, index, begins, ends, values):
            return None

        _FAKES = True
    return torch.ops.fishkern


def gather_masked(srcs: list[Tensor], index: Tensor, begins: list[int], ends: list[int], out: Tensor) -> None:
    """out[e] = srcs[i].flat_memory[index[e]] for e in [begins[i], ends[i])."""
    if srcs:
        _ops().gather_masked(srcs, index, begins, ends, out)


def scatter_masked_(dsts: list[Tensor], index: Tensor, begins: list[int], ends: list[int], values: Tensor) -> None:
    """dsts[i].flat_memory[index[e]] = values[e] for e in [begins[i], ends[i])."""
    if dsts:
        _ops().scatter_masked_(dsts, index, begins, ends, values)
