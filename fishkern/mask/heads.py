"""The one rule for the classification head that every mask builder forces in."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from .builders import match_names

DEFAULT_HEADS = ("classifier", "score")  # BERT/RoBERTa/DeBERTa…, GPT-style sequence classifiers


def head_names(model: nn.Module, head: Sequence[str] | str | None = None) -> list[str]:
    """Parameter names of the classification head (new at fine-tuning; forced into every mask)."""
    names = [n for n, _ in model.named_parameters()]
    patterns = [head] if isinstance(head, str) else list(head or DEFAULT_HEADS)
    found = match_names(names, patterns)
    if not found:
        raise ValueError(
            f"no parameter of {type(model).__name__} matches the head patterns {patterns}; "
            "pass head= the name of the classification head module"
        )
    return found
