"""Flat index tensors: their conventions (dtype, digest), validation of a user's indices, and the
translation of row-major indices into memory offsets. Shared by the mask, the optimizers, the
distributed helpers and the diff formats."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

INT32_LIMIT = 2**31


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 indices where they fit (half the memory), int64 for tensors of 2**31 entries or more."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


def update_digest(h: "hashlib._Hash", indices: Tensor, numel: int) -> None:
    """Feed one tensor's (size, sorted indices) into a running sha256, independent of index dtype."""
    h.update(int(numel).to_bytes(8, "little"))
    h.update(indices.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())


def indices_digest(indices: Tensor, numel: int) -> str:
    """A short, stable fingerprint of one parameter's mask (sorted indices + parameter size)."""
    h = hashlib.sha256(b"fishkern-mask-v1")
    update_digest(h, indices, numel)
    return h.hexdigest()[:32]


def check_mask_indices(param: Tensor, indices, where: str) -> Tensor:
    """Validate one parameter's flat indices and return them sorted, on the parameter's device.

    Unsorted indices are sorted (the optimizer state follows the sorted order); duplicated,
    negative or out-of-range indices are refused, so no entry can ever be updated twice.
    """
    if not isinstance(indices, Tensor):
        raise TypeError(f"{where}: mask indices must be a 1-D integer tensor, got {type(indices).__name__}")
    if indices.is_sparse or indices.layout != torch.strided:
        raise TypeError(f"{where}: mask indices must be a dense tensor, got layout {indices.layout}")
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        raise TypeError(
            f"{where}: mask indices must have an integer dtype, got {indices.dtype}"
            + (" (a boolean mask? pass mask.flatten().nonzero().squeeze(1))" if indices.dtype == torch.bool else "")
        )
    if indices.dim() != 1:
        raise ValueError(f"{where}: mask indices must be 1-D flat indices, got shape {tuple(indices.shape)}")
    if indices.device != param.device:
        raise ValueError(
            f"{where}: mask indices are on {indices.device} but the parameter is on {param.device}; "
            "move them with .to(param.device)"
        )
    numel = param.numel()
    out_dtype = index_dtype_for(numel)
    if indices.numel() == 0:
        return torch.empty(0, dtype=out_dtype, device=param.device)
    idx = indices.to(torch.int64)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= numel:
        bad = lo if lo < 0 else hi
        raise IndexError(
            f"{where}: mask index {bad} is out of range for a parameter of {numel} entries "
            f"(shape {tuple(param.shape)}); flat indices must lie in [0, {numel})"
        )
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        idx = torch.sort(idx).values
        dup = idx[1:] == idx[:-1]
        if bool(dup.any()):
            first = int(idx[1:][dup][0])
            raise ValueError(f"{where}: mask index {first} appears more than once; each entry may be selected once")
    return idx.to(out_dtype)


def is_dense_layout(shape, strides) -> bool:
    """True if the strides cover a contiguous memory block exactly once (any dim order)."""
    dims = sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def memory_offsets(indices: Tensor, param: Tensor) -> Tensor:
    """Translate row-major flat indices into element offsets in the parameter's memory block.

    Identical for contiguous parameters; differs for e.g. channels_last convolution weights.
    """
    if param.is_contiguous():
        return indices
    if not is_dense_layout(param.shape, param.stride()):
        raise ValueError(
            f"parameter of shape {tuple(param.shape)} with strides {param.stride()} does not cover its "
            "memory densely (an expanded or sliced view?); masked optimizers need dense parameters"
        )
    rem = indices.to(torch.int64)
    off = torch.zeros_like(rem)
    for size, stride in zip(reversed(param.shape), reversed(param.stride())):
        off += (rem % size) * stride
        rem = rem // size
    return off.to(indices.dtype)


def flat_memory_view(t: Tensor) -> Tensor:
    """A 1-D view over a dense tensor's memory block, in memory order."""
    if t.is_contiguous():
        return t.view(-1)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())
