"""What every Fisher rule shares: the context it runs in, the rule interface, sample chunking, and the
exception that sends a module to the per-sample loop."""
from __future__ import annotations

import torch

DEFAULT_CHUNK_ELEMS = 1 << 21  # per-sample entries alive at once (8 MiB in fp32: near the CPU caches)


LINEAR_KERNELS = ("op", "default", "triton")


class Context:
    """What a rule may use besides the module's input and output gradient.

    linear_kernel: how the sequence-Linear and convolution rules run their ops
    (``fishkern::linear_fisher_acc_``, ``fishkern::conv2d_fisher_acc_``): "op" (the dispatcher picks
    the kernel by device: Triton on CUDA, the CPU kernel with its native form on CPU), "default"
    (the PyTorch kernel on every device) or "triton" (the Triton kernel called directly, also on CPU
    under TRITON_INTERPRET=1; float64 layers, which it does not take, run the default)."""

    def __init__(self, acc_dtype: torch.dtype, linear_kernel: str, chunk_elems: int):
        if linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {LINEAR_KERNELS}, got {linear_kernel!r}")
        self.acc_dtype = acc_dtype
        self.linear_kernel = linear_kernel
        self.chunk_elems = chunk_elems


def _chunks(B: int, per_sample: int, budget: int):
    step = max(1, budget // max(1, per_sample))
    for s in range(0, B, step):
        yield s, min(B, s + step)


# ----------------------------------------------------------------------------------------------
class Rule:
    """Base: `accumulate(module, args, kwargs, grad_out, lengths, acc, ctx)`. grad_out is the
    gradient of the module's (tensor) output; lengths, when given, are the right-padded lengths of
    the (B, T) token dimension of the input (tokens past them have zero gradient and are skipped)."""

    exact_batched = True  # False: the generic per-sample fallback

    def accumulate(self, module, args, kwargs, grad_out, lengths, acc, ctx) -> None:  # pragma: no cover
        raise NotImplementedError


class _Unsupported(Exception):
    """This module cannot be handled batched; the estimator falls back to the per-sample loop."""
