"""``fishkern::sampled_embedding_grad``: an embedding table's weight gradient at chosen entries only,

    out[e] = sum_{t: ids[t] == v_e} grad[t, d_e]      (v_e, d_e) = divmod(index[e], D)

scaled by 1 / count(v_e) with ``scale_grad_by_freq`` and 0 at ``padding_idx`` rows (-1: none), as
``nn.Embedding``'s backward has it. Only the rows present in the batch are summed (a U x D buffer,
U = distinct ids, never the V x D table), and entries of absent rows are 0. float32 sums for
float32 / bfloat16 / float16 gradients, float64 for float64.

One kernel, ``default`` (plain PyTorch, any device: ``unique`` + ``index_add_`` + ``searchsorted``,
O(T·D + k log U)). Importing this module declares the op; it never touches CUDA.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import library
from .sampled_matmul import INDEX_DTYPES, OPERAND_DTYPES, accumulation_dtype

NAME = "sampled_embedding_grad"
SCHEMA = "(Tensor ids, Tensor grad, Tensor index, int num_rows, int padding_idx=-1, bool scale_grad_by_freq=False) -> Tensor"
ID_DTYPES = (torch.int32, torch.int64)


def check_arguments(ids: Tensor, grad: Tensor, index: Tensor, num_rows: int, padding_idx: int) -> None:
    op = f"fishkern::{NAME}"
    torch._check(ids.dim() == 1, lambda: f"{op}: ids must be 1-D (the flattened token ids), got shape {tuple(ids.shape)}")
    torch._check(ids.dtype in ID_DTYPES, lambda: f"{op}: ids have dtype {ids.dtype}; expected int32 or int64")
    torch._check(
        grad.dim() == 2 and grad.shape[0] == ids.shape[0],
        lambda: f"{op}: grad must be [tokens, dim] with one row per id, got {tuple(grad.shape)} for {ids.shape[0]} ids",
    )
    torch._check(grad.dtype in OPERAND_DTYPES, lambda: f"{op}: grad has dtype {grad.dtype}; expected a float dtype")
    torch._check(index.dtype in INDEX_DTYPES and index.dim() == 1,
                 lambda: f"{op}: index must be a 1-D int32 / int64 tensor, got {index.dtype} {tuple(index.shape)}")
    torch._check(num_rows >= 0, lambda: f"{op}: num_rows must be >= 0, got {num_rows}")
    torch._check(-1 <= padding_idx < max(num_rows, 1), lambda: f"{op}: padding_idx {padding_idx} is outside [-1, {num_rows})")
    torch._check(
        ids.device == grad.device == index.device,
        lambda: f"{op}: ids, grad and index must be on one device, got {ids.device}, {grad.device}, {index.device}",
    )


def _fake(ids, grad, index, num_rows, padding_idx=-1, scale_grad_by_freq=False):
    check_arguments(ids, grad, index, num_rows, padding_idx)
    return grad.new_empty((index.shape[0],), dtype=accumulation_dtype(grad.dtype))


def sampled_embedding_grad_default(ids: Tensor, grad: Tensor, index: Tensor, num_rows: int, padding_idx: int = -1,
                                   scale_grad_by_freq: bool = False) -> Tensor:
    check_arguments(ids, grad, index, num_rows, padding_idx)
    dim, acc = grad.shape[1], accumulation_dtype(grad.dtype)
    numel = num_rows * dim
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise RuntimeError(f"fishkern::{NAME}: an index is outside the {num_rows} x {dim} table ({numel} entries)")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_rows):
        raise RuntimeError(f"fishkern::{NAME}: an id is outside [0, {num_rows})")
    out = torch.zeros(index.numel(), dtype=acc, device=grad.device)
    if index.numel() == 0 or ids.numel() == 0:
        return out
    uniq, inverse, counts = torch.unique(ids.to(torch.int64), return_inverse=True, return_counts=True)
    sums = torch.zeros(uniq.numel(), dim, dtype=acc, device=grad.device).index_add_(0, inverse, grad.to(acc))
    if scale_grad_by_freq:
        sums /= counts.to(acc)[:, None]
    if padding_idx >= 0:
        sums[uniq == padding_idx] = 0
    flat = index.to(torch.int64)
    rows = torch.div(flat, dim, rounding_mode="floor")
    pos = torch.searchsorted(uniq, rows).clamp_(max=uniq.numel() - 1)
    present = uniq.index_select(0, pos) == rows
    vals = sums.view(-1).index_select(0, pos * dim + (flat - rows * dim))
    return torch.where(present, vals, out)


OP = library.define(NAME, SCHEMA, fake=_fake, default=sampled_embedding_grad_default,
                    doc="an embedding table's gradient at chosen entries, rows of the batch only")


def sampled_embedding_grad(ids: Tensor, grad: Tensor, index: Tensor, num_rows: int, padding_idx: int | None = None,
                           scale_grad_by_freq: bool = False) -> Tensor:
    """``torch.ops.fishkern.sampled_embedding_grad``: ``nn.Embedding``'s weight gradient for
    ``ids`` (flattened) and ``grad`` ([tokens, dim]) at the flat row-major ``index`` entries only."""
    return OP(ids, grad, index, num_rows, -1 if padding_idx is None else padding_idx, scale_grad_by_freq)


def sampled_embedding_grad_reference(ids: Tensor, grad: Tensor, index: Tensor, num_rows: int,
                                     padding_idx: int | None = None, scale_grad_by_freq: bool = False) -> Tensor:
    """torch's own embedding backward (dense V x D, float64), gathered: the oracle for tests."""
    dense = torch.ops.aten.embedding_dense_backward(grad.double(), ids, num_rows,
                                                    -1 if padding_idx is None else padding_idx, scale_grad_by_freq)
    return dense.reshape(-1).index_select(0, index.to(torch.int64))
