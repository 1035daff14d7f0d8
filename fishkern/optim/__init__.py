"""Masked optimizers: train only the k entries of a fixed sparse mask, with state of size k."""
from ._grad_proxy import MaskedGrad
from .adamw import MaskedAdamW
from .sgd import MaskedSGD

__all__ = ["MaskedAdamW", "MaskedSGD", "MaskedGrad"]
