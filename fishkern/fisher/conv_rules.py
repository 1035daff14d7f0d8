"""Per-layer Fisher rules for convolutions: Σₙ Gₙ² of a conv layer's weight and bias from its input
and its output gradient (see rule_base.py for the contract a rule follows).

The weight's Σₙ Gₙ² is the op ``fishkern::conv2d_fisher_acc_`` (fishkern/ops/conv_fisher.py: exact
PyTorch forms picked per layer on any device, a native fused form on CPU, a Triton kernel on CUDA). Conv1d is the same op on a
height-1 image. Padding modes other than zeros (and string padding) are applied to the input here,
so the op always sees zero padding."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import conv_fisher as cf
from .rule_base import Rule, _Unsupported


def _op_inputs(x: torch.Tensor, g: torch.Tensor, acc_dtype: torch.dtype):
    """x and g in one dtype the op takes for this accumulator (they differ under autocast: fp32
    input, bf16 output gradient; a float64 accumulator takes float64 inputs)."""
    dt = x.dtype if x.dtype == g.dtype else torch.promote_types(x.dtype, g.dtype)
    if acc_dtype == torch.float64 or dt not in cf.INPUT_DTYPES:
        dt = acc_dtype
    return x.to(dt), g.to(dt)


class _ConvRule(Rule):
    """nn.Conv1d / nn.Conv2d (their own forward); the op picks its form per layer."""

    spatial = 2

    def accumulate(self, m, args, kwargs, g, lengths, acc, ctx):
        x = args[0] if args else kwargs["input"]
        if x.dim() != self.spatial + 2:
            raise _Unsupported(f"{type(m).__name__} called on an unbatched {x.dim()}-D input")
        padding = m.padding
        if isinstance(padding, str) or m.padding_mode != "zeros":
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * self.spatial
        if "weight" in acc:
            w = acc["weight"]
            xs, gs = _op_inputs(x, g, w.dtype)
            stride, dilation = m.stride, m.dilation
            if self.spatial == 1:  # a height-1 image
                xs, gs, w = xs.unsqueeze(2), gs.unsqueeze(2), w.unsqueeze(2)
                stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
            # the kernel as for the sequence Linears (Context.linear_kernel): "default" is plain
            # PyTorch on every device, "triton" the Triton kernel called directly, "op" by device
            if ctx.linear_kernel == "default":
                cf.conv2d_fisher_default_(w, xs, gs, stride, padding, dilation, m.groups, chunk_elems=ctx.chunk_elems)
            elif ctx.linear_kernel == "triton" and w.dtype == torch.float32:
                cf.conv2d_fisher_triton_(w, xs, gs, stride, padding, dilation, m.groups)
            else:
                cf.conv2d_fisher_acc_(w, xs, gs, stride, padding, dilation, m.groups, chunk_elems=ctx.chunk_elems)
        if "bias" in acc:
            dims = tuple(range(2, g.dim()))
            acc["bias"].add_(g.to(ctx.acc_dtype).sum(dims).square().sum(0))


class Conv2dRule(_ConvRule):
    spatial = 2


class Conv1dRule(_ConvRule):
    spatial = 1


def conv_rule_for(module: nn.Module, name: str) -> Rule | None:
    """The rule for a convolution whose own parameters are only weight/bias, or None if `module` is
    not one this module handles (the caller then tries the other rules)."""
    if type(module).forward is nn.Conv2d.forward:
        return Conv2dRule()
    if type(module).forward is nn.Conv1d.forward:
        return Conv1dRule()
    return None
