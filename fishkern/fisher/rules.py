"""Per-layer rules: Σₙ Gₙ² for a module's own parameters from its input and its output gradient.

Gₙ is the gradient of sample n's loss with respect to a parameter. A rule receives the module's
batched input (dim 0 = samples) and the batched gradient of the module's output, and adds
Σₙ Gₙ² into fp32 (fp64 for fp64 models) accumulators, without ever holding a B × out × in tensor:
work is chunked over samples so that at most `chunk_elems` per-sample entries exist at once.

Every rule is plain PyTorch, except the Linear-over-a-sequence rule, which calls the op
``fishkern::linear_fisher_acc_`` (fishkern/ops/linear_fisher.py): a PyTorch default kernel on every
device and a Triton kernel on CUDA that forms each sample's gradient tile in registers.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch import Tensor

from ..ops import linear_fisher as lf
from .conv_rules import conv_rule_for
from .rule_base import DEFAULT_CHUNK_ELEMS, LINEAR_KERNELS, Context, Rule, _chunks, _Unsupported

__all__ = ["DEFAULT_CHUNK_ELEMS", "LINEAR_KERNELS", "Context", "Rule", "rule_for"]


def _forward_is(module: nn.Module, cls: type) -> bool:
    return type(module).forward is cls.forward


def _own_param_names(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters(recurse=False)}


class LinearRule(Rule):
    """y = x Wᵀ + b. Per sample Gₙ = Σ_t g_tᵀ x_t. Without a token dimension Σₙ Gₙ² = (g²)ᵀ(x²)."""

    def accumulate(self, m, args, kwargs, g, lengths, acc, ctx):
        x = args[0] if args else kwargs["input"]
        _linear_like(acc.get("weight"), acc.get("bias"), x, g, lengths, ctx, transposed=False)


class Conv1DRule(Rule):
    """GPT-2's ``Conv1D``: y = x W + b with W stored (in, out), the transpose of nn.Linear's layout.
    The same sums as LinearRule with the roles of x and g swapped in the weight's product."""

    def accumulate(self, m, args, kwargs, g, lengths, acc, ctx):
        x = args[0] if args else kwargs["x"]
        _linear_like(acc.get("weight"), acc.get("bias"), x, g, lengths, ctx, transposed=True)


def _linear_like(w: Tensor | None, b: Tensor | None, x: Tensor, g: Tensor, lengths, ctx: Context, *, transposed: bool):
    """Σₙ Gₙ² for the weight (out, in) — or (in, out) when ``transposed`` — and the bias of an affine
    map of the last dimension, x (B, ..., in) → g (B, ..., out)."""
    B, fin, fout = x.shape[0], x.shape[-1], g.shape[-1]
    dt = ctx.acc_dtype
    if x.dim() == 2:
        if w is not None:
            g2, x2 = g.to(dt).square(), x.to(dt).square()
            w.add_(x2.t() @ g2 if transposed else g2.t() @ x2)
        if b is not None:
            b.add_(g.to(dt).square().sum(0))
        return
    x3, g3 = x.reshape(B, -1, fin), g.reshape(B, -1, fout)
    if lengths is not None and x.dim() != 3:
        lengths = None
    if w is not None:
        # the op fills acc[o, i] += Σₙ (Σ_t g[t, o] x[t, i])²: for (in, out) storage, swap x and g
        _linear_seq(w, g3, x3, lengths, ctx) if transposed else _linear_seq(w, x3, g3, lengths, ctx)
    if b is not None:
        b.add_(g3.to(dt).sum(1).square().sum(0))


