"""fishkern: FISH-mask training (Sung, Nair & Raffel, NeurIPS 2021) with memory, step time,
checkpoints and communication that scale with the k trained entries, not with the model."""
from ._version import __version__
from .mask import FishMask
from .optim import MaskedAdamW, MaskedSGD
from .topk import global_topk

__all__ = ["FishMask", "MaskedAdamW", "MaskedSGD", "global_topk", "__version__"]
