"""Native multi-tensor gather / scatter of masked entries (csrc/masked_copy_cpu.cpp): the data
movement of the masked optimizers' CPU path, one threaded call per run of tensors instead of one
index_select / index_put_ per parameter. Exact: values are copied (and rounded to nearest-even
when written into bf16/fp16 parameters, as Tensor.to does).

The native ops validate every argument themselves (they are public as ``torch.ops.fishkern.*``);
the fake (meta) implementations here check everything that does not need the index values."""
from __future__ import annotations

import torch
from torch import Tensor

from .._native import require_native

_FAKES = False
_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_meta(op: str, tensors_name: str, flat_name: str, tensors, index, begins, ends, flat) -> None:
    """The native op's checks that need no data (shapes, dtypes, devices, segments), with its messages."""
    n = len(tensors)
    torch._check(
        len(begins) == n and len(ends) == n,
        lambda: f"{op}: {tensors_name} has {n} tensors but begins has {len(begins)} and ends {len(ends)} entries; "
        "begins and ends must have one entry per tensor",
    )
    torch._check(index.dtype in (torch.int32, torch.int64), lambda: f"{op}: index has dtype {index.dtype}; expected int32 or int64")
    torch._check(index.dim() == 1, lambda: f"{op}: index must be a contiguous 1-D tensor, got shape {tuple(index.shape)}")
    torch._check(
        flat.dtype in (torch.float32, torch.float64), lambda: f"{op}: {flat_name} has dtype {flat.dtype}; expected float32 or float64"
    )
    torch._check(flat.dim() == 1, lambda: f"{op}: {flat_name} must be a contiguous 1-D tensor, got shape {tuple(flat.shape)}")
    torch._check(flat.device == index.device, lambda: f"{op}: {flat_name} is on {flat.device} but index on {index.device}")
    prev_end = 0
    for i, (t, b, e) in enumerate(zip(tensors, begins, ends)):
        torch._check(t.device == index.device, lambda: f"{op}: {tensors_name}[{i}] is on {t.device} but index on {index.device}")
        torch._check(
            t.dtype in _PARAM_DTYPES,
            lambda: f"{op}: {tensors_name}[{i}] has dtype {t.dtype}; expected float32, float64, bfloat16 or float16",
        )
        torch._check(
            0 <= b and b <= e and e <= index.numel() and e <= flat.numel(),
            lambda: f"{op}: segment {i} [begins[{i}], ends[{i}]) = [{b}, {e}) is outside the index / {flat_name} "
            f"buffers ({index.numel()} / {flat.numel()} entries) or reversed",
        )
        torch._check(
            prev_end <= b,
            lambda: f"{op}: segment {i} starts at {b} before segment {i - 1} ends ({prev_end}); "
            "segments must be in order and disjoint",
        )
        prev_end = e


def _ops():
    global _FAKES
    require_native("the masked gather/scatter")
    if not _FAKES:

        @torch.library.register_fake("fishkern::gather_masked")
        def _(srcs, index, begins, ends, out):
            _check_meta("gather_masked", "srcs", "out", srcs, index, begins, ends, out)

        @torch.library.register_fake("fishkern::scatter_masked_")
        def _(dsts, index, begins, ends, values):
            _check_meta("scatter_masked_", "dsts", "values", dsts, index, begins, ends, values)

        _FAKES = True
    return torch.ops.fishkern


def gather_masked(srcs: list[Tensor], index: Tensor, begins: list[int], ends: list[int], out: Tensor) -> None:
    """out[e] = srcs[i].flat_memory[index[e]] for e in [begins[i], ends[i])."""
    if srcs or begins or ends:  # nothing to do, but mismatched lists still get the op's error
        _ops().gather_masked(srcs, index, begins, ends, out)


def scatter_masked_(dsts: list[Tensor], index: Tensor, begins: list[int], ends: list[int], values: Tensor) -> None:
    """dsts[i].flat_memory[index[e]] = values[e] for e in [begins[i], ends[i])."""
    if dsts or begins or ends:
        _ops().scatter_masked_(dsts, index, begins, ends, values)
