"""``MaskedGrad``: what ``.grad`` holds after backward with ``free_dense_grads=True``.

The post-accumulate-grad hook copies a parameter's k gradient entries into the optimizer's flat
buffer and frees the dense gradient. Leaving ``.grad = None`` then made every tool that reads
``.grad`` see no gradient — ``torch.nn.utils.clip_grad_norm_`` returned 0.0 and clipped nothing,
silently. Instead ``.grad`` is set to a ``MaskedGrad``: a tensor with the parameter's shape, dtype,
device and strides whose only storage is the k entries in the optimizer's buffer (no memory of its
own). Every op sees it as the dense gradient with zeros at the unselected entries:

- norms (``linalg.vector_norm``, ``_foreach_norm``), in-place pointwise ops (``mul_``, ``clamp_``,
  ``add_``, ...), their ``_foreach_*_`` forms, ``zero_``/``fill_``/``copy_`` and GradScaler's
  unscale run on the k entries directly, O(k): ``torch.nn.utils.clip_grad_norm_`` /
  ``clip_grad_value_`` (foreach or not) and ``GradScaler.unscale_`` scale the very entries that
  ``step()`` reads;
- autograd's accumulation of the next backward (``grad += new``) adds the new gradient's k
  entries, so gradient accumulation stays O(k);
- any other op works on a dense copy (O(|θ|) while it runs); an in-place one is written back.
  Views (``p.grad[0]``, ``p.grad.view(-1)``) are copies: reading them is right, writing through
  them does not reach the optimizer (``p.grad[idx] = v`` does: ``__setitem__`` writes back).

Unselected entries are not stored: a write to them is dropped (the optimizer never reads them).
The values are kept in the optimizer's state dtype (fp32 for bf16/fp16 parameters), which is also
the precision in which accumulation happens.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._layout import flat_memory_view

aten = torch.ops.aten


class MaskedGrad(Tensor):
    """A parameter's gradient stored as its k masked entries (see the module docstring)."""

    _k_values: Tensor  # [k], state dtype: a slice of the optimizer's gathered-gradient buffer
    _k_rows: Tensor  # [k] row-major flat indices of the entries (sorted)
    _k_mem: Tensor  # [k] the same entries' offsets in memory (differ for channels_last and such)

    @staticmethod
    def __new__(cls, values: Tensor, rows: Tensor, mem: Tensor, like: Tensor):
        r = Tensor._make_wrapper_subclass(
            cls, like.shape, strides=like.stride(), dtype=like.dtype, device=like.device, requires_grad=False
        )
        r._k_values, r._k_rows, r._k_mem = values, rows, mem
        return r

    # Python-level ops go straight to __torch_dispatch__ (torch's own recipe for wrapper subclasses)
    __torch_function__ = torch._C._disabled_torch_function_impl

    def _alike(self, values: Tensor) -> "MaskedGrad":
        out = MaskedGrad(values, self._k_rows, self._k_mem, self)
        if getattr(self, "_k_partial", False):  # sparse backward's: the other entries were never computed
            out._k_partial = True
        return out

    def _same_entries(self, other: "MaskedGrad") -> bool:
        return other.shape == self.shape and (other._k_rows is self._k_rows or torch.equal(other._k_rows, self._k_rows))

    def to_dense(self, dtype=None, *, masked_grad=None) -> Tensor:  # noqa: D102 - Tensor.to_dense's signature
        """The dense gradient (zeros outside the mask), laid out like the parameter."""
        out = torch.empty_strided(tuple(self.shape), self.stride(), dtype=dtype or self.dtype, device=self.device)
        flat = flat_memory_view(out)
        flat.zero_()
        flat.index_put_((self._k_mem,), self._k_values.to(flat.dtype))
        return out

    def _gather(self, t: Tensor) -> Tensor:
        """The k entries of a dense tensor ``t`` broadcastable to this gradient's shape, in the
        state dtype."""
        if isinstance(t, MaskedGrad):
            return t._k_values if self._same_entries(t) else self._gather(t.to_dense())
        if t.shape == self.shape and t.stride() == self.stride():
            src = flat_memory_view(t).index_select(0, self._k_mem)
        else:
            src = t.expand(self.shape).reshape(-1).index_select(0, self._k_rows)
        return src.to(self._k_values.dtype)

    def _write_back(self, dense: Tensor) -> None:
        self._k_values.copy_(self._gather(dense))

    def __setitem__(self, key, value) -> None:
        dense = self.to_dense()
        dense[key] = value.to_dense() if isinstance(value, MaskedGrad) else value
        self._write_back(dense)

    def __repr__(self, *, tensor_contents=None) -> str:
        return (
            f"MaskedGrad(k={self._k_values.numel()} of {self.numel()} entries, held by the masked optimizer; "
            f"as dense:\n{self.to_dense()!r})"
        )

    def __deepcopy__(self, memo):
        return self.to_dense()

    def __reduce_ex__(self, protocol):
        return self.to_dense().__reduce_ex__(protocol)

    def numpy(self, *args, **kwargs):
        return self.to_dense().numpy(*args, **kwargs)

    # ------------------------------------------------------------------ dispatch
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        fast = _FAST.get(packet)
        if fast is not None:
            out = fast(func, args, kwargs)
            if out is not NotImplemented:
                return out
        # in-place is read from the schema (the first argument is written), not from op tags
        # that older torch versions lack
        if packet.__name__.startswith("_foreach_") and _writes_first(func):
            return _foreach_inplace(func, args, kwargs)
        if args and isinstance(args[0], MaskedGrad) and _writes_first(func) and _POINTWISE in func.tags:
            self = args[0]
            sub = [self._k_values] + [_entries_for(self, a) for a in args[1:]]
            kw = {k: _entries_for(self, v) for k, v in kwargs.items()}
            if all(s is not None for s in sub) and all(v is not None or kwargs[k] is None for k, v in kw.items()):
                func(*sub, **kw)
                return self
        return _on_dense(func, args, kwargs)


