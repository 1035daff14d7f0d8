"""Multi-tensor gather / scatter of masked entries: the data movement of the masked optimizers and
of the distributed averager, one call for a run of tensors instead of one index_select /
index_put_ per tensor.

    gather_masked(srcs, index, begins, ends, out):     out[e] = srcs[i].flat_memory[index[e]]
    scatter_masked_(dsts, index, begins, ends, values): dsts[i].flat_memory[index[e]] = values[e]

for every e in [begins[i], ends[i]) (tensor i's segment of the flat buffers). ``index`` holds
offsets into each tensor's dense memory block (int32 or int64), ``out`` / ``values`` are flat
float32 / float64 buffers, the tensors float32, float64, bfloat16 or float16 (written values are
rounded to nearest-even, as Tensor.to does). Exact: no arithmetic.

Declared here once (``fishkern::gather_masked``, ``fishkern::scatter_masked_``) with their fakes and
a ``default`` kernel in plain PyTorch (per-tensor index_select / index_put_) that runs on any
device; the native extension adds threaded CPU kernels (csrc/masked_copy_cpu.cpp), registered when
the wrappers below first run. Every kernel checks every argument (the ops are public as
``torch.ops.fishkern.*``) with the same messages, and every index before anything is written
(the native gather checks block by block: a bad call may leave ``out`` partly written).
The default kernel's index check costs one device-to-host synchronisation per call on a GPU.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from .._native import ensure_loaded
from . import library

_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_meta(op: str, tensors_name: str, flat_name: str, tensors, index, begins, ends, flat) -> None:
    """The checks that need no data (shapes, dtypes, devices, segments), with the native kernels' messages."""
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


