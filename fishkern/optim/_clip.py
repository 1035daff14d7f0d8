"""``clip_grad_norm_`` of the masked optimizers: the norm of the trained entries' gradients."""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import param_table as pt


class ClipMixin:
    """Part of ``MaskedOptimizer``: gradient clipping."""

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Clip the gradients of the trained entries to a total norm of ``max_norm``, like
        ``torch.nn.utils.clip_grad_norm_`` on a model whose only parameters are those entries.

        Works everywhere ``torch.nn.utils.clip_grad_norm_`` does with these optimizers (with
        ``free_dense_grads`` ``.grad`` holds a MaskedGrad that torch's clip measures and scales),
        and also on FSDP2-sharded parameters, whose ``.grad`` is None after backward with
        ``free_dense_grads``: the norm is reduced over the shards. Unlike torch's clip on dense
        gradients, unselected gradient entries are ignored. Returns the total norm before clipping;
        call it between ``backward()`` and ``step()``.
        """
        pieces = []  # flat gradient entries, as views that can be scaled in place
        sharded = []  # whether the piece is one rank's shard of a parameter (its norm spans ranks)
        for gi, (lay, rt) in enumerate(zip(self._layouts, self._runtime)):
            if not lay.trainable:
                continue
            if self._all_gathered(gi):  # the steady state: one piece per group, nothing per tensor
                pieces.append(rt.grad[: lay.total])
                sharded.append(False)
                continue
            self._sync_proxies(gi)
            group_pieces, group_sharded = [], []
            for i in lay.trainable:
                if rt.grad_ready[i]:
                    group_pieces.append(rt.grad[lay.slice(i)])
                elif (g := self._grad_of(lay, i)) is not None:
                    # gather once, and stash in the flat buffer so step() uses the clipped values
                    out = self._grad_buffer(gi)[lay.slice(i)]
                    self._gather_grad(lay, i, g, out, accumulate=False)
                    rt.grad_ready[i] = True
                    if self.free_dense_grads:
                        self._free_dense(gi, i)
                    group_pieces.append(out)
                else:
                    continue
                group_sharded.append(lay.shards[i] is not None and lay.shards[i].group is not None)
            if len(group_pieces) == len(lay.trainable) and not any(group_sharded):
                # every trained tensor's entries: the group's buffer is their concatenation
                group_pieces, group_sharded = [rt.grad[: lay.total]], [False]
            pieces += group_pieces
            sharded += group_sharded
        shard_group = self._shard_group()
        if shard_group is not None:
            total = self._sharded_total_norm(pieces, sharded, float(norm_type), shard_group)
        elif not pieces:
            return torch.tensor(0.0)
        else:
            norms = [torch.linalg.vector_norm(g, norm_type) for g in pieces]
            total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), norm_type)
        if not pieces:
            return total
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the masked gradients is non-finite")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in pieces:
            g.mul_(coef.to(g.device, g.dtype))
        return total

    def _all_gathered(self, gi: int) -> bool:
        """Every trained tensor of group gi has its gradient gathered and .grad is still its proxy
        (one native check; free_dense_grads, unsharded groups)."""
        rt = self._runtime[gi]
        if not (self.free_dense_grads and self._hooks) or rt.sharded or rt.grad is None:
            return False
        return not rt.table.check(pt.PROXIES) & pt.NEEDS_SLOW_PATH

    def _shard_group(self):
        """The process group over which this optimizer's sharded parameters are split, or None."""
        if not any(rt.sharded for rt in self._runtime):
            return None
        groups = {id(sh.group): sh.group for lay in self._layouts for sh in lay.shards if sh is not None and sh.group is not None}
        if len(groups) > 1:
            raise RuntimeError("clip_grad_norm_: the sharded parameters are split over different process groups")
        return next(iter(groups.values()), None)

    @staticmethod
    def _sharded_total_norm(pieces: list[Tensor], sharded: list[bool], p: float, group) -> Tensor:
        """Norm over all ranks' shards: the shards' sum of |g|^p (max for p=inf) is all-reduced over
        the shard group; replicated parameters count once. Every rank must call it (it is a collective),
        also one whose shard holds no entries."""
        import torch.distributed as dist

        inf = p == float("inf")
        device = pieces[0].device if pieces else torch.device("cpu")
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())

        def agg(ps: list[Tensor]) -> Tensor:
            if not ps:
                return torch.zeros((), dtype=torch.float64, device=device)
            n = torch.stack([torch.linalg.vector_norm(g, p).to(device, torch.float64) for g in ps])
            return n.max() if inf else n.pow(p).sum()

        local = agg([g for g, sh in zip(pieces, sharded) if sh]).reshape(1)
        dist.all_reduce(local, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
        rep = agg([g for g, sh in zip(pieces, sharded) if not sh])
        total = torch.maximum(local[0], rep) if inf else (local[0] + rep).pow(1.0 / p)
        dtype = pieces[0].dtype if pieces else torch.float32
        return total.to(dtype)

