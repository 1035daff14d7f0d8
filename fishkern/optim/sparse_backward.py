"""Sparse backward: the weight gradient of a layer computed only at its k masked entries.

Backward of ``nn.Linear`` costs two GEMMs, the input gradient ``G·W`` and the weight gradient
``Gᵀ·X``; a FISH mask keeps ~0.5% of the latter. With sparse backward a layer that owns masked
entries computes the input gradient densely and the weight gradient only at its entries
(``fishkern::sampled_matmul``, an SDDMM: 2·T·k multiply-adds instead of 2·T·OUT·IN), and hands
autograd a ``MaskedGrad`` over those k values: no dense weight gradient is ever allocated. The
optimizer's post-accumulate-grad hook copies the k values into its flat gradient buffer, so
everything that reads ``.grad`` (clipping, GradScaler, accumulation over micro-batches) works as
with ``free_dense_grads=True``, which sparse backward turns on.

Layers (only these exact types, whose forward is known: a subclass with its own forward keeps
torch's backward):

- ``nn.Linear`` and Hugging Face's ``Conv1D`` (GPT-2; weight stored [IN, OUT]): sampled weight
  gradient; above ``dense_above`` density the layer forms its dense weight gradient in a temporary
  and gathers the entries (still no ``.grad`` of the dense size; a FISH mask can put most of its
  budget into one pooler or head matrix, where the dense GEMM is cheaper);
- ``nn.Embedding`` (``max_norm=None``, ``sparse=False``; ``padding_idx`` and ``scale_grad_by_freq``
  kept): ``fishkern::sampled_embedding_grad``, the masked entries of the rows in the batch only.

Biases and norms keep torch's (small) dense gradients. A layer whose weight has no masked entry
is left alone: ``free_dense_grads`` freezes its weight, so autograd computes no weight gradient.
Under ``torch.autocast`` the layer computes in the autocast dtype as ``F.linear`` would, with the
weight gradient's products summed in fp32. Under ``torch.no_grad`` (evaluation) the layer runs its
plain forward. Not supported (clear errors): DistributedDataParallel (its reducer needs dense
gradients), sharded (FSDP2) weights, double backward, two optimizers over the same layer.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..ops.sampled_embedding import sampled_embedding_grad
from ..ops.sampled_matmul import sampled_matmul
from ._grad_proxy import MaskedGrad

# Density (k / weight entries) above which a Linear layer forms its dense weight gradient and
# gathers, per device type. CPU: measured with benchmarks/bench_sparse_backward.py on a 2-core Xeon
# (T = 1024 tokens; 768x768, 3072x768, 768x3072, 1024x1024, 4096x1024 weights;
# benchmarks/results/sparse_backward_cpu.md): the sampled kernel is 2-5x faster at 0.5%, 1.5-2x at
# 2.5%, even between 5% and 10%. CUDA: not measured on a GPU yet; 0.1% is a guess from bandwidth
# (each entry reads 2·T values) against an H200's GEMM rate.
DENSE_ABOVE = {"cpu": 0.05, "cuda": 0.001}
_DEFAULT_DENSE_ABOVE = 0.001

_ATTR = "_fishkern_sparse_backward"  # a patched module's _Layer


def _conv1d_type():
    """transformers' Conv1D class, if transformers is already imported (never imported here)."""
    import sys

    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


