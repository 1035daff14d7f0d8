"""Ways to make a FishMask: from Fisher scores (FISH), random (baseline), BitFit, boolean masks.

Budget rule (the paper's, and its code's): k = ⌊density × all parameters⌋; parameters forced in
(e.g. the new classifier head) are included entirely and counted inside k; the rest of the budget
goes to the highest scores among the parameters that are neither forced nor excluded.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..topk import global_topk
from .fishmask import FishMask, ParamsLike, _numel, model_identity, named_shapes, new_mask


def match_names(names: Sequence[str], patterns: Sequence[str] | str) -> list[str]:
    """Names matching any pattern. A pattern is an fnmatch glob over the full name; a pattern without
    wildcards also matches a module prefix ("classifier" matches "classifier.weight")."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for n in names:
        for pat in patterns:
            if fnmatch.fnmatchcase(n, pat) or (not any(c in pat for c in "*?[") and n.startswith(pat + ".")):
                out.append(n)
                break
    return out


def budget(total: int, density: float | None, k: int | None) -> int:
    if (density is None) == (k is None):
        raise ValueError("give exactly one of density (fraction of all parameters) or k (number of entries)")
    if k is None:
        if not (isinstance(density, (int, float)) and 0.0 <= density <= 1.0) or math.isnan(density):
            raise ValueError(f"density must be a fraction in [0, 1], got {density!r}")
        return math.floor(density * total)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total:
        raise ValueError(f"k must be an integer in [0, {total}], got {k!r}")
    return k


def _split_forced(shapes, force, exclude) -> tuple[list[str], list[str]]:
    names = list(shapes)
    forced = match_names(names, force) if force else []
    excluded = match_names(names, exclude) if exclude else []
    both = sorted(set(forced) & set(excluded))
    if both:
        raise ValueError(f"parameters both forced in and excluded: {both[:5]}")
    competing = [n for n in names if n not in set(forced) and n not in set(excluded)]
    return forced, competing


def _select(shapes, forced, competing, scores: Sequence[Tensor], k: int, provenance) -> FishMask:
    forced_k = sum(_numel(shapes[n]) for n in forced)
    if forced_k > k:
        raise ValueError(
            f"the forced-in parameters ({forced[:3]}{'...' if len(forced) > 3 else ''}) hold {forced_k:,} entries, "
            f"more than the whole budget k = {k:,}; raise the density or force fewer parameters"
        )
    rest = k - forced_k
    available = sum(_numel(shapes[n]) for n in competing)
    if rest > available:
        raise ValueError(f"budget k = {k:,} exceeds the {forced_k + available:,} entries that may be selected")
    try:
        picked = global_topk(list(scores), rest)
    except RuntimeError as e:
        if "NaN" in str(e):
            bad = [n for n, s in zip(competing, scores) if torch.isnan(s).any()]
            raise ValueError(f"NaN Fisher scores in {bad[:5]}; the estimate is broken (check the loss)") from e
        raise
    selected = {n: i for n, i in zip(competing, picked)}
    for n in forced:
        selected[n] = torch.arange(_numel(shapes[n]), device=scores[0].device if scores else "cpu")
    return new_mask(shapes, selected, forced, provenance)


def from_scores(
    scores: Mapping[str, Tensor],
    density: float | None = None,
    *,
    k: int | None = None,
    force: Sequence[str] | str = (),
    exclude: Sequence[str] | str = (),
    provenance: Mapping | None = None,
) -> FishMask:
    """The FISH mask: the k entries with the largest Fisher scores.

    scores: {parameter name: fp32 score tensor of the parameter's shape} for EVERY parameter of the
        model (in model order). Its total size is the paper's "all parameters".
    density / k: the budget (k = ⌊density × all parameters⌋).
    force: patterns of parameters included entirely, counted inside k (e.g. "classifier").
    exclude: patterns of parameters never selected (they still count in "all parameters").
    """
    shapes = named_shapes(scores)
    k = budget(sum(_numel(s) for s in shapes.values()), density, k)
    forced, competing = _split_forced(shapes, force, exclude)
    prov = {"method": "fish", "density": density, "k": k, **(provenance or {})}
    return _select(shapes, forced, competing, [scores[n].detach() for n in competing], k, prov)


def random_mask(
    params: ParamsLike,
    density: float | None = None,
    *,
    k: int | None = None,
    seed: int = 0,
    force: Sequence[str] | str = (),
    exclude: Sequence[str] | str = (),
    provenance: Mapping | None = None,
) -> FishMask:
    """The random-mask baseline: the same budget rule, entries drawn uniformly (seeded, exact k)."""
    shapes = named_shapes(params)
    k = budget(sum(_numel(s) for s in shapes.values()), density, k)
    forced, competing = _split_forced(shapes, force, exclude)
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.rand(shapes[n], generator=gen) for n in competing]
    prov = {"method": "random", "density": density, "k": k, "seed": seed, "model": model_identity(params), **(provenance or {})}
    return _select(shapes, forced, competing, scores, k, prov)


def bitfit_mask(
    params: ParamsLike, *, head: Sequence[str] | str = ("classifier",), provenance: Mapping | None = None
) -> FishMask:
    """BitFit (Ben Zaken et al., 2022): every bias plus the (new) classification head."""
    shapes = named_shapes(params)
    forced = match_names(list(shapes), head) if head else []
    selected = {n: torch.arange(_numel(s)) for n, s in shapes.items() if n.endswith("bias") or n in forced}
    return new_mask(shapes, selected, forced, {"method": "bitfit", "model": model_identity(params), **(provenance or {})})


def from_boolean(
    masks: Mapping[str, Tensor], *, forced: Sequence[str] = (), provenance: Mapping | None = None
) -> FishMask:
    """A mask from dense boolean tensors (True = trained), one per parameter."""
    shapes = {}
    selected = {}
    for name, m in masks.items():
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise TypeError(f"mask of {name!r} must be a boolean tensor, got {getattr(m, 'dtype', type(m))}")
        shapes[name] = tuple(m.shape)
        selected[name] = m.reshape(-1).nonzero().squeeze(1)
    return new_mask(shapes, selected, forced, {"method": "boolean", **(provenance or {})})
