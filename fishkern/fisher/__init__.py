"""Diagonal Fisher estimation: exact per-sample squared gradients, batched (see estimator.py)."""
from .estimator import FisherResult, clear_self_check_cache, estimate_fisher, fisher_reference, fisher_scores
from .mask import fisher_mask

__all__ = ["FisherResult", "clear_self_check_cache", "estimate_fisher", "fisher_mask", "fisher_reference", "fisher_scores"]