_POINTWISE = torch.Tag.pointwise


def _writes_first(func) -> bool:
    a = func._schema.arguments
    return bool(a) and a[0].alias_info is not None and a[0].alias_info.is_write


def _entries_for(self: MaskedGrad, a):
    """An argument of a pointwise op on ``self``, restricted to self's entries (None: cannot)."""
    if not isinstance(a, Tensor):
        return a
    if isinstance(a, MaskedGrad):
        return a._k_values if self._same_entries(a) else None
    if a.dim() == 0 or a.numel() == 1:
        return a.reshape(())
    try:
        return self._gather(a)
    except RuntimeError:  # not broadcastable: let the dense op raise torch's own error
        return None


def _on_dense(func, args, kwargs):
    """Run ``func`` with every MaskedGrad replaced by its dense form; write mutated ones back."""
    dense: dict[int, tuple[MaskedGrad, Tensor]] = {}

    def unwrap(x):
        if isinstance(x, MaskedGrad):
            if id(x) not in dense:
                dense[id(x)] = (x, x.to_dense())
            return dense[id(x)][1]
        if isinstance(x, (list, tuple)):
            return type(x)(unwrap(y) for y in x)
        return x

    uargs = [unwrap(a) for a in args]
    ukwargs = {k: unwrap(v) for k, v in kwargs.items()}
    out = func(*uargs, **ukwargs)
    written = []
    for pos, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        val = args[pos] if pos < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        for v in val if isinstance(val, (list, tuple)) else [val]:
            if isinstance(v, MaskedGrad):
                d = dense[id(v)][1]
                v._write_back(d)
                written.append((d, v))

    def rewrap(o):  # an in-place op returns its (dense stand-in for the) argument: give back the MaskedGrad
        for d, v in written:
            if o is d:
                return v
        if isinstance(o, (list, tuple)):
            return type(o)(rewrap(y) for y in o)
        return o

    return rewrap(out)


