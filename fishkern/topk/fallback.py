"""Exact global top-k in plain PyTorch, for installations without the native kernel for a device.

Same answer as the native op, bit for bit: the k largest scores over all tensors, ties at the
threshold to the lowest global flat index, -0.0 equal to 0.0, ±inf ordered as numbers, NaN an
error. Never concatenates the scores: each float32 is mapped to an order-preserving 32-bit key,
the k-th largest key is found by a two-pass radix select on 16-bit digits (a histogram of the high
half over all tensors, then of the low half inside the chosen bucket), and a last pass per tensor
takes everything above the threshold plus the first ties in index order. Works on any device torch
supports; peak extra memory is several int64 copies of the largest single tensor (about 6-8× its
fp32 size), not of all scores. Slow with very many small tensors (a few bincounts each).
"""
from __future__ import annotations

import torch
from torch import Tensor

_DIGIT = 16
_BUCKETS = 1 << _DIGIT


def _keys(s: Tensor) -> Tensor:
    """Order-preserving keys in [0, 2**32) (int64) for a float32 tensor; NaN is checked by the caller."""
    s = s.reshape(-1)
    s = torch.where(s == 0, torch.zeros((), dtype=s.dtype, device=s.device), s)  # -0.0 ranks as +0.0
    bits = s.view(torch.int32).to(torch.int64)
    # negative floats: flip the magnitude bits so that larger magnitudes give smaller keys
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return keys + (1 << 31)


def _kth_largest_key(scores: list[Tensor], k: int) -> tuple[int, int]:
    """(the k-th largest key T, how many keys equal T are selected)."""
    hist = None
    for s in scores:
        h = torch.bincount(_keys(s) >> _DIGIT, minlength=_BUCKETS)
        hist = h if hist is None else hist + h
    # counts of keys >= each bucket's start, from the top
    above = hist.flip(0).cumsum(0).flip(0)
    high = int((above >= k).nonzero().max())  # the highest bucket whose suffix count reaches k
    need = k - (int(above[high + 1]) if high + 1 < _BUCKETS else 0)
    hist = None
    for s in scores:
        keys = _keys(s)
        low = keys[(keys >> _DIGIT) == high] & (_BUCKETS - 1)
        h = torch.bincount(low, minlength=_BUCKETS)
        hist = h if hist is None else hist + h
    above = hist.flip(0).cumsum(0).flip(0)
    low = int((above >= need).nonzero().max())
    taken_above = int(above[low + 1]) if low + 1 < _BUCKETS else 0
    return (high << _DIGIT) | low, need - taken_above


class NaNScoresError(ValueError, RuntimeError):
    """Scores containing NaN. Both a ValueError (what this selection always raised) and a
    RuntimeError (what the native kernels and every torch op raise), so callers catching either
    catch it from every kernel."""


def global_topk_torch(scores: list[Tensor], k: int) -> list[Tensor]:
    """Per tensor, the sorted int64 flat indices of its entries among the k largest of all.

    `scores` are float32 tensors on one device, 0 <= k <= their total size (checked by
    fishkern.topk.ops before this runs)."""
    if scores:  # one host sync for the NaN check of every tensor
        nan = torch.stack([torch.isnan(s).any() for s in scores])
        if bool(nan.any()):
            i = int(nan.nonzero()[0, 0])
            raise NaNScoresError(f"global_topk: score tensor {i} contains NaN; scores must be numbers (±inf are allowed)")
    if k == 0:
        return [torch.empty(0, dtype=torch.int64, device=s.device) for s in scores]
    threshold, ties = _kth_largest_key(scores, k)
    out = []
    for s in scores:
        keys = _keys(s)
        take = keys > threshold
        if ties > 0:
            equal = (keys == threshold).nonzero().reshape(-1)
            first = equal[:ties]  # nonzero() is in index order: the lowest global indices win
            ties -= first.numel()
            take[first] = True
        out.append(take.nonzero().reshape(-1))
    return out
