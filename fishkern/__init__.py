"""fishkern: FISH-mask training (Sung, Nair & Raffel, NeurIPS 2021) with memory, step time,
checkpoints and communication that scale with the k trained entries, not with the model."""
from . import distributed
from ._version import __version__
from .diff import SparseCheckpointer, SparseDiff
from .fisher import estimate_fisher, fisher_mask, fisher_scores
from .mask import FishMask
from .optim import MaskedAdamW, MaskedSGD
from .topk import global_topk

__all__ = [
    "FishMask", "MaskedAdamW", "MaskedSGD", "SparseCheckpointer", "SparseDiff", "estimate_fisher", "fisher_mask", "fisher_scores", "global_topk",
    "__version__",
]
