"""The tensors one masked-optimizer param group steps, registered once, and the per-step checks
that keep the host cost of a step flat in the number of tensors.

A ``ParamTable`` holds a group's parameters and where their masked entries lie in the group's
flat buffers (``starts``, memory offsets, row-major indices). The step ops (``masked_step.py``)
receive its integer handle instead of lists of tensors: converting a Python list of 393 tensors
into an op argument costs more (tens of µs) than the fused kernel that steps them on a GPU.

Every step the optimizer asks ``check(mode)`` one question — are the gradients where the fast path
expects them and did any address move — answered by one native call (``csrc/param_table.cpp``, a
few ns per tensor) or, without the native extension, by a Python loop with the same answer. The
device-side address tables the Triton kernels read are re-uploaded only when an address moved,
from a fresh pinned buffer and without a host sync (the pinned allocator keeps the buffer until
the copy has run).
"""
from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

from .multi_tensor import DEFAULT_BLOCK, BlockTable, build_block_table

# check() modes: where the gradients of the checked tensors should be
PROXIES = 0  # gathered by the optimizer's hooks; each .grad is the proxy set_proxies registered
DENSE = 1  # dense .grad tensors laid out like their parameters, read in place

# check() flags (csrc/param_table.cpp defines the same values)
PARAM_MOVED = 1  # a parameter's storage moved (e.g. p.data = ...): its layout must be re-checked
GRAD_MOVED = 2  # DENSE: a gradient's address changed (tables were refreshed; nothing to do)
GRAD_MISSING = 4  # a checked tensor has no .grad
GRAD_OTHER = 8  # PROXIES: a .grad is not the proxy; DENSE: a .grad is not laid out like its parameter
PARAM_CHANGED = 16  # a parameter's dtype or device changed
NEEDS_SLOW_PATH = PARAM_MOVED | GRAD_MISSING | GRAD_OTHER | PARAM_CHANGED

_TABLES: "weakref.WeakValueDictionary[int, ParamTable]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def table(handle: int) -> "ParamTable":
    """The live table behind a handle (the step ops' default kernels look their tensors up here)."""
    t = _TABLES.get(handle)
    if t is None:
        raise RuntimeError(f"fishkern: parameter table {handle} does not exist (its optimizer was freed?)")
    return t


def _native_ops():
    from .._native import native_available

    if native_available() and hasattr(torch.ops.fishkern, "param_table_new"):
        return torch.ops.fishkern
    return None