@dataclass(eq=False)
class _Layer:
    """One patched module: its weight, the weight's mask entries (the optimizer's own index tensors:
    MaskedGrad's fast paths match entries by identity) and how its weight gradient is formed."""

    name: str
    kind: str  # "linear", "conv1d", "embedding"
    module: nn.Module
    weight: nn.Parameter
    rows: Tensor  # sorted row-major flat indices (a view of the optimizer's layout)
    mem: Tensor  # the same entries' memory offsets
    state_dtype: torch.dtype
    dense: bool  # dense-then-gather instead of the sampled kernel
    k: int

    def __deepcopy__(self, memo):
        # a deep copy of a patched model has no optimizer: its layers run their plain forward
        return None

    @property
    def density(self) -> float:
        return self.k / max(1, self.weight.numel())

    def masked_grad(self, values: Tensor) -> MaskedGrad:
        g = MaskedGrad(values.to(self.state_dtype), self.rows, self.mem, self.weight)
        g._k_partial = True  # the other entries were never computed (not zero): see _grads._gather_grad
        return g

    def product_grad(self, a: Tensor, b: Tensor) -> MaskedGrad:
        """The entries of aᵀ·b (a: [T, R], b: [T, C], the weight [R, C])."""
        if a.dtype != b.dtype:
            a, b = a.float(), b.float()
        if self.dense:
            acc = torch.float64 if a.dtype == torch.float64 else torch.float32
            full = a.t().to(acc) @ b.to(acc)
            return self.masked_grad(full.reshape(-1).index_select(0, self.rows))
        return self.masked_grad(sampled_matmul(a, b, self.rows))


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer: _Layer, dtype):
        w = weight if dtype is None else weight.to(dtype)
        b = bias if (bias is None or dtype is None) else bias.to(dtype)
        ctx.layer, ctx.bias_dtype = layer, None if bias is None else bias.dtype
        ctx.save_for_backward(x, w)
        return F.linear(x, w, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g.matmul(w)
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = ctx.layer.product_grad(g2, x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(ctx.bias_dtype)
        return gx, gw, gb, None, None


class _SparseConv1D(torch.autograd.Function):
    """HF Conv1D: y = x @ W + b with W stored [IN, OUT]."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer: _Layer, dtype):
        w = weight if dtype is None else weight.to(dtype)
        b = bias if dtype is None else bias.to(dtype)
        ctx.layer, ctx.bias_dtype, ctx.in_shape = layer, bias.dtype, x.shape
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, w)
        return torch.addmm(b, x2, w).view(*x.shape[:-1], w.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x2, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ w.t()).view(ctx.in_shape)
        if ctx.needs_input_grad[1]:
            gw = ctx.layer.product_grad(x2, g2)
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(ctx.bias_dtype)
        return gx, gw, gb, None, None


class _SparseEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, layer: _Layer, padding_idx, scale_grad_by_freq):
        ctx.layer, ctx.padding_idx, ctx.scale = layer, padding_idx, scale_grad_by_freq
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight, padding_idx, None, 2.0, scale_grad_by_freq, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        layer = ctx.layer
        gw = None
        if ctx.needs_input_grad[1]:
            values = sampled_embedding_grad(ids.reshape(-1), g.reshape(-1, g.shape[-1]), layer.rows,
                                            layer.weight.shape[0], ctx.padding_idx, ctx.scale)
            gw = layer.masked_grad(values)
        return None, gw, None, None, None


def _plain(module: nn.Module) -> bool:
    """No sparse path for this call: no gradient recorded, or the weight was replaced."""
    layer = module.__dict__.get(_ATTR)
    return layer is None or not torch.is_grad_enabled() or module.weight is not layer.weight


def _linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    if _plain(self):
        return nn.Linear.forward(self, input)
    return _SparseLinear.apply(input, self.weight, self.bias, self.__dict__[_ATTR], _autocast_dtype(input.device.type))


def _conv1d_forward(self, x: Tensor) -> Tensor:
    if _plain(self):
        return type(self).forward(self, x)
    return _SparseConv1D.apply(x, self.weight, self.bias, self.__dict__[_ATTR], _autocast_dtype(x.device.type))


def _embedding_forward(self: nn.Embedding, input: Tensor) -> Tensor:
    if _plain(self) or self.max_norm is not None or self.sparse:
        return nn.Embedding.forward(self, input)
    return _SparseEmbedding.apply(input, self.weight, self.__dict__[_ATTR], self.padding_idx, self.scale_grad_by_freq)


def _kind(module: nn.Module) -> str | None:
    t = type(module)
    if t is nn.Linear or (issubclass(t, nn.Linear) and t.forward is nn.Linear.forward):
        return "linear"
    if t is nn.Embedding or (issubclass(t, nn.Embedding) and t.forward is nn.Embedding.forward):
        return "embedding" if module.max_norm is None and not module.sparse else None
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d) and t.forward is conv1d.forward and module.bias is not None:
        return "conv1d"
    return None


_FORWARDS = {"linear": _linear_forward, "conv1d": _conv1d_forward, "embedding": _embedding_forward}


class SparseBackward:
    """The layers of one model patched for one optimizer (``opt.enable_sparse_backward(model)``).

    ``layers()`` lists them; ``remove()`` (or ``opt.disable_sparse_backward()``) gives every module
    back its own forward. Dropping the optimizer removes the patches too.
    """

    def __init__(self, layers: list[_Layer]):
        self._layers = layers
        self._removed = False

    def layers(self) -> list[dict]:
        """One row per patched layer: name, kind, how its weight gradient is formed, k, density."""
        return [
            dict(name=l.name, kind=l.kind, path="dense-then-gather" if l.dense else "sampled", k=l.k,
                 entries=l.weight.numel(), density=l.density)
            for l in self._layers
        ]

    def remove(self) -> None:
        if self._removed:
            return
        _unpatch(self._layers)
        self._removed = True

    @property
    def active(self) -> bool:
        return not self._removed


def _unpatch(layers: list[_Layer]) -> None:
    for l in layers:
        if l.module.__dict__.get(_ATTR) is l:
            del l.module.__dict__[_ATTR]
            if _ours(l.module.__dict__.get("forward")):
                del l.module.__dict__["forward"]


def _is_ddp(model: nn.Module) -> bool:
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, DistributedDataParallel)


def install(optimizer, model: nn.Module, *, dense_above: float | None = None, strict: bool = True) -> SparseBackward:
    """Patch ``model``'s Linear / Conv1D / Embedding layers whose weight ``optimizer`` trains (see the
    module docstring). A layer already patched for another live optimizer is an error; a layer whose
    forward something else replaced on the instance (accelerate's hooks) is left dense. ``strict``:
    a model under DistributedDataParallel is an error (else: nothing is patched)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparse backward patches the layers of an nn.Module; got {type(model).__name__}")
    if dense_above is not None and not 0.0 <= float(dense_above) <= 1.0:
        raise ValueError(f"dense_above is a density in [0, 1], got {dense_above}")
    if _is_ddp(model) or any(_is_ddp(m) for m in model.modules()):
        if strict:
            raise ValueError(
                "sparse backward cannot run under DistributedDataParallel: its reducer reads dense gradients. Use "
                "fishkern.distributed.masked_ddp (masked all-reduce of dense gradients) without sparse backward, "
                "or SparseAverager, which works with it"
            )
        return SparseBackward([])
    from . import ddp_support

    # a DDP wrapper built around the model (or a part of it) before this call: its reducer reads dense gradients
    reduced = ddp_support.ddp_managed() if ddp_support.distributed_initialized() else set()
    if reduced and any(id(p) in reduced for p in model.parameters()):
        if strict:
            raise ValueError(
                "sparse backward cannot run under DistributedDataParallel: a DDP module reduces this model's "
                "parameters, and its reducer reads dense gradients. Build the optimizer with sparse_backward=False"
            )
        return SparseBackward([])
    where: dict[int, tuple[int, int]] = {}
    for gi, lay in enumerate(optimizer._layouts):
        for i, p in enumerate(lay.owners):
            where[id(p)] = (gi, i)
    layers: list[_Layer] = []
    for name, module in model.named_modules():
        kind = _kind(module)
        weight = getattr(module, "weight", None)
        if kind is None or not isinstance(weight, Tensor) or id(weight) not in where:
            continue
        gi, i = where[id(weight)]
        lay = optimizer._layouts[gi]
        if lay.k(i) == 0 or lay.shards[i] is not None or lay.params[i] is not weight:
            continue  # frozen (no gradient at all), or a sharded weight: torch's backward
        if module.__dict__.get(_ATTR) is not None:
            raise RuntimeError(
                f"layer {name!r} already computes its weight gradient sparsely for another optimizer; one layer "
                "can feed one masked optimizer (call disable_sparse_backward() on the other one, or drop it, first)"
            )
        if "forward" in module.__dict__ and not _ours(module.__dict__["forward"]):
            continue  # forward replaced on the instance (accelerate's hooks, another library): left dense
        limit = dense_above if dense_above is not None else DENSE_ABOVE.get(weight.device.type, _DEFAULT_DENSE_ABOVE)
        k = lay.k(i)
        layers.append(_Layer(name or type(module).__name__, kind, module, weight, lay.indices[i], lay.mem_indices[i],
                             lay.state_dtype, kind != "embedding" and k > limit * weight.numel(), k))
    for l in layers:
        l.module.__dict__[_ATTR] = l
        l.module.forward = _FORWARDS[l.kind].__get__(l.module)
    handle = SparseBackward(layers)
    weakref.finalize(optimizer, _unpatch, layers)
    return handle


def patched_layers(model: nn.Module) -> Iterable[str]:
    """Names of the layers of ``model`` that compute their weight gradient sparsely now."""
    return [n for n, m in model.named_modules() if m.__dict__.get(_ATTR) is not None]


def _ours(forward) -> bool:
    """An instance forward installed by this module (on this module or, deep-copied, on a copy)."""
    return getattr(forward, "__func__", None) in _FORWARDS.values()
