"""Where each parameter's masked entries live in a param group's flat buffers.

A masked optimizer keeps all per-entry state of one param group in flat 1-D buffers of length
K = sum of the group's k_i. Parameter i owns the slice ``[starts[i], starts[i] + k_i)``; inside it
the entries follow the parameter's sorted flat (row-major) indices. Parameters with k_i = 0 own an
empty slice and are never touched.

The user's ``mask_indices`` are validated (``fishkern.mask.indices``) and laid out once, at construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..mask.indices import check_mask_indices, flat_memory_view, index_dtype_for, indices_digest, memory_offsets

__all__ = ["GroupLayout", "build_group_layout", "check_mask_indices", "flat_memory_view", "memory_offsets"]

SUPPORTED_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class GroupLayout:
    """The flat layout of one param group's masked entries (built once, immutable)."""

    params: list[Tensor]
    indices: list[Tensor]  # sorted row-major flat indices per parameter (views into flat_indices)
    mem_indices: list[Tensor]  # memory offsets per parameter (views into flat_mem_indices)
    starts: list[int]  # slice start of parameter i in the flat buffers; starts[-1] == K
    digests: list[str]
    device: torch.device
    state_dtype: torch.dtype
    flat_indices: Tensor = field(repr=False)
    flat_mem_indices: Tensor = field(repr=False)
    contiguous: list[bool] = field(default_factory=list)
    trainable: list[int] = field(default_factory=list)  # positions with k_i > 0, in order
    rank: dict[int, int] = field(default_factory=dict)  # position -> its index in `trainable`
    # The group's parameters as the user passed them. Usually the same tensors as `params`; for a
    # sharded (DTensor) parameter, `params` holds its local shard and `shards` where it sits.
    owners: list[Tensor] = field(default_factory=list)
    shards: list = field(default_factory=list)  # ShardInfo or None per parameter
    global_k: list[int] = field(default_factory=list)  # entries of the whole parameter (all shards)
    low_precision: bool = False  # some parameter's dtype is not the state dtype (bf16/fp16 in fp32 state)

    @property
    def total(self) -> int:
        return self.starts[-1]

    def k(self, i: int) -> int:
        return self.starts[i + 1] - self.starts[i]

    def slice(self, i: int) -> slice:
        return slice(self.starts[i], self.starts[i + 1])

    def segments(self, positions: list[int]) -> tuple[list[int], list[int]]:
        """(begins, ends) of these tensors' slices of the flat buffers."""
        return [self.starts[i] for i in positions], [self.starts[i + 1] for i in positions]


def build_group_layout(params: list[Tensor], masks: list[Tensor], group_no: int) -> GroupLayout:
    """Validate a group's parameters and masks and lay their entries out in flat buffers."""
    if len(params) != len(masks):
        raise ValueError(
            f"param group {group_no}: {len(params)} parameters but {len(masks)} mask index tensors; "
            "mask_indices must hold exactly one tensor per parameter, in the same order"
        )
    if not params:
        raise ValueError(f"param group {group_no} has no parameters")
    device = params[0].device
    dtypes = set()
    checked = []
    seen: set[int] = set()
    for j, (p, m) in enumerate(zip(params, masks)):
        if not isinstance(p, Tensor):
            raise TypeError(f"param group {group_no}, parameter {j}: expected a tensor, got {type(p).__name__}")
        where = f"param group {group_no}, parameter {j} (shape {tuple(p.shape)})"
        if id(p) in seen:
            raise ValueError(f"{where} appears twice in the group; give each parameter (and its mask) once")
        seen.add(id(p))
        if p.device != device:
            raise ValueError(
                f"{where} is on {p.device} but the group's first parameter is on {device}; "
                "put parameters of different devices in different param groups"
            )
        if p.dtype not in SUPPORTED_PARAM_DTYPES:
            raise TypeError(
                f"{where}: dtype {p.dtype} is not supported; use float32, bfloat16, float16 or float64"
            )
        if p.is_sparse:
            raise TypeError(f"{where}: sparse parameters are not supported")
        dtypes.add(p.dtype)
        checked.append(check_mask_indices(p, m, where))
    if torch.float64 in dtypes and len(dtypes) > 1:
        raise TypeError(
            f"param group {group_no} mixes float64 with {sorted(str(d) for d in dtypes - {torch.float64})} "
            "parameters; float64 parameters keep float64 state, so put them in their own group"
        )
    state_dtype = torch.float64 if torch.float64 in dtypes else torch.float32

    starts = [0]
    for idx in checked:
        starts.append(starts[-1] + idx.numel())
    max_numel = max(p.numel() for p in params)
    flat_dtype = index_dtype_for(max_numel)
    flat_indices = torch.empty(starts[-1], dtype=flat_dtype, device=device)
    flat_mem = torch.empty_like(flat_indices)
    contiguous = []
    for i, (p, idx) in enumerate(zip(params, checked)):
        s, e = starts[i], starts[i + 1]
        flat_indices[s:e] = idx.to(flat_dtype)
        flat_mem[s:e] = memory_offsets(idx, p).to(flat_dtype) if e > s else idx.to(flat_dtype)
        contiguous.append(p.is_contiguous())
    indices = [flat_indices[starts[i] : starts[i + 1]] for i in range(len(params))]
    mem_indices = [flat_mem[starts[i] : starts[i + 1]] for i in range(len(params))]
    digests = [indices_digest(idx, p.numel()) for p, idx in zip(params, indices)]
    return GroupLayout(
        params=list(params),
        indices=indices,
        mem_indices=mem_indices,
        starts=starts,
        digests=digests,
        device=device,
        state_dtype=state_dtype,
        flat_indices=flat_indices,
        flat_mem_indices=flat_mem,
        contiguous=contiguous,
        trainable=[i for i in range(len(params)) if starts[i + 1] > starts[i]],
        rank={i: r for r, i in enumerate(i for i in range(len(params)) if starts[i + 1] > starts[i])},
        owners=list(params),
        shards=[None] * len(params),
        global_k=[starts[i + 1] - starts[i] for i in range(len(params))],
        low_precision=any(p.dtype != state_dtype for p in params),
    )