def _byte_range(t: Tensor) -> tuple[int, int]:
    # exact for the dense tensors checked below: they cover [data_ptr, data_ptr + nbytes)
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _overlap(a: Tensor, b: Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < b1 and b0 < a1


def _non_overlapping_and_dense(t: Tensor) -> bool:
    """Whether t covers a block of memory exactly once (contiguous in some dimension order), as
    at::Tensor::is_non_overlapping_and_dense."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _memory(t: Tensor) -> Tensor:
    """A dense tensor's memory block as a 1-D view (offset j = the j-th element in memory order)."""
    return t.as_strided((t.numel(),), (1,))


def _check_data(op: str, tensors_name: str, flat_name: str, writes_tensors: bool, tensors, index, begins, ends, flat) -> None:
    """Everything the native kernels check, for the default kernel: the meta checks, the layouts, no
    written tensor overlapping the index, and every index inside its tensor (one host sync)."""
    _check_meta(op, tensors_name, flat_name, tensors, index, begins, ends, flat)
    torch._check(index.is_contiguous(), lambda: f"{op}: index must be a contiguous 1-D tensor, got shape "
                 f"{tuple(index.shape)} with strides {index.stride()}")
    torch._check(flat.is_contiguous(), lambda: f"{op}: {flat_name} must be a contiguous 1-D tensor, got shape "
                 f"{tuple(flat.shape)} with strides {flat.stride()}")
    # a write into the index while it is being read would turn later indices into garbage
    if not writes_tensors:
        torch._check(not _overlap(flat, index),
                     lambda: f"{op}: {flat_name} shares memory with index; the written tensor must not overlap the index")
    for i, t in enumerate(tensors):
        torch._check(_non_overlapping_and_dense(t), lambda: f"{op}: {tensors_name}[{i}] must be non-overlapping "
                     f"and dense (contiguous or a permutation of it), got shape {tuple(t.shape)} with strides {t.stride()}")
        if writes_tensors:
            torch._check(not _overlap(t, index), lambda: f"{op}: {tensors_name}[{i}] shares memory with index; "
                         "the written tensor must not overlap the index")
    live = [(i, b, e) for i, (b, e) in enumerate(zip(begins, ends)) if e > b]
    if not live:
        return
    # a few whole-buffer ops and one host sync, whatever the number of tensors
    if all(live[m][2] == live[m + 1][1] for m in range(len(live) - 1)):  # no gaps (the usual layout)
        entries = index[live[0][1] : live[-1][2]]
    else:
        entries = torch.cat([index[b:e] for _, b, e in live])
    lengths = torch.tensor([e - b for _, b, e in live], device=index.device)
    limits = torch.tensor([tensors[i].numel() for i, _, _ in live], device=index.device, dtype=torch.int64)
    outside = (entries < 0) | (entries >= torch.repeat_interleave(limits, lengths, output_size=entries.numel()))
    if not bool(outside.any()):
        return
    first = int(outside.nonzero()[0, 0])
    for i, b, e in live:  # the first entry outside its tensor, in index order (as the native kernels report)
        if first < e - b:
            numel = tensors[i].numel()
            torch._check(False, lambda: f"{op}: index[{b + first}] = {int(index[b + first])} is outside "
                         f"{tensors_name}[{i}], which has {numel} elements; the indices of segment {i} must lie in "
                         f"[0, {numel})")
        first -= e - b


def _gather_fake(srcs, index, begins, ends, out):
    _check_meta("gather_masked", "srcs", "out", srcs, index, begins, ends, out)


def _scatter_fake(dsts, index, begins, ends, values):
    _check_meta("scatter_masked_", "dsts", "values", dsts, index, begins, ends, values)


def gather_masked_default(srcs: list[Tensor], index: Tensor, begins: list[int], ends: list[int], out: Tensor) -> None:
    """The default kernel of fishkern::gather_masked: one index_select per tensor (any device)."""
    _check_data("gather_masked", "srcs", "out", False, srcs, index, begins, ends, out)
    for t, b, e in zip(srcs, begins, ends):
        if e > b:
            out[b:e].copy_(_memory(t).index_select(0, index[b:e]))  # copy_ widens / rounds like Tensor.to


def scatter_masked_default(dsts: list[Tensor], index: Tensor, begins: list[int], ends: list[int], values: Tensor) -> None:
    """The default kernel of fishkern::scatter_masked_: one index_put_ per tensor (any device)."""
    _check_data("scatter_masked_", "dsts", "values", True, dsts, index, begins, ends, values)
    for t, b, e in zip(dsts, begins, ends):
        if e > b:
            _memory(t).index_put_((index[b:e],), values[b:e].to(t.dtype))


_GATHER = library.define(
    "gather_masked",
    "(Tensor[] srcs, Tensor index, int[] begins, int[] ends, Tensor(a!) out) -> ()",
    fake=_gather_fake,
    default=gather_masked_default,
    doc="out[e] = srcs[i].flat_memory[index[e]] for e in [begins[i], ends[i]) (masked entries -> flat buffer)",
)
_SCATTER = library.define(
    "scatter_masked_",
    "(Tensor(a!)[] dsts, Tensor index, int[] begins, int[] ends, Tensor values) -> ()",
    fake=_scatter_fake,
    default=scatter_masked_default,
    doc="dsts[i].flat_memory[index[e]] = values[e] for e in [begins[i], ends[i]) (flat buffer -> masked entries)",
)


def _bump_versions_of(op, arg: int):
    """An ADInplaceOrView kernel: bump the autograd version of the written argument, as every
    in-place torch op does (the native kernels write through raw pointers, below autograd), so that
    autograd notices tensors it saved being overwritten; then run the kernel for the device."""
    after = torch._C._after_ADInplaceOrView_keyset

    def kernel(keyset, *args):
        increment_version(args[arg])
        return op.redispatch(keyset & after, *args)

    return kernel


_VERSIONS = torch.library.Library(library.NAMESPACE, "IMPL")
for _name, _op, _arg in (("gather_masked", _GATHER, 4), ("scatter_masked_", _SCATTER, 0)):
    if not library.has_kernel(_name, "ADInplaceOrView"):  # once per process
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Warning only once for all operators", category=UserWarning)
            _VERSIONS.impl(_name, _bump_versions_of(_op, _arg), "ADInplaceOrView", with_keyset=True)


def _ops():
    """torch.ops.fishkern, with the native kernels registered where this installation has them."""
    ensure_loaded()
    return torch.ops.fishkern


def gather_masked(srcs: list[Tensor], index: Tensor, begins: list[int], ends: list[int], out: Tensor) -> None:
    """out[e] = srcs[i].flat_memory[index[e]] for e in [begins[i], ends[i])."""
    if srcs or begins or ends:  # nothing to do, but mismatched lists still get the op's error
        ensure_loaded()
        _GATHER(srcs, index, begins, ends, out)


def scatter_masked_(dsts: list[Tensor], index: Tensor, begins: list[int], ends: list[int], values: Tensor) -> None:
    """dsts[i].flat_memory[index[e]] = values[e] for e in [begins[i], ends[i])."""
    if dsts or begins or ends:
        ensure_loaded()
        _SCATTER(dsts, index, begins, ends, values)
