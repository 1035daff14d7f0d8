"""Per-layer rules: Σₙ Gₙ² for a module's own parameters from its input and its output gradient.

Gₙ is the gradient of sample n's loss with respect to a parameter. A rule receives the module's
batched input (dim 0 = samples) and the batched gradient of the module's output, and adds
Σₙ Gₙ² into fp32 (fp64 for fp64 models) accumulators, without ever holding a B × out × in tensor:
work is chunked over samples so that at most `chunk_elems` per-sample entries exist at once.

Every rule is plain PyTorch; the Linear-over-a-sequence rule also has a Triton kernel (CUDA, or the
interpreter when forced) that forms each sample's gradient tile in registers.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK_ELEMS = 1 << 21  # per-sample entries alive at once (8 MiB in fp32: near the CPU caches)


class Context:
    """What a rule may use besides the module's input and output gradient."""

    def __init__(self, acc_dtype: torch.dtype, use_triton: bool, chunk_elems: int):
        self.acc_dtype = acc_dtype
        self.use_triton = use_triton
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


def _forward_is(module: nn.Module, cls: type) -> bool:
    return type(module).forward is cls.forward


def _own_param_names(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters(recurse=False)}


class LinearRule(Rule):
    """y = x Wᵀ + b. Per sample Gₙ = Σ_t g_tᵀ x_t. Without a token dimension Σₙ Gₙ² = (g²)ᵀ(x²)."""

    def accumulate(self, m, args, kwargs, g, lengths, acc, ctx):
        x = args[0] if args else kwargs["input"]
        B, fin, fout = x.shape[0], x.shape[-1], g.shape[-1]
        dt = ctx.acc_dtype
        if x.dim() == 2:
            if "weight" in acc:
                acc["weight"].add_(g.to(dt).square().t() @ x.to(dt).square())
            if "bias" in acc:
                acc["bias"].add_(g.to(dt).square().sum(0))
            return
        x3, g3 = x.reshape(B, -1, fin), g.reshape(B, -1, fout)
        if lengths is not None and x.dim() != 3:
            lengths = None
        if "weight" in acc:
            if ctx.use_triton and dt == torch.float32:
                from .linear_triton import linear_fisher_triton_

                linear_fisher_triton_(acc["weight"], x3, g3, lengths)
            else:
                _linear_seq_torch(acc["weight"], x3, g3, lengths, dt, ctx.chunk_elems)
        if "bias" in acc:
            acc["bias"].add_(g3.to(dt).sum(1).square().sum(0))


# Below this many token pairs more than tokens per sample, the pair (Gram) form is cheaper on CPU than
# forming per-sample gradients: it is one GEMM and never writes B × out × in entries to memory.
_GRAM_EXTRA_PAIRS = 32


