"""``global_topk``: the k largest entries over a list of score tensors, as sorted flat indices per
tensor — the selection at the heart of a FISH mask.

Backed by the op ``torch.ops.fishkern.topk_select``, declared here (schema, fake, and the exact
plain-PyTorch radix select of fishkern/topk/fallback.py as its default kernel, for any device);
the native extension adds CPU (csrc/topk_cpu.cpp) and CUDA (csrc/topk_cuda*.{cu,cpp}) kernels with
the same answer, bit for bit. Ties at the threshold go to the lowest global flat index (the
position in the virtual concatenation of the tensors, in list order), as torch.topk on the
concatenation; -0.0 equals 0.0; ±inf order as numbers; NaN is an error.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _native
from .._native import NativeExtensionMissing, warn_fallback
from ..ops import library
from .fallback import global_topk_torch


def _check_op_args(scores, k) -> None:
    """The op's checks that need no data, with the native kernels' messages (NaN is found when it runs)."""
    for i, s in enumerate(scores):
        torch._check(
            s.dtype == torch.float32,
            lambda: f"topk_select: score tensor {i} has dtype {s.dtype}; scores must be float32",
        )
        torch._check(
            s.device == scores[0].device,
            lambda: f"topk_select: score tensor {i} is on {s.device} but score tensor 0 is on "
            f"{scores[0].device}; put all scores on one device",
        )
    total = sum(s.numel() for s in scores)
    torch._check(k >= 0 and k <= total, lambda: f"topk_select: k = {k} must lie in [0, {total}] (the number of scores)")


def _topk_fake(scores, k):
    _check_op_args(scores, k)
    ctx = torch.library.get_ctx()
    return [s.new_empty((ctx.new_dynamic_size(),), dtype=torch.int64) for s in scores]


def topk_select_default(scores: list[Tensor], k: int) -> list[Tensor]:
    """The default kernel of fishkern::topk_select: the exact radix select in plain PyTorch."""
    _check_op_args(scores, k)
    return global_topk_torch(list(scores), k)


_TOPK = library.define(
    "topk_select",
    "(Tensor[] scores, int k) -> Tensor[]",
    fake=_topk_fake,
    default=topk_select_default,
    # for each tensor, the sorted flat indices (int64) of its entries among the k largest scores of
    # all tensors together (never concatenated); ties at the threshold to the lowest global flat index
    doc="exact global top-k over a list of fp32 score tensors: per tensor, the sorted int64 flat indices selected",
)


def _ensure_op():
    """The op, with the native kernels registered where this installation has them."""
    _native.ensure_loaded()
    return _TOPK


def check_scores(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """Validate the inputs of a global top-k and return them as fp32 tensors."""
    if isinstance(scores, Tensor) or not isinstance(scores, Sequence):
        raise TypeError("scores must be a list or tuple of tensors (one per parameter)")
    out = []
    device = None
    for i, s in enumerate(scores):
        if not isinstance(s, Tensor):
            raise TypeError(f"scores[{i}] is a {type(s).__name__}, not a tensor")
        if s.dtype in (torch.float16, torch.bfloat16):
            s = s.float()  # exact
        elif s.dtype != torch.float32:
            raise TypeError(f"scores[{i}] has dtype {s.dtype}; scores must be float32 (convert explicitly)")
        if device is None:
            device = s.device
        elif s.device != device:
            raise ValueError(f"scores[{i}] is on {s.device} but scores[0] is on {device}; put all scores on one device")
        out.append(s)
    total = sum(s.numel() for s in out)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 0 <= k <= total:
        raise ValueError(f"k = {k} must lie in [0, {total}] (the total number of scores)")
    return out


BACKENDS = ("auto", "native", "torch")


def native_kernel_for(device: torch.device) -> tuple[bool, str]:
    """(whether this installation has a native topk_select kernel for `device`, why not)."""
    _native.ensure_loaded()
    info = _native.native_info()  # looked up here, so that tests can replace it
    if not info.available:
        return False, info.reason
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return False, f"the native extension has no kernel for {device.type} tensors"
    if not library.has_kernel("topk_select", key):
        notes = info.build.get("plan", {}).get("notes", [])
        return False, f"the native extension was built without {key} kernels" + (f" ({notes[-1]})" if notes else "")
    return True, ""


def global_topk(scores: Sequence[Tensor], k: int, *, backend: str = "auto") -> list[Tensor]:
    """For each score tensor, the sorted int64 flat indices of its entries among the k largest of all.

    Exactly k indices in total. Runs on the tensors' device (CPU: multi-threaded radix select, two
    reads of the scores in the usual case; CUDA: the GPU radix select when built with CUDA).
    `backend`: "native" (the compiled kernel for the device; an error if this installation has
    none), "torch" (the op's default kernel: the exact plain-PyTorch selection of
    fishkern.topk.fallback, same answer, slower), or "auto" (the dispatcher's choice: the native
    kernel where there is one, else the default kernel, with a one-time warning).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    scores = check_scores(scores, k)
    if not scores:  # the dispatcher needs a tensor to pick a kernel
        return []
    if scores[0].device.type == "meta":
        raise ValueError("global_topk needs scores with data; these are meta tensors (shapes only)")
    if backend == "torch":
        return topk_select_default(scores, k)
    ok, why = native_kernel_for(scores[0].device)
    if not ok:
        if backend == "native":
            raise NativeExtensionMissing(f"global_topk has no native kernel for {scores[0].device} tensors: {why}")
        warn_fallback("global_topk", why)
    return list(_TOPK(scores, k))
