"""Work tables that let one kernel launch cover the masked entries of many tensors.

The entries of a param group are laid out back to back in flat buffers (see
``fishkern.optim._layout``). The kernels split that flat range into blocks that never straddle two
tensors, so each program reads one tensor's address once and then works on up to BLOCK entries of
it. A *run* (a contiguous range of tensors updated with the same scalars) is a contiguous range of
blocks, launched as one grid.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_BLOCK = 1024


@dataclass
class BlockTable:
    block: int
    block_tensor: Tensor  # int32 [n_blocks]: which tensor of the group each block belongs to
    block_start: Tensor  # int64 [n_blocks]: flat offset of the block's first entry
    seg_end: Tensor  # int64 [n_tensors]: flat end of each tensor's entries
    first_block: list[int]  # first block of tensor i; first_block[-1] == n_blocks

    def blocks_of(self, first: int, last: int) -> tuple[int, int]:
        """Block range [lo, hi) covering tensors first..last (inclusive)."""
        return self.first_block[first], self.first_block[last + 1]


def build_block_table(starts: list[int], device: torch.device, block: int = DEFAULT_BLOCK) -> BlockTable:
    """Blocks of at most ``block`` entries over the segments [starts[i], starts[i+1])."""
    block_tensor: list[int] = []
    block_start: list[int] = []
    first_block = [0]
    for i in range(len(starts) - 1):
        for off in range(starts[i], starts[i + 1], block):
            block_tensor.append(i)
            block_start.append(off)
        first_block.append(len(block_tensor))
    return BlockTable(
        block=block,
        block_tensor=torch.tensor(block_tensor, dtype=torch.int32, device=device),
        block_start=torch.tensor(block_start, dtype=torch.int64, device=device),
        seg_end=torch.tensor(starts[1:], dtype=torch.int64, device=device),
        first_block=first_block,
    )


# The host-cost benchmark replaces the launch itself (benchmarks/bench_host_cost.py): everything the
# host does for a step is measured, on any machine, without a GPU.
_launch_override = None


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, or the replacement installed by ``launches_replaced``."""
    if _launch_override is not None:
        _launch_override(kernel, grid, args, meta)
    else:
        kernel[grid](*args, **meta)


@contextlib.contextmanager
def launches_replaced(fn=lambda kernel, grid, args, meta: None):
    """Within the block, Triton launches call ``fn(kernel, grid, args, meta)`` instead of running."""
    global _launch_override
    old, _launch_override = _launch_override, fn
    try:
        yield
    finally:
        _launch_override = old