def _linear_seq_torch(w: Tensor, x3: Tensor, g3: Tensor, lengths: Tensor | None, dt, chunk_elems: int) -> None:
    """Σₙ (gₙᵀxₙ)² for (B, T, ·) inputs, in one of two exact forms:

    per-sample: Gₙ = gₙᵀxₙ by bmm over chunks of samples, squared and summed;
    pairs:      (Gₙ)²_oi = Σ_{t,t'} (g_to g_t'o)(x_ti x_t'i), so Σₙ Gₙ² = Aᵀ C with one row per
                token pair t ≤ t' of each sample (off-diagonal pairs counted twice) — a single GEMM
                whose inner size is the number of pairs. Cheaper for short sequences.
    Tokens past `lengths` (right padding) are left out of both."""
    B, T, fin = x3.shape
    fout = g3.shape[2]
    L = lengths if lengths is not None else torch.full((B,), T, device=x3.device)
    pairs = (L * (L + 1) // 2).sum().item()
    if pairs <= L.sum().item() + _GRAM_EXTRA_PAIRS * B:
        iu = torch.triu_indices(T, T, device=x3.device)  # (2, P): t <= t'
        valid = iu[1][None, :] < L[:, None]  # (B, P)
        n, p = valid.nonzero(as_tuple=True)
        t0, t1 = iu[0][p], iu[1][p]
        weight = torch.where(t0 == t1, 1.0, 2.0).to(dt)[:, None]
        step = max(1, chunk_elems // (fout + fin))
        for s in range(0, n.numel(), step):
            ns, a, b = n[s : s + step], t0[s : s + step], t1[s : s + step]
            A = g3[ns, a].to(dt) * g3[ns, b].to(dt) * weight[s : s + step]
            C = x3[ns, a].to(dt) * x3[ns, b].to(dt)
            w.addmm_(A.t(), C)
        return
    for s, e in _chunks(B, fout * fin, chunk_elems):
        Tc = int(L[s:e].max())
        if Tc == 0:
            continue
        G = torch.bmm(g3[s:e, :Tc].to(dt).transpose(1, 2), x3[s:e, :Tc].to(dt))  # (c, out, in)
        w.add_(G.square_().sum(0))


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


class EmbeddingRule(Rule):
    """Per (sample, id) sums of the output gradient, squared, added to the id's row. Occurrences of
    padding_idx get no gradient (as nn.Embedding); scale_grad_by_freq divides by the id's count in
    the sample (the reference runs one sample at a time)."""

    def accumulate(self, m: nn.Embedding, args, kwargs, g, lengths, acc, ctx):
        if "weight" not in acc:
            return
        ids = args[0] if args else kwargs["input"]
        dt = ctx.acc_dtype
        B, V, d = ids.shape[0], m.num_embeddings, m.embedding_dim
        flat_ids = ids.reshape(B, -1).long()
        gf = g.reshape(B, -1, d)
        key = (torch.arange(B, device=ids.device)[:, None] * V + flat_ids).reshape(-1)
        rows = gf.reshape(-1, d)
        if m.padding_idx is not None:
            keep = flat_ids.reshape(-1) != m.padding_idx
            key, rows = key[keep], rows[keep]
        uniq, inverse = torch.unique(key, return_inverse=True)
        sums = torch.zeros(uniq.numel(), d, dtype=dt, device=g.device).index_add_(0, inverse, rows.to(dt))
        if m.scale_grad_by_freq:
            counts = torch.bincount(inverse, minlength=uniq.numel()).to(dt)
            sums /= counts[:, None]
        acc["weight"].index_add_(0, uniq % V, sums.square_())


def _normalized(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _affine_norm(xhat: Tensor, g: Tensor, B: int, param_shape, acc):
    """weight/bias of y = x̂·w + b: per-sample gradients are sums over all non-parameter dims."""
    if "weight" in acc:
        acc["weight"].add_((g * xhat).reshape(B, -1, *param_shape).sum(1).square().sum(0))
    if "bias" in acc:
        acc["bias"].add_(g.reshape(B, -1, *param_shape).sum(1).square().sum(0))


class LayerNormRule(Rule):
    def accumulate(self, m: nn.LayerNorm, args, kwargs, g, lengths, acc, ctx):
        x = args[0] if args else kwargs["input"]
        shape = tuple(m.normalized_shape)
        if x.dim() <= len(shape):
            raise _Unsupported("LayerNorm called without a batch dimension")
        dt = ctx.acc_dtype
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        xhat = _normalized(x.to(dt), dims, m.eps)
        _affine_norm(xhat, g.to(dt), x.shape[0], shape, acc)


class GroupNormRule(Rule):
    def accumulate(self, m: nn.GroupNorm, args, kwargs, g, lengths, acc, ctx):
        x = args[0] if args else kwargs["input"]
        dt = ctx.acc_dtype
        B, C = x.shape[0], x.shape[1]
        xg = x.to(dt).reshape(B, m.num_groups, -1)
        xhat = _normalized(xg, (2,), m.eps).reshape(x.shape)
        # move channels last so the per-sample sum runs over every other dim
        perm = (0, *range(2, x.dim()), 1)
        _affine_norm(xhat.permute(perm), g.to(dt).permute(perm), B, (C,), acc)


class BatchNormEvalRule(Rule):
    """BatchNorm in eval mode with running statistics: samples are independent, x̂ uses the running
    mean and variance (which the Fisher pass neither uses from the batch nor updates)."""

    def accumulate(self, m: nn.modules.batchnorm._BatchNorm, args, kwargs, g, lengths, acc, ctx):
        x = args[0] if args else kwargs["input"]
        dt = ctx.acc_dtype
        B, C = x.shape[0], x.shape[1]
        view = (1, C) + (1,) * (x.dim() - 2)
        xhat = (x.to(dt) - m.running_mean.to(dt).view(view)) * torch.rsqrt(m.running_var.to(dt).view(view) + m.eps)
        perm = (0, *range(2, x.dim()), 1)
        _affine_norm(xhat.permute(perm), g.to(dt).permute(perm), B, (C,), acc)


class _Unsupported(Exception):
    """This module cannot be handled batched; the estimator falls back to the per-sample loop."""


class GenericRule(Rule):
    """Any other module with parameters of its own: per-sample gradients by torch.func (a vmap over
    samples of the vector-Jacobian product of the module's forward), in chunks, squared and summed.
    Correct for any module whose forward treats dim 0 of its tensor inputs as independent samples."""

    exact_batched = False
    _warned: set[str] = set()

    def __init__(self, module: nn.Module, name: str):
        key = type(module).__qualname__
        if key not in GenericRule._warned:
            GenericRule._warned.add(key)
            warnings.warn(
                f"fishkern Fisher: no batched rule for {key} (first at '{name}'); using the generic "
                "per-sample torch.func fallback for its own parameters (correct, slower)",
                stacklevel=4,
            )

    def accumulate_multi(self, m, args, kwargs, grads_out: list[Tensor | None], outs: list[Tensor], B, acc, ctx):
        from torch.func import functional_call, vjp, vmap

        names = [n for n, _ in m.named_parameters(recurse=False) if n in acc]
        if not names:
            return
        params = {n: getattr(m, n).detach() for n in names}
        flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        batched = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B for t in flat]
        cot = [gr if gr is not None else torch.zeros_like(o) for gr, o in zip(grads_out, outs)]

        def one_sample(p, sample_leaves, sample_cot):
            def f(pp):
                leaves = [
                    (v.unsqueeze(0) if b else v) for v, b in zip(sample_leaves, batched)
                ]
                a, kw = torch.utils._pytree.tree_unflatten(leaves, spec)
                out = functional_call(m, pp, a, kw)
                return tuple(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point())

            _, pullback = vjp(f, p)
            (gp,) = pullback(tuple(c.unsqueeze(0) for c in sample_cot))
            return gp

        per = sum(params[n].numel() for n in names)
        for s, e in _chunks(B, per * 2, ctx.chunk_elems):
            leaves = [(t[s:e] if b else t) for t, b in zip(flat, batched)]
            in_dims = ([0 if b else None for b in batched],)
            cc = [c[s:e] for c in cot]
            gps = vmap(one_sample, in_dims=(None, in_dims[0], 0))(params, leaves, cc)
            for n in names:
                acc[n].add_(gps[n].to(ctx.acc_dtype).square().sum(0))


def rule_for(module: nn.Module, name: str) -> Rule:
    own = _own_param_names(module)
    simple = own <= {"weight", "bias"}
    if simple and _forward_is(module, nn.Linear):
        return LinearRule()
    if simple and _forward_is(module, nn.Conv2d):
        return Conv2dRule()
    if simple and _forward_is(module, nn.Embedding):
        if module.max_norm is not None:
            raise _Unsupported(f"nn.Embedding with max_norm at '{name}' rewrites its weight during the forward")
        return EmbeddingRule()
    if simple and _forward_is(module, nn.LayerNorm):
        return LayerNormRule()
    if simple and _forward_is(module, nn.GroupNorm):
        return GroupNormRule()
    if simple and isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
        _forward_is(module, c) for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    ):
        if module.running_mean is None or module.running_var is None:
            raise _Unsupported(
                f"BatchNorm at '{name}' has no running statistics, so in eval mode it still normalises with "
                "batch statistics and samples are not independent"
            )
        return BatchNormEvalRule()
    return GenericRule(module, name)