def _linear_seq(w: Tensor, x3: Tensor, g3: Tensor, lengths: Tensor | None, ctx: Context) -> None:
    """Σₙ (gₙᵀxₙ)² for (B, T, ·) inputs through fishkern::linear_fisher_acc_ (its kernels: per-sample
    gradients in chunks or the token-pair form in PyTorch, or the Triton kernel on CUDA)."""
    # One input dtype the op takes for this accumulator: x and g differ under autocast (fp32 input,
    # bf16 output gradient), and a float64 accumulator takes float64 inputs.
    dt = w.dtype
    in_dt = x3.dtype if x3.dtype == g3.dtype else torch.promote_types(x3.dtype, g3.dtype)
    if dt == torch.float64 or in_dt not in lf.INPUT_DTYPES:
        in_dt = dt
    x3, g3 = x3.to(in_dt), g3.to(in_dt)
    if lengths is not None and lengths.device != x3.device:
        lengths = lengths.to(x3.device)
    # The estimator's lengths are an attention mask's row sums over these T tokens, so in [0, T] by
    # construction: no per-call check (a device sync on CUDA); the kernels clamp as a safety net.
    kw = {"check_lengths": False}
    if ctx.linear_kernel == "triton" and dt == torch.float32:
        lf.linear_fisher_triton_(w, x3, g3, lengths, **kw)
    elif ctx.linear_kernel == "op":
        lf.linear_fisher_acc_(w, x3, g3, lengths, chunk_elems=ctx.chunk_elems, **kw)
    else:
        lf.linear_fisher_default_(w, x3, g3, lengths, chunk_elems=ctx.chunk_elems, **kw)


