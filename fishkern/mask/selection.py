"""Which entries a mask selects: shapes, the budget rule, force / exclude patterns and the top-k.

Everything a builder computes before a `FishMask` exists, so that both the `FishMask` class
(`fishmask.py`, its ``from_scores`` / ``random`` / ... class methods) and the public builder
functions (`builders.py`) sit on top of this module and neither imports the other's caller: the
layering is selection -> fishmask -> builders, without a cycle.

Budget rule (the paper's, and its code's): k = ⌊density × all parameters⌋; parameters forced in
(e.g. the new classifier head) are included entirely and counted inside k; the rest of the budget
goes to the highest scores among the parameters that are neither forced nor excluded.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor

from ..topk import global_topk
from ._patterns import as_patterns as _patterns, check_each_matches, close_names, match_names
from ..models.kinds import is_causal_lm
from .heads import head_parameters


class Selection(NamedTuple):
    """A builder's result before it becomes a FishMask: ``new_mask(*selection)``."""

    shapes: dict[str, tuple[int, ...]]
    selected: dict[str, Tensor]  # name -> sorted flat indices (any integer dtype)
    forced: tuple[str, ...]
    provenance: dict[str, Any]


#: a model, its named parameters, or {name: shape}
ParamsLike = Union[torch.nn.Module, Mapping[str, Tensor], Mapping[str, tuple], Iterable[tuple[str, Tensor]]]


def named_shapes(params: ParamsLike) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a model, of named tensors, or of a {name: shape} mapping, in model order."""
    if isinstance(params, torch.nn.Module):
        return {n: tuple(p.shape) for n, p in params.named_parameters()}
    items = params.items() if isinstance(params, Mapping) else params
    out = {}
    for name, value in items:
        if isinstance(value, Tensor):
            out[name] = tuple(value.shape)
        elif isinstance(value, (tuple, list, torch.Size)) and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value
        ):
            out[name] = tuple(value)
        else:  # e.g. a list of floats or a numpy array: neither a tensor nor a shape
            raise TypeError(f"{name!r}: expected a tensor or a shape (non-negative ints), got {type(value).__name__} {value!r:.60}")
    return out


def model_identity(params: ParamsLike) -> dict[str, Any] | None:
    """What a provenance record can say about the model: class, Hugging Face name or path, size."""
    if not isinstance(params, torch.nn.Module):
        return None
    config = getattr(params, "config", None)
    return {
        "class": type(params).__name__,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "num_parameters": sum(p.numel() for p in params.parameters()),
    }


def numel_of(shape: tuple[int, ...]) -> int:
    """The number of entries of a shape (1 for ())."""
    n = 1
    for s in shape:
        n *= s
    return n


class BooleanMasks(dict):
    """``FishMask.to_boolean()``'s result: {name: bool tensor}, a plain dict that also records which
    parameters were forced in (``forced``), so that ``FishMask.from_boolean`` gives the same mask
    back. A copy made with ``dict(...)`` drops the record (pass ``forced=`` then)."""

    def __init__(self, masks=(), forced: tuple[str, ...] = ()):
        super().__init__(masks)
        self.forced = tuple(forced)

    def __reduce__(self):  # pickles / deep-copies with its record
        return (type(self), (dict(self), self.forced))


_TOPK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # ranked exactly as fp32


# ------------------------------------------------------------------------ input checks
def _type_name(value) -> str:
    return type(value).__name__


def _dim(d) -> int | None:
    """A size, or None: operator.index takes ints (numpy's too) but not floats; a bool is no size."""
    if isinstance(d, bool):
        return None
    try:
        d = operator.index(d)
    except TypeError:
        return None
    return d if d >= 0 else None


def _shape_of(value, where: str) -> tuple[int, ...]:
    if isinstance(value, Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list, torch.Size)):
        dims = [_dim(d) for d in value]
        if None not in dims:
            return tuple(dims)
    raise TypeError(
        f"{where} is {_type_name(value)} {value!r:.60}; expected a tensor or a shape (a tuple of non-negative ints)"
    )


def _model_shapes(params: ParamsLike, arg: str) -> tuple[dict[str, tuple[int, ...]], bool]:
    """(``named_shapes`` with a TypeError naming the entry when something is neither a tensor nor a
    shape, whether ``params`` is a model: a module, or its parameters — every value an
    ``nn.Parameter``, as ``model.named_parameters()`` gives — rather than plain tensors or shapes)."""
    if isinstance(params, torch.nn.Module):
        return named_shapes(params), True
    if isinstance(params, (str, bytes, Tensor)) or not isinstance(params, Iterable):
        raise TypeError(
            f"{arg} must be a model, a mapping {{name: tensor or shape}} or (name, tensor) pairs, got {_type_name(params)}"
        )
    items = params.items() if isinstance(params, Mapping) else params
    out = {}
    parameters = True
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"{arg}: entry {i} is {_type_name(item)}, not a (name, tensor) pair")
        name, value = item
        if not isinstance(name, str):
            raise TypeError(f"{arg}: parameter names must be strings, got {_type_name(name)} {name!r:.60}")
        out[name] = _shape_of(value, f"{arg}[{name!r}]")
        parameters = parameters and isinstance(value, torch.nn.Parameter)
    return out, parameters and bool(out)


