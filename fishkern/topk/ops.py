"""``global_topk``: the k largest entries over a list of score tensors, as sorted flat indices per
tensor — the selection at the heart of a FISH mask.

Backed by the native op ``torch.ops.fishkern.topk_select`` (csrc/ops.cpp declares it; topk_cpu.cpp
and the CUDA files implement it). Ties at the threshold go to the lowest global flat index (the
position in the virtual concatenation of the tensors, in list order), as torch.topk on the
concatenation; -0.0 equals 0.0; ±inf order as numbers; NaN is an error.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._native import NativeExtensionMissing, require_native, warn_fallback
from .fallback import global_topk_torch

_FAKE_REGISTERED = False


def _ensure_op():
    global _FAKE_REGISTERED
    require_native("global_topk")
    if not _FAKE_REGISTERED:

        @torch.library.register_fake("fishkern::topk_select")
        def _(scores, k):
            # the native op's checks that need no data (NaN is found only when it runs)
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
            torch._check(
                k >= 0 and k <= total, lambda: f"topk_select: k = {k} must lie in [0, {total}] (the number of scores)"
            )
            ctx = torch.library.get_ctx()
            return [s.new_empty((ctx.new_dynamic_size(),), dtype=torch.int64) for s in scores]

        _FAKE_REGISTERED = True
    return torch.ops.fishkern.topk_select.default


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
    """(whether the native op has a kernel for `device` in this installation, why not)."""
    from .._native import native_info

    info = native_info()
    if not info.available:
        return False, info.reason
    _ensure_op()
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    if key is None:
        return False, f"the native op has no kernel for {device.type} tensors"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fishkern::topk_select", key):
        return False, f"the native extension was built without {key} kernels ({info.build.get('plan', {}).get('notes', [''])[-1:] or ''})"
    return True, ""


def global_topk(scores: Sequence[Tensor], k: int, *, backend: str = "auto") -> list[Tensor]:
    """For each score tensor, the sorted int64 flat indices of its entries among the k largest of all.

    Exactly k indices in total. Runs on the tensors' device (CPU: multi-threaded radix select, two
    reads of the scores in the usual case; CUDA: the GPU radix select when built with CUDA).
    `backend`: "native" (the compiled op; an error if it is not there), "torch" (the exact
    plain-PyTorch selection of fishkern.topk.fallback, same answer, slower), or "auto" (native when
    this installation has a kernel for the device, else torch, with a one-time warning).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    scores = check_scores(scores, k)
    if not scores:  # the dispatcher needs a tensor to pick a backend
        return []
    if scores[0].device.type == "meta":
        raise ValueError("global_topk needs scores with data; these are meta tensors (shapes only)")
    if backend == "torch":
        return global_topk_torch(scores, k)
    ok, why = native_kernel_for(scores[0].device)
    if not ok:
        if backend == "native":
            raise NativeExtensionMissing(f"global_topk has no native kernel for {scores[0].device} tensors: {why}")
        warn_fallback("global_topk", why)
        return global_topk_torch(scores, k)
    return list(_ensure_op()(scores, k))
