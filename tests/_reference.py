"""References for the tests: for the masked optimizers, torch.optim run on a model whose only
parameters are the selected entries; for the Fisher estimator, the comparison of score dicts."""
from __future__ import annotations

import torch


def random_masks(params, density=0.3, seed=0, shuffle=False):
    """Per-parameter flat indices (sorted unless ``shuffle``); at least one entry each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        n = p.numel()
        k = max(1, int(n * density))
        idx = torch.randperm(n, generator=g)[:k]
        out.append(idx if shuffle else idx.sort().values)
    return [m.to(p.device) for m, p in zip(out, params)]


def selected(p, idx):
    """The selected entries of p, in sorted-index order, row-major."""
    return p.detach().reshape(-1)[idx.sort().values.long()]


def unselected_mask(p, idx):
    keep = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
    keep[idx.long()] = False
    return keep


class SelectedModel:
    """Leaf parameters holding copies of the selected entries, fed the selected gradient entries."""

    def __init__(self, params, masks, dtype=None):
        self.masks = [m.sort().values.long() for m in masks]
        self.params = [
            torch.nn.Parameter(selected(p, m).to(dtype or p.dtype).clone()) for p, m in zip(params, self.masks)
        ]

    def set_grads(self, dense_grads):
        for q, m, g in zip(self.params, self.masks, dense_grads):
            q.grad = None if g is None else g.reshape(-1)[m].to(q.dtype).clone()


def random_grads(params, seed, none_every=None, step=0, dtype=None):
    """Fresh random dense gradients; with ``none_every``, some parameters get None on some steps."""
    g = torch.Generator().manual_seed(seed)
    grads = []
    for j, p in enumerate(params):
        gr = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype or p.dtype).to(p.device)
        if none_every and (j + step) % none_every == 0:
            gr = None
        grads.append(gr)
    return grads


def assert_scores_close(got, ref, rtol, *, zero_tensors_allowed=True):
    """Every score tensor within rtol of the reference, relative to its largest entry (a near-zero
    entry is judged against its tensor's scale, a tensor with no score against 1e-8 of the largest
    score of all). ``zero_tensors_allowed=False``: a reference tensor that is all zero is an error
    (it would test nothing)."""
    assert list(got) == list(ref)
    top = max(v.abs().max().item() for v in ref.values())
    assert top > 0
    for name in ref:
        a, b = got[name], ref[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert zero_tensors_allowed or b.abs().max() > 0, f"{name}: a zero reference tests nothing"
        scale = max(b.abs().max().item(), 1e-8 * top)
        err = (a - b).abs().max().item() / scale
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"