class ParamTable:
    """One param group's parameters (laid out by ``fishkern.optim._layout``) for the step ops."""

    def __init__(self, params: list[Tensor], starts: list[int], mem_index: Tensor, index: Tensor,
                 checked: list[int], device: torch.device, state_dtype: torch.dtype):
        self.params = list(params)
        self.state_dtype = state_dtype
        self.starts = list(starts)
        self.mem_index = mem_index  # flat memory offsets of every entry, int32/int64
        self.index = index  # flat row-major indices of every entry
        self.checked = list(checked)
        self.device = device
        self._on_cuda = device.type == "cuda"
        n = len(self.params)
        self.handle = next(_HANDLES)
        _TABLES[self.handle] = self
        self._ops = _native_ops()
        self._native_handle = None
        if self._ops is not None:
            self._native_handle = int(self._ops.param_table_new(self.params, self.checked))
            weakref.finalize(self, _free_native, self._ops, self._native_handle)
        # host mirror of the addresses: [0, n) parameters, [n, 2n) gradients (0: none)
        self._host = torch.zeros(2 * n, dtype=torch.int64)
        self._host[:n] = torch.tensor([p.data_ptr() for p in self.params], dtype=torch.int64)
        self._proxies: list[Tensor | None] = [None] * n  # Python fallback's view of set_proxies
        self._py_grad_addr = [0] * n
        self._block_table: BlockTable | None = None
        self._addr: Tensor | None = None  # device [2n] int64: the Triton kernels' address table
        self._clean_mode: int | None = None  # see take_clean
        if self._ops is not None:  # the overloads themselves: one Python lookup less per call
            self._check_op = self._ops.param_table_check.default
            self._clear_op = self._ops.param_table_clear_grads.default
            self._bump_op = self._ops.param_table_bump.default
            self._commit_op = self._ops.param_table_commit.default

    def __reduce__(self):
        # a copy would share (and free twice) the native registration and alias the parameters
        raise TypeError(
            "a masked optimizer's parameter table cannot be copied or pickled: save opt.state_dict() and load it "
            "into a new optimizer"
        )

    # ------------------------------------------------------------------ per-entry layout
    def k(self, i: int) -> int:
        return self.starts[i + 1] - self.starts[i]

    def segment(self, first: int, last: int) -> tuple[int, int]:
        """Flat range [begin, end) of tensors first..last in the group's buffers."""
        return self.starts[first], self.starts[last + 1]

    def mem_index_of(self, i: int) -> Tensor:
        return self.mem_index[self.starts[i] : self.starts[i + 1]]

    def index_of(self, i: int) -> Tensor:
        return self.index[self.starts[i] : self.starts[i + 1]]

    # ------------------------------------------------------------------ per-step checks
    def set_proxies(self, positions: list[int], proxies: list[Tensor]) -> None:
        """Register the persistent ``.grad`` proxies of these positions (once per tensor)."""
        for i, pr in zip(positions, proxies):
            self._proxies[i] = pr
        if self._ops is not None:
            self._ops.param_table_set_proxies(self._native_handle, positions, proxies)

    def check(self, mode: int, remember: bool = False, commit: bool = False) -> int:
        """Flags (see the module constants) for the checked tensors; refreshes the device address
        table when an address moved. ``remember``: a clean answer stands for this step's op calls
        (``take_clean``) until ``forget_clean()``. ``commit``: a clean answer also does ``commit(mode)``
        in the same pass (the caller then steps every checked tensor)."""
        if self._ops is not None:
            flags = self._check_op(self._native_handle, mode, self._host, commit)
        else:
            flags = self._check_python(mode)
            if commit and not flags & NEEDS_SLOW_PATH:
                self.commit(mode)
        if flags & (PARAM_MOVED | GRAD_MOVED) and self._addr is not None:
            self._upload()
        self._clean_mode = mode if remember and not flags & NEEDS_SLOW_PATH else None
        return flags

    def take_clean(self, mode: int) -> bool:
        """Whether the optimizer's check of this step (``check(mode, remember=True)``) found
        nothing for the slow path: the step's op calls then reuse it instead of repeating it."""
        return self._clean_mode == mode

    def forget_clean(self) -> None:
        """The step is over: the next op call checks again."""
        self._clean_mode = None

    def _check_python(self, mode: int) -> int:
        n, host, flags = len(self.params), self._host, 0
        addrs = [p.data_ptr() for p in self.params]
        if addrs != host[:n].tolist():
            host[:n] = torch.tensor(addrs, dtype=torch.int64)
            flags |= PARAM_MOVED
        for i in self.checked:
            p = self.params[i]
            g = p.grad
            if g is None:
                flags |= GRAD_MISSING
                continue
            if mode == PROXIES:
                if g is not self._proxies[i]:
                    flags |= GRAD_OTHER
                continue
            # a tensor subclass (another optimizer's MaskedGrad, sparse backward's) has no memory to read
            if type(g) is not torch.Tensor or g.layout != torch.strided or g.dtype != p.dtype or g.device != p.device \
                    or g.stride() != p.stride() or g.shape != p.shape:
                flags |= GRAD_OTHER
                continue
            if g.data_ptr() != self._py_grad_addr[i]:
                self._py_grad_addr[i] = g.data_ptr()
                flags |= GRAD_MOVED
        if flags & GRAD_MOVED:
            host[n:] = torch.tensor(self._py_grad_addr, dtype=torch.int64)
        return flags

    def commit(self, mode: int) -> None:
        """A step of every checked tensor is under way: bump their autograd versions (the kernels
        write them through raw pointers) and, in PROXIES mode, drop the proxies from ``.grad`` (the
        gathered gradients are consumed) — one pass instead of ``bump_versions`` + ``clear_grads``."""
        if self._ops is not None:
            self._commit_op(self._native_handle, mode)
            return
        torch.autograd.graph.increment_version([self.params[i] for i in self.checked])
        if mode == PROXIES:
            self.clear_grads()

    def clear_grads(self) -> None:
        """``.grad = None`` wherever ``.grad`` is the registered proxy (the gradients are consumed)."""
        if self._ops is not None:
            self._clear_op(self._native_handle)
            return
        for i in self.checked:
            p = self.params[i]
            if p.grad is not None and p.grad is self._proxies[i]:
                p.grad = None

    def bump_versions(self, first: int, last: int) -> None:
        """Tell autograd that parameters first..last were written in place (through raw pointers)."""
        if self._ops is not None:
            self._bump_op(self._native_handle, first, last)
        else:
            torch.autograd.graph.increment_version([self.params[i] for i in range(first, last + 1) if self.k(i)])

    # ------------------------------------------------------------------ device tables (Triton)
    def block_table(self) -> BlockTable:
        if self._block_table is None:
            self._block_table = build_block_table(self.starts, self.device, DEFAULT_BLOCK)
        return self._block_table

    def addresses(self) -> tuple[Tensor, Tensor]:
        """(parameter, gradient) address tables on the device, as of the last ``check()``."""
        if self._addr is None:
            n = len(self.params)
            self._addr = torch.empty(max(2 * n, 1), dtype=torch.int64, device=self.device)
            self._upload()
            self._addr_views = (self._addr[:n], self._addr[n : 2 * n])
        return self._addr_views

    def _upload(self) -> None:
        src = self._host
        dst = self._addr if self._addr.numel() == src.numel() else self._addr[: src.numel()]  # (a slice costs µs)
        if self._on_cuda:
            # a fresh pinned copy: the copy runs asynchronously, and the next change must not
            # overwrite the buffer it reads (the caching host allocator holds it until the copy ran)
            dst.copy_(src.pin_memory(), non_blocking=True)
        else:
            dst.copy_(src)

    def nbytes(self) -> int:
        """Bytes of the tables (for the optimizer's memory_footprint): the host mirror of the
        addresses (16 per tensor) and, once the Triton kernels ran, the device tables."""
        n = self._host.numel() * self._host.element_size()
        if self._block_table is not None:
            bt = self._block_table
            n += sum(t.numel() * t.element_size() for t in (bt.block_tensor, bt.block_start, bt.seg_end))
        if self._addr is not None:
            n += self._addr.numel() * self._addr.element_size()
        return n


def _free_native(ops, handle: int) -> None:
    try:
        ops.param_table_free(handle)
    except Exception:  # noqa: BLE001 - interpreter shutdown: the registry goes with the process
        pass
