"""The one rule for the classification head that every mask builder given a model forces in.

- ``head=None`` (the default): the parameters matching ``DEFAULT_HEADS`` (``classifier`` for
  BERT/RoBERTa/DeBERTa…, ``score`` for GPT-style sequence classifiers); an error when none does,
  so a model whose head has another name (a ResNet's ``fc``) is never trained without its head.
- ``head="fc"`` or a list of patterns: those parameters; each pattern must match something (a
  typo is an error that suggests close names).
- ``head=()``: nothing is forced in (the documented opt-out).

A causal language model (``*ForCausalLM``, ``*LMHeadModel``) has no new head: ``head=None`` forces
nothing in for it; pass ``head="lm_head"`` (or ``"score"``) to train a head whole.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from ..models.kinds import is_causal_lm
from ._patterns import as_patterns, check_each_matches, close_names, match_names

DEFAULT_HEADS = ("classifier", "score")  # BERT/RoBERTa/DeBERTa…, GPT-style sequence classifiers


def head_parameters(
    names: Sequence[str], head: Sequence[str] | str | None = None, *, arg: str = "head", what: str = "the model"
) -> list[str]:
    """The names among ``names`` that the head rule (see the module docstring) forces in."""
    names = list(names)
    if head is None:
        found = match_names(names, DEFAULT_HEADS)
        if not found:
            close = [c for p in DEFAULT_HEADS for c in close_names(p, names, n=2)]
            hint = f" (close names: {sorted(set(close))})" if close else ""
            raise ValueError(
                f"no parameter of {what} matches the default head patterns {list(DEFAULT_HEADS)}{hint}: pass "
                f"{arg}= the name of its classification head module (e.g. {arg}='fc' for a ResNet), or {arg}=() "
                "to force no head in"
            )
        return found
    patterns = as_patterns(head, arg)
    check_each_matches(names, patterns, arg, what)
    return match_names(names, patterns)


def head_names(model: nn.Module, head: Sequence[str] | str | None = None) -> list[str]:
    """Parameter names of the classification head (new at fine-tuning; forced into every mask):
    ``DEFAULT_HEADS`` when ``head`` is None (an error when nothing matches), else the parameters
    matching ``head`` (each pattern must match); ``head=()`` forces nothing. A causal LM with
    ``head=None``: nothing (its output head is pretrained, not new)."""
    if head is None and is_causal_lm(model):
        return []
    return head_parameters([n for n, _ in model.named_parameters()], head, what=type(model).__name__)
