"""Per-layer Fisher rules for convolutions: Σₙ Gₙ² of a conv layer's weight and bias from its input
and its output gradient (see rule_base.py for the contract a rule follows)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rule_base import Rule, _chunks, _Unsupported


class Conv2dRule(Rule):
    """Per sample Gₙ = gₙ · unfold(xₙ)ᵀ per group, summed over output positions."""

    def accumulate(self, m: nn.Conv2d, args, kwargs, g, lengths, acc, ctx):
        x = args[0] if args else kwargs["input"]
        if x.dim() != 4:
            raise _Unsupported(f"{type(m).__name__} called on an unbatched {x.dim()}-D input")
        dt = ctx.acc_dtype
        padding = m.padding
        if isinstance(padding, str) or m.padding_mode != "zeros":
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        B, G = x.shape[0], m.groups
        cout, cin_g = m.out_channels, m.in_channels // G
        kk = cin_g * math.prod(m.kernel_size)
        L = g.shape[2] * g.shape[3]
        if "weight" in acc:
            w = acc["weight"].view(G, cout // G, kk)
            per_sample = (cin_g * G * math.prod(m.kernel_size) + cout) * L + cout * kk
            for s, e in _chunks(B, per_sample, ctx.chunk_elems):
                cols = F.unfold(x[s:e].to(dt), m.kernel_size, m.dilation, padding, m.stride)  # (c, Cin·k, L)
                c = e - s
                cols = cols.view(c, G, kk, L)
                gg = g[s:e].to(dt).reshape(c, G, cout // G, L)
                Gn = torch.einsum("bgol,bgil->bgoi", gg, cols)
                w.add_(Gn.square_().sum(0))
        if "bias" in acc:
            acc["bias"].add_(g.to(dt).sum((2, 3)).square().sum(0))


def conv_rule_for(module: nn.Module, name: str) -> Rule | None:
    """The rule for a convolution whose own parameters are only weight/bias, or None if `module` is
    not one this module handles (the caller then tries the other rules)."""
    if type(module).forward is nn.Conv2d.forward:
        return Conv2dRule()
    return None

