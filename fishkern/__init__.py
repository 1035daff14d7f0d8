"""fishkern: FISH-mask training (Sung, Nair & Raffel, NeurIPS 2021) with memory, step time,
checkpoints and communication that scale with the k trained entries, not with the model.

``import fishkern`` is light: it imports neither torch nor transformers nor triton. The names
below and the subpackages (``fishkern.integrations``, ``fishkern.distributed``, ...) are imported
on first use, so ``fishkern.integrations.fish_mask_for`` works after a plain ``import fishkern``
and the command line (``fishkern --help``) starts at once.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

# public name -> the subpackage that defines it
_EXPORTS = {
    "FishMask": "mask",
    "MaskedAdamW": "optim",
    "MaskedSGD": "optim",
    "SparseCheckpointer": "diff",
    "SparseDiff": "diff",
    "estimate_fisher": "fisher",
    "fisher_mask": "fisher",
    "fisher_scores": "fisher",
    "global_topk": "topk",
}
_SUBMODULES = frozenset({
    "cli", "data", "diff", "distributed", "finetune", "fisher", "integrations", "mask", "memory", "metrics",
    "models", "ops", "optim", "runners", "topk",
})

__all__ = [
    "FishMask", "MaskedAdamW", "MaskedSGD", "SparseCheckpointer", "SparseDiff", "estimate_fisher", "fisher_mask", "fisher_scores", "global_topk",
    "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from __getattr__
    from . import distributed, integrations  # noqa: F401
    from .diff import SparseCheckpointer, SparseDiff
    from .fisher import estimate_fisher, fisher_mask, fisher_scores
    from .mask import FishMask
    from .optim import MaskedAdamW, MaskedSGD
    from .topk import global_topk


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it as an attribute
    raise AttributeError(f"module 'fishkern' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
