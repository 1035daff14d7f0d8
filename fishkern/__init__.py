"""fishkern: FISH-mask training (Sung, Nair & Raffel, NeurIPS 2021) with memory, step time,
checkpoints and communication that scale with the k trained entries, not with the model."""
from ._version import __version__
from .optim import MaskedAdamW, MaskedSGD

__all__ = ["MaskedAdamW", "MaskedSGD", "__version__"]