def _score_shapes(scores: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping {{parameter name: score tensor}}, got {_type_name(scores)}")
    for name, s in scores.items():
        if not isinstance(name, str):
            raise TypeError(f"scores: parameter names must be strings, got {_type_name(name)} {name!r:.60}")
        if not isinstance(s, Tensor):
            raise TypeError(f"scores[{name!r}] is a {_type_name(s)}, not a tensor; give one float32 score tensor per parameter")
    return named_shapes(scores)


def _check_competing_scores(competing: list[str], scores: Sequence[Tensor]) -> None:
    """What global_topk would refuse, with the parameter's name instead of a list position."""
    for n, s in zip(competing, scores):
        if s.dtype not in _TOPK_DTYPES:
            raise TypeError(f"scores[{n!r}] has dtype {s.dtype}; scores must be float32 (or float16/bfloat16)")
        if s.device != scores[0].device:
            raise ValueError(
                f"scores[{n!r}] is on {s.device} but scores[{competing[0]!r}] is on {scores[0].device}; "
                "put all scores on one device"
            )


def smallest_density(total: int, digits: int = 3) -> float:
    """A density just at or above 1/total, rounded up to ``digits`` significant digits (more when
    needed), with ⌊d × total⌋ ≥ 1 checked in floating point: (1/49) × 49 is 0.999… there."""
    from decimal import ROUND_CEILING, Decimal

    exact = Decimal(1) / Decimal(total)
    for n in range(digits, 18):
        d = float(exact.quantize(Decimal(1).scaleb(exact.adjusted() - n + 1), rounding=ROUND_CEILING))
        if math.floor(d * total) >= 1:
            return d
    d = 1.0 / total
    while math.floor(d * total) < 1:
        d = math.nextafter(d, 2.0)
    return d


def budget(total: int, density: float | None, k: int | None) -> int:
    """k from a density (k = ⌊density × total⌋, which must be ≥ 1) or an explicit k in [0, total].

    A density that selects nothing is an error: the CLI and FishTrainer take densities in (0, 1],
    and a mask that trains nothing is never what a density means. An explicit ``k=0`` is allowed:
    it says so on purpose (an empty mask, e.g. a frozen control run)."""
    if (density is None) == (k is None):
        raise ValueError("give exactly one of density (fraction of all parameters) or k (number of entries)")
    if k is None:
        if isinstance(density, bool) or not (isinstance(density, (int, float)) and 0.0 <= density <= 1.0) \
                or math.isnan(density):
            raise ValueError(f"density must be a fraction in (0, 1], got {density!r}")
        k = math.floor(density * total)
        if k == 0:
            if total == 0:
                raise ValueError("there are no parameters (0 entries): no density selects anything")
            raise ValueError(
                f"density {density!r} of {total:,} parameters gives k = ⌊density × {total:,}⌋ = 0 entries: the mask "
                f"would train nothing. The smallest density that selects an entry is 1/{total:,} (k = 1), e.g. "
                f"density={smallest_density(total)!r}; pass k=0 for an empty mask on purpose"
            )
        return k
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total:
        raise ValueError(f"k must be an integer in [0, {total}], got {k!r}")
    return k


def _split_forced(shapes, force, exclude, head: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(forced names, competing names). Every force / exclude pattern must match a parameter (a typo
    would silently force or exclude nothing). ``head``: names already chosen by the head rule,
    forced in instead of the ``force`` patterns."""
    names = list(shapes)
    force, exclude = _patterns(force, "force"), _patterns(exclude, "exclude")
    check_each_matches(names, force, "force")
    check_each_matches(names, exclude, "exclude")
    forced = list(head) if head is not None else match_names(names, force) if force else []
    excluded = match_names(names, exclude) if exclude else []
    both = sorted(set(forced) & set(excluded))
    if both:
        raise ValueError(f"parameters both forced in and excluded: {both[:5]}")
    competing = [n for n in names if n not in set(forced) and n not in set(excluded)]
    return forced, competing


def _check_budget(shapes, forced, competing, k: int) -> int:
    """The entries left for the top-k once the forced-in parameters are counted in k."""
    forced_k = sum(numel_of(shapes[n]) for n in forced)
    if forced_k > k:
        raise ValueError(
            f"the forced-in parameters ({forced[:3]}{'...' if len(forced) > 3 else ''}) hold {forced_k:,} entries, "
            f"more than the whole budget k = {k:,}; raise the density or force fewer parameters"
        )
    rest = k - forced_k
    available = sum(numel_of(shapes[n]) for n in competing)
    if rest > available:
        raise ValueError(f"budget k = {k:,} exceeds the {forced_k + available:,} entries that may be selected")
    return rest


def check_selection(
    shapes: Mapping[str, tuple[int, ...]], density: float | None, k: int | None, force=(), exclude=(), frozen=()
) -> None:
    """Every check ``from_scores`` makes that needs no score values (budget, patterns, forced vs
    excluded, forced vs k), for callers that compute the scores first (``fisher_mask``): run it
    before that work. ``frozen``: names excluded besides the ``exclude`` patterns."""
    k = budget(sum(numel_of(s) for s in shapes.values()), density, k)
    forced, competing = _split_forced(shapes, force, _patterns(exclude, "exclude") + list(frozen))
    _check_budget(shapes, forced, competing, k)


def _select(shapes, forced, competing, scores: Sequence[Tensor], k: int, provenance) -> Selection:
    rest = _check_budget(shapes, forced, competing, k)
    try:
        picked = global_topk(list(scores), rest)
    except RuntimeError as e:
        if "NaN" in str(e):
            bad = [n for n, s in zip(competing, scores) if torch.isnan(s).any()]
            raise ValueError(f"NaN Fisher scores in {bad[:5]}; the estimate is broken (check the loss)") from e
        raise
    selected = {n: i for n, i in zip(competing, picked)}
    for n in forced:
        selected[n] = torch.arange(numel_of(shapes[n]), device=scores[0].device if scores else "cpu")
    return Selection(shapes, selected, tuple(forced), dict(provenance or {}))


def scores_selection(
    scores: Mapping[str, Tensor],
    density: float | None = None,
    *,
    k: int | None = None,
    force: Sequence[str] | str = (),
    exclude: Sequence[str] | str = (),
    provenance: Mapping | None = None,
) -> Selection:
    """The selection of ``builders.from_scores`` (see there)."""
    shapes = _score_shapes(scores)
    k = budget(sum(numel_of(s) for s in shapes.values()), density, k)
    forced, competing = _split_forced(shapes, force, exclude)
    ranked = [scores[n].detach() for n in competing]
    _check_competing_scores(competing, ranked)
    prov = {"method": "fish", "density": density, "k": k, **(provenance or {})}
    return _select(shapes, forced, competing, ranked, k, prov)


def _forced_head(shapes, is_model: bool, force, arg: str, params=None) -> list[str] | None:
    """The head a baseline builder forces in: the rule of ``fishkern.mask.heads`` for a model
    (nothing for a causal LM); for plain tensors or shapes (no model), only what ``force`` names.
    None: use ``force``."""
    if force is None:
        if not is_model or is_causal_lm(params):
            return []
        return head_parameters(list(shapes), None, arg=arg)
    return None


def random_selection(
    params: ParamsLike,
    density: float | None = None,
    *,
    k: int | None = None,
    seed: int = 0,
    force: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str = (),
    provenance: Mapping | None = None,
) -> Selection:
    """The selection of ``builders.random_mask`` (see there)."""
    shapes, is_model = _model_shapes(params, "params")
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed must be an int, got {_type_name(seed)}")
    k = budget(sum(numel_of(s) for s in shapes.values()), density, k)
    head = _forced_head(shapes, is_model, force, "force", params)
    forced, competing = _split_forced(shapes, () if head is not None else force, exclude, head)
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.rand(shapes[n], generator=gen) for n in competing]
    prov = {"method": "random", "density": density, "k": k, "seed": seed, "model": model_identity(params), **(provenance or {})}
    return _select(shapes, forced, competing, scores, k, prov)


def bitfit_selection(
    params: ParamsLike, *, head: Sequence[str] | str | None = None, provenance: Mapping | None = None
) -> Selection:
    """The selection of ``builders.bitfit_mask`` (see there)."""
    shapes, is_model = _model_shapes(params, "params")
    forced = _forced_head(shapes, is_model, head, "head", params)
    if forced is None:
        head = _patterns(head, "head")
        check_each_matches(list(shapes), head, "head")
        forced = match_names(list(shapes), head)
    selected = {n: torch.arange(numel_of(s)) for n, s in shapes.items() if n.endswith("bias") or n in forced}
    return Selection(shapes, selected, forced, {"method": "bitfit", "model": model_identity(params), **(provenance or {})})


def boolean_selection(
    masks: Mapping[str, Tensor], *, forced: Sequence[str] | None = None, provenance: Mapping | None = None
) -> Selection:
    """The selection of ``builders.from_boolean`` (see there)."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping {{parameter name: boolean tensor}}, got {_type_name(masks)}")
    if forced is None:
        forced = masks.forced if isinstance(masks, BooleanMasks) else ()
    forced = _patterns(forced, "forced")
    shapes = {}
    selected = {}
    for name, m in masks.items():
        if not isinstance(name, str):
            raise TypeError(f"masks: parameter names must be strings, got {_type_name(name)} {name!r:.60}")
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, Tensor) else f"a {_type_name(m)}"
            raise TypeError(f"mask of {name!r} must be a boolean tensor, got {got}")
        shapes[name] = tuple(m.shape)
        selected[name] = m.reshape(-1).nonzero().squeeze(1)
    unknown = [n for n in forced if n not in shapes]
    if unknown:
        close = [c for n in unknown[:1] for c in close_names(n, list(shapes))]
        raise ValueError(
            f"forced names {unknown[:3]} are not among the masks' parameters"
            + (f" (did you mean {close}?)" if close else "")
        )
    return Selection(shapes, selected, forced, {"method": "boolean", **(provenance or {})})
