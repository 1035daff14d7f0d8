"""Model + data + method → mask in one call: the one switch between dense, FISH, random and BitFit.

`make_mask` is the only place that maps a method name to its mask; `fisher_mask` (FISH only),
`fishkern.finetune.select_mask` (the fine-tuning loop's head rule on top) and `fishkern cifar`
(its ResNet's ``fc`` head, per-run seeds) call it. It lives in the fisher layer because the FISH
branch needs the Fisher estimate; the builders it calls are the mask layer's (no Fisher there).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..mask import FishMask
from ..mask.builders import bitfit_mask, check_selection, from_scores, random_mask
from .estimator import FisherResult, estimate_fisher

MASK_METHODS = ("dense", "fish", "random", "bitfit")


def model_scores(model: nn.Module, result: FisherResult) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The score of every parameter of ``model`` for the top-k (fp32; zeros for the parameters the
    estimate skipped: the frozen ones), and the names of those skipped parameters (to exclude)."""
    scores, frozen = {}, []
    where = next(iter(result.scores.values())).device  # the scores may live off the model (scores_device)
    for name, p in model.named_parameters():
        if name in result.scores:
            scores[name] = result.scores[name].float()  # the top-k ranks fp32 scores
        else:
            scores[name] = torch.zeros(p.shape, dtype=torch.float32, device=where)
            frozen.append(name)
    return scores, frozen


def fisher_provenance(result: FisherResult) -> dict[str, Any]:
    """What a FISH mask records about the Fisher estimate it was selected from."""
    return {
        "fisher_kind": result.kind,
        "fisher_samples": result.num_samples,
        "fisher_implementation": result.implementation,
        "fisher_seconds": round(result.seconds, 3),
    }


def make_mask(
    model: nn.Module,
    method: str,
    density: float | None = None,
    *,
    k: int | None = None,
    data: Iterable | None = None,
    num_samples: int = 1024,
    force: Sequence[str] | str = (),
    exclude: Sequence[str] | str = (),
    seed: int = 0,
    provenance: Mapping | None = None,
    **fisher_kwargs,
) -> tuple[FishMask | None, FisherResult | None]:
    """The mask of ``method`` for ``model`` and, for FISH, the Fisher result it came from.

    - ``"dense"``: ``(None, None)`` (every parameter trains; no mask).
    - ``"fish"``: Fisher scores over ``num_samples`` samples of ``data`` (``estimate_fisher``'s
      format; ``seed`` and ``fisher_kwargs`` go to it), then the k = ⌊density × all parameters⌋
      largest (or an explicit ``k``). Every check that needs no scores runs before the Fisher pass.
      Frozen parameters count in "all parameters" but are never selected.
    - ``"random"``: the same budget, entries drawn uniformly with ``seed``.
    - ``"bitfit"``: every bias plus ``force`` (``density`` / ``k`` are not used).

    ``force``: the parameters included entirely, counted inside k (patterns or names; every pattern
    must match). No head rule is applied here: callers resolve their head first (``head_names`` for
    a Hugging Face classifier, ``"fc"`` for a ResNet) and pass it, or ``()`` for none. ``exclude``
    (fish, random): never selected. ``provenance``: extra entries recorded on the mask."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in MASK_METHODS:
        raise ValueError(f"method must be one of {MASK_METHODS}, got {method!r}")
    if method == "dense":
        return None, None
    if method == "bitfit":
        if exclude:
            raise ValueError("exclude= does not apply to BitFit (every bias is trained); pass it for fish or random")
        return bitfit_mask(model, head=force, provenance=provenance), None
    if method == "random":
        return random_mask(model, density, k=k, seed=seed, force=force, exclude=exclude, provenance=provenance), None
    if data is None:
        raise ValueError("the FISH mask needs data for the Fisher estimate (data=)")
    named = list(model.named_parameters())
    check_selection(
        {n: tuple(p.shape) for n, p in named}, density, k, force, exclude,
        frozen=[n for n, p in named if not p.requires_grad],
    )
    result = estimate_fisher(model, data, num_samples, seed=seed, **fisher_kwargs)
    scores, frozen = model_scores(model, result)
    excluded = ([exclude] if isinstance(exclude, str) else list(exclude)) + frozen
    prov = {**fisher_provenance(result), **(provenance or {})}
    return from_scores(scores, density, k=k, force=force, exclude=excluded, provenance=prov), result


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

    Every argument that can be checked without scores is checked before the Fisher pass.
    (`make_mask(model, "fish", ...)`, which also returns the Fisher result.)"""
    return make_mask(model, "fish", density, k=k, data=data, num_samples=num_samples, force=force, exclude=exclude,
                     **fisher_kwargs)[0]