class EmbeddingRule(Rule):
    """Per (sample, id) sums of the output gradient, squared, added to the id's row. Occurrences of
    padding_idx get no gradient (as nn.Embedding); scale_grad_by_freq divides by the id's count in
    the sample (the reference runs one sample at a time). ``scale``: a constant the module multiplies
    its output by (Gemma's scaled word embeddings, √hidden in the weight's dtype)."""

    def __init__(self, scale: Tensor | None = None):
        self.scale = scale

    def accumulate(self, m: nn.Embedding, args, kwargs, g, lengths, acc, ctx):
        if "weight" not in acc:
            return
        rows, sums = self.row_sums(m, args[0] if args else kwargs["input"], g, ctx.acc_dtype)
        acc["weight"].index_add_(0, rows, sums.square())

    def row_sums(self, m: nn.Embedding, ids: Tensor, g: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        """(rows, sums): one entry per distinct (sample, id) of the batch, in sample-major order —
        the id's row and that sample's gradient of the row (sums of its output gradients)."""
        uniq, inverse, keep = sample_id_keys(m, ids)
        d = m.embedding_dim
        flat = g.reshape(-1, d)
        if keep is not None:
            flat = flat[keep]
        sums = torch.zeros(uniq.numel(), d, dtype=dt, device=g.device).index_add_(0, inverse, flat.to(dt))
        if self.scale is not None:
            sums *= self.scale.to(device=sums.device, dtype=dt)
        if m.scale_grad_by_freq:
            counts = torch.bincount(inverse, minlength=uniq.numel()).to(dt)
            sums /= counts[:, None]
        return uniq % m.num_embeddings, sums


def sample_id_keys(m: nn.Embedding, ids: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """The distinct (sample n, id) pairs of a (B, ...) id tensor as sorted keys n·V + id, each
    occurrence's key index, and which occurrences count (None: all; padding_idx ones do not)."""
    B, V = ids.shape[0], m.num_embeddings
    flat_ids = ids.reshape(B, -1).long()
    key = (torch.arange(B, device=ids.device)[:, None] * V + flat_ids).reshape(-1)
    keep = None
    if m.padding_idx is not None:
        keep = flat_ids.reshape(-1) != m.padding_idx
        key = key[keep]
    uniq, inverse = torch.unique(key, return_inverse=True)
    return uniq, inverse, keep


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


class RMSNormRule(Rule):
    """y = w ⊙ x̂ (Llama, Qwen2, Mistral, torch.nn.RMSNorm) or (1 + w) ⊙ x̂ (Gemma), x̂ = x / rms(x) over
    the weight's dimensions: either way ∂y/∂w = x̂. ``upcast``: the Hugging Face forms compute x̂ in
    float32 whatever the input dtype (also float64); ``round_to_input``: Llama's form rounds x̂ to the
    input dtype before the product (Gemma's does not)."""

    def __init__(self, eps: float | None, upcast: bool, round_to_input: bool):
        self.eps, self.upcast, self.round_to_input = eps, upcast, round_to_input

    def accumulate(self, m, args, kwargs, g, lengths, acc, ctx):
        if "weight" not in acc:
            return
        x = args[0] if args else next(iter(kwargs.values()))
        shape = tuple(m.weight.shape)
        if x.dim() <= len(shape):
            raise _Unsupported("RMSNorm called without a batch dimension")
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        cdt = torch.float32 if self.upcast else (x.dtype if x.dtype == torch.float64 else torch.float32)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        xc = x.to(cdt)
        xhat = xc * torch.rsqrt(xc.square().mean(dims, keepdim=True) + eps)
        dt = ctx.acc_dtype
        if self.round_to_input:  # weight * x̂.to(input dtype): the product in the input's dtype
            xhat, g = xhat.to(x.dtype).to(dt), g.to(dt)
        elif self.upcast:  # (x̂ * (1 + w.float())).type_as(x): the weight's gradient formed in float32
            xhat, g = xhat, g.to(torch.float32)
        else:
            xhat, g = xhat.to(dt), g.to(dt)
        per_sample = (g * xhat).reshape(x.shape[0], -1, *shape).sum(1).to(dt)
        acc["weight"].add_(per_sample.square().sum(0))


def _rms_norm_rule(module: nn.Module) -> RMSNormRule | None:
    """The rule for an RMSNorm module, or None. torch.nn.RMSNorm by its forward; Hugging Face's by
    name (``*RMSNorm``: Llama, Qwen2/3, Mistral, Gemma, …) with one 1-D ``weight`` and its epsilon.
    The first-batch self-check guards the name match: a variant that computes something else falls
    back to the per-sample loop instead of returning wrong scores."""
    rms_cls = getattr(nn, "RMSNorm", None)
    own = _own_param_names(module)
    if rms_cls is not None and _forward_is(module, rms_cls):
        return RMSNormRule(module.eps, upcast=False, round_to_input=False) if own == {"weight"} else None
    if not type(module).__name__.lower().endswith("rmsnorm") or own != {"weight"} or module.weight.dim() != 1:
        return None
    for attr, llama_style in (("variance_epsilon", True), ("eps", False)):
        eps = getattr(module, attr, None)
        if isinstance(eps, float):
            return RMSNormRule(eps, upcast=True, round_to_input=llama_style)
    return None


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


def _embedding_scale(module: nn.Module) -> Tensor | None | bool:
    """None for nn.Embedding's own forward; the output scale of a Hugging Face scaled word embedding
    (Gemma: output = embedding(ids) · embed_scale in the weight's dtype); False for other subclasses."""
    if _forward_is(module, nn.Embedding):
        return None
    scale = getattr(module, "embed_scale", None)
    if type(module).__name__.endswith("ScaledWordEmbedding") and isinstance(scale, (Tensor, float)):
        return torch.as_tensor(scale).to(module.weight.dtype).detach()
    return False


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D (by name: transformers need not be importable)."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, Tensor) and w.dim() == 2
            and getattr(module, "nf", None) == w.shape[1])


def rule_for(module: nn.Module, name: str) -> Rule:
    own = _own_param_names(module)
    simple = own <= {"weight", "bias"}
    if simple and _forward_is(module, nn.Linear):
        return LinearRule()
    if simple and _is_conv1d(module):
        return Conv1DRule()
    conv = conv_rule_for(module, name) if simple else None
    if conv is not None:
        return conv
    if own == {"weight"} and isinstance(module, nn.Embedding):
        scale = _embedding_scale(module)
        if scale is not False:
            if module.max_norm is not None:
                raise _Unsupported(f"nn.Embedding with max_norm at '{name}' rewrites its weight during the forward")
            return EmbeddingRule(scale)
    rms = _rms_norm_rule(module)
    if rms is not None:
        return rms
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
