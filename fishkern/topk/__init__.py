"""Exact global top-k over many score tensors without concatenating them (native op), and its
pure-PyTorch reference."""
from .ops import global_topk
from .reference import global_topk_reference

__all__ = ["global_topk", "global_topk_reference"]
