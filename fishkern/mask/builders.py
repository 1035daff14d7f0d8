"""Ways to make a FishMask: from Fisher scores (FISH), random (baseline), BitFit, boolean masks.

Budget rule (the paper's, and its code's): k = ⌊density × all parameters⌋; parameters forced in
(e.g. the new classifier head) are included entirely and counted inside k; the rest of the budget
goes to the highest scores among the parameters that are neither forced nor excluded.

The selection itself (checks, budget, patterns, top-k) is `selection.py`; these functions turn its
result into a `FishMask`, as the ``FishMask.from_scores`` / ``random`` / ``bitfit`` /
``from_boolean`` class methods do.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ._patterns import match_names
from .fishmask import FishMask, new_mask
from .selection import (
    ParamsLike,
    bitfit_selection,
    boolean_selection,
    budget,
    check_selection,
    random_selection,
    scores_selection,
    smallest_density,
)

__all__ = [
    "bitfit_mask", "budget", "check_selection", "from_boolean", "from_scores", "match_names", "random_mask",
    "smallest_density",
]


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
    return new_mask(*scores_selection(scores, density, k=k, force=force, exclude=exclude, provenance=provenance))


def random_mask(
    params: ParamsLike,
    density: float | None = None,
    *,
    k: int | None = None,
    seed: int = 0,
    force: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str = (),
    provenance: Mapping | None = None,
) -> FishMask:
    """The random-mask baseline: the same budget rule, entries drawn uniformly (seeded, exact k).

    params: a model, its ``named_parameters()``, or {name: tensor or shape}.
    force: patterns of parameters included entirely, counted inside k. None (the default): for a
        model (or its parameters), the classification head by the rule of ``fish_mask_for``
        (``classifier`` / ``score``; an error when the model has neither: name it, e.g.
        ``force="fc"``); for plain tensors or shapes, nothing. ``force=()`` forces nothing in.
    """
    return new_mask(*random_selection(params, density, k=k, seed=seed, force=force, exclude=exclude, provenance=provenance))


def bitfit_mask(
    params: ParamsLike, *, head: Sequence[str] | str | None = None, provenance: Mapping | None = None
) -> FishMask:
    """BitFit (Ben Zaken et al., 2022): every bias plus the (new) classification head.

    head: patterns of the head's parameters. None (the default): for a model (or its parameters),
        the rule of ``fish_mask_for`` (``classifier`` / ``score``; an error when the model has
        neither: name it, e.g. ``head="fc"``); for plain tensors or shapes, no head. ``head=()``:
        the biases only. Each given pattern must match a parameter.
    """
    return new_mask(*bitfit_selection(params, head=head, provenance=provenance))


def from_boolean(
    masks: Mapping[str, Tensor], *, forced: Sequence[str] | None = None, provenance: Mapping | None = None
) -> FishMask:
    """A mask from dense boolean tensors (True = trained), one per parameter.

    forced: names of the parameters that were forced in. None (the default): those that
    ``FishMask.to_boolean()`` recorded on its result, so ``from_boolean(m.to_boolean()) == m``;
    none for a plain dict."""
    return new_mask(*boolean_selection(masks, forced=forced, provenance=provenance))