def _vector_norm(func, args, kwargs):
    self = args[0]
    ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    keepdim = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
    dtype = kwargs.get("dtype")
    # the zeros at unselected entries change nothing for ord >= 0 (inf included) over all dims
    if not isinstance(self, MaskedGrad) or dim not in (None, [], ()) or keepdim or float(ord_) < 0:
        return NotImplemented
    return torch.linalg.vector_norm(self._k_values, ord_, dtype=dtype).to(dtype or self.dtype)


def _foreach_norm(func, args, kwargs):
    tensors = args[0]
    ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    dtype = args[2] if len(args) > 2 else kwargs.get("dtype")
    if float(ord_) < 0:
        return NotImplemented
    sub = [t._k_values if isinstance(t, MaskedGrad) else t for t in tensors]
    norms = func(sub, ord_, dtype=dtype) if dtype is not None else func(sub, ord_)
    return [n.to(dtype or t.dtype) if isinstance(t, MaskedGrad) else n for n, t in zip(norms, tensors)]


def _unscale(func, args, kwargs):
    grads, rest = args[0], args[1:]
    func([g._k_values if isinstance(g, MaskedGrad) else g for g in grads], *rest, **kwargs)


def _add(func, args, kwargs):
    """``a + b`` of two gradients over the same entries (autograd summing the gradients of a weight
    used twice, e.g. a tied embedding and LM head under sparse backward): O(k), still a MaskedGrad."""
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
    if not (isinstance(a, MaskedGrad) and isinstance(b, MaskedGrad) and a.dtype == b.dtype and a._same_entries(b)):
        return NotImplemented
    alpha = args[2] if len(args) > 2 else kwargs.get("alpha", 1)
    return a._alike(torch.add(a._k_values, b._k_values, alpha=alpha))


def _detach(func, args, kwargs):
    self = args[0]
    return self._alike(self._k_values) if isinstance(self, MaskedGrad) else NotImplemented


def _detach_(func, args, kwargs):
    return args[0] if isinstance(args[0], MaskedGrad) else NotImplemented


def _zero_(func, args, kwargs):
    if not isinstance(args[0], MaskedGrad):
        return NotImplemented
    args[0]._k_values.zero_()
    return args[0]


def _fill_(func, args, kwargs):
    self, value = args[0], args[1]
    if not isinstance(self, MaskedGrad) or (isinstance(value, Tensor) and value.numel() != 1):
        return NotImplemented
    self._k_values.fill_(value.reshape(()) if isinstance(value, Tensor) else value)
    return self


def _copy_(func, args, kwargs):
    self, src = args[0], args[1]
    if not isinstance(self, MaskedGrad) or (isinstance(src, Tensor) and src.dim() and src.shape != self.shape):
        return NotImplemented
    self._k_values.copy_(self._gather(src) if src.dim() else src)
    return self


def _foreach_inplace(func, args, kwargs):
    """``_foreach_op_(tensors, other...)``: the MaskedGrads of the first list are replaced by their
    entries, and aligned tensors of other lists by the matching entries."""
    first = args[0]
    subst = [t._k_values if isinstance(t, MaskedGrad) else t for t in first]
    rest = []
    for a in args[1:]:
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
            row = []
            for t, o in zip(first, a):
                if isinstance(t, MaskedGrad):
                    row.append(_entries_for(t, o))
                else:
                    row.append(o.to_dense() if isinstance(o, MaskedGrad) else o)
            if any(r is None for r in row):
                return _on_dense(func, args, kwargs)
            rest.append(row)
        else:
            rest.append(a.to_dense() if isinstance(a, MaskedGrad) else a)
    func(subst, *rest, **kwargs)
    return None


_FAST = {
    aten.linalg_vector_norm: _vector_norm,
    aten._foreach_norm: _foreach_norm,
    aten._amp_foreach_non_finite_check_and_unscale_: _unscale,
    aten.add: _add,
    aten.detach: _detach,
    aten.detach_: _detach_,
    aten.zero_: _zero_,
    aten.fill_: _fill_,
    aten.copy_: _copy_,
}
