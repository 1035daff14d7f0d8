"""Plain-PyTorch reference of the global top-k selection, for tests (memory: several copies of
all scores in float64; use the native op for real sizes)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def global_topk_reference(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """The k largest scores over all tensors, ties to the lowest global flat index, per-tensor sorted
    flat indices (int64). Explicit rule: a stable descending sort of the float64 concatenation."""
    flat = [s.detach().reshape(-1).to("cpu", torch.float64) for s in scores]
    cat = torch.cat(flat) if flat else torch.empty(0, dtype=torch.float64)
    if torch.isnan(cat).any():
        raise ValueError("NaN score")
    cat = torch.where(cat == 0, torch.zeros_like(cat), cat)  # -0.0 ranks as +0.0
    order = torch.sort(cat, descending=True, stable=True).indices[:k]
    chosen = torch.sort(order).values
    out, start = [], 0
    bounds = torch.tensor([f.numel() for f in flat], dtype=torch.int64).cumsum(0)
    for i, f in enumerate(flat):
        end = int(bounds[i])
        lo = int(torch.searchsorted(chosen, start))
        hi = int(torch.searchsorted(chosen, end))
        out.append(chosen[lo:hi] - start)
        start = end
    return out
