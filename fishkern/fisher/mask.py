"""Model + data + density → FishMask in one call."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from ..mask import FishMask
from ..mask.builders import check_selection, from_scores
from .estimator import estimate_fisher


def fisher_mask(
    model: nn.Module,
    data: Iterable,
    density: float | None = None,
    num_samples: int = 1024,
    *,
    k: int | None = None,
    force: Sequence[str] | str = (),
    exclude: Sequence[str] | str = (),
    **fisher_kwargs,
) -> FishMask:
    """The FISH mask of a model: Fisher scores over `num_samples` samples of `data`
    (see `estimate_fisher` for the data format and options), then the k = ⌊density × all
    parameters⌋ largest scores, with the parameters matching `force` (e.g. "classifier", the new
    head) included entirely inside k. Frozen parameters (requires_grad=False) count in "all
    parameters" but are never selected. The mask's provenance records the Fisher settings.

    Only what `force` names is forced in (`fishkern.integrations.fish_mask_for` forces the head by
    the builders' head rule); every `force` / `exclude` pattern must match a parameter, and a density
    must give k ≥ 1 (an explicit `k=0` is allowed).

    Every argument that can be checked without scores is checked before the Fisher pass."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    check_selection(
        {n: tuple(p.shape) for n, p in named}, density, k, force, exclude,
        frozen=[n for n, p in named if not p.requires_grad],
    )
    result = estimate_fisher(model, data, num_samples, **fisher_kwargs)
    scores, frozen = {}, []
    for name, p in model.named_parameters():
        if name in result.scores:
            scores[name] = result.scores[name].float()  # the top-k ranks fp32 scores
        else:
            scores[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            frozen.append(name)
    excluded = ([exclude] if isinstance(exclude, str) else list(exclude)) + frozen
    provenance = {
        "fisher_kind": result.kind,
        "fisher_samples": result.num_samples,
        "fisher_implementation": result.implementation,
        "fisher_seconds": round(result.seconds, 3),
    }
    return from_scores(scores, density, k=k, force=force, exclude=excluded, provenance=provenance)
