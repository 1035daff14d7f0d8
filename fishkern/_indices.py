"""Conventions for flat index tensors, shared by the mask and the optimizers."""
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
