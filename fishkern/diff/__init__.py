"""Sparse task diffs and sparse checkpoint chains: files that scale with the k trained entries.

- ``SparseDiff``: one safetensors file with the trained entries of a model (deltas or absolute
  values) and the hashes of its base; ``apply_`` / ``revert_`` are bit-exact and refuse the wrong
  base. BERT-large at 0.5%: ~13.4 MB instead of 1.34 GB.
- ``SparseCheckpointer``: a chain of checkpoints that each store only what changed since the
  previous one (masks recomputed every E epochs included), the optimizer state and the random
  generators; ``rebuild`` any checkpoint bit-exactly, ``load_into`` to resume bit-identically.
"""
from ._io import BaseMismatchError, CorruptFileError, content_hash
from .checkpoint import CheckpointChainError, CheckpointLockedError, CheckpointState, SparseCheckpointer
from .format import SparseDiff, dense_nbytes, size_report

__all__ = [
    "SparseDiff",
    "SparseCheckpointer",
    "CheckpointState",
    "size_report",
    "dense_nbytes",
    "content_hash",
    "BaseMismatchError",
    "CorruptFileError",
    "CheckpointChainError",
    "CheckpointLockedError",
]
