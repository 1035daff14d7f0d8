"""What is differentiated per sample.

The Fisher score of a parameter is Σₙ (∂ℓₙ/∂θ)², with ℓₙ a function of sample n alone. The estimator
back-propagates Σₙ ℓₙ once per "term" and squares each sample's gradient, so every term must be a
vector of per-sample values (shape (B,)) — never a batch mean (which would scale scores by 1/B²).

- empirical (the paper's default): ℓₙ = −log p(yₙ|xₙ) for the true label; for a regression head
  (one output, float labels) the model's own loss at batch size 1, (f(xₙ) − yₙ)², as the original code.
- true: Σ_c p(c|xₙ) (∂ log p(c|xₙ)/∂θ)², exactly, as C terms √p(c|xₙ)·log p(c|xₙ) (√p held constant).
  For a regression head, the Gaussian model with unit variance: E_y[(y − f)²] (∂f/∂θ)² = (∂f/∂θ)².
- a custom loss_fn(outputs, batch) → per-sample losses of shape (B,).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._batches import Batch, model_output_logits

KINDS = ("empirical", "true")


def check_kind(kind: str, loss_fn) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "true" and loss_fn is not None:
        raise ValueError("kind='true' takes the expectation over the model's own classes; it cannot use a custom loss_fn")


def _is_regression(logits: Tensor, labels: Tensor | None) -> bool:
    # one output is a regression head (as Hugging Face treats num_labels=1), whatever the label dtype
    return logits.dim() == 1 or logits.shape[-1] == 1


def fisher_terms(out, batch: Batch, kind: str, loss_fn: Callable | None) -> list[Tensor]:
    """Per-sample vectors (B,) whose per-sample gradients are squared and summed."""
    B = batch.size
    if loss_fn is not None:
        losses = loss_fn(out, batch.raw)
        if not isinstance(losses, Tensor) or losses.shape != (B,):
            got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_fn must return one loss per sample, a tensor of shape ({B},); got {got}. "
                "Use reduction='none': a batch mean would scale every score by 1/B²"
            )
        return [losses]
    logits = model_output_logits(out)
    if logits.shape[0] != B:
        raise ValueError(f"the model returned logits for {logits.shape[0]} samples, the batch holds {B}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    labels = batch.labels
    if _is_regression(logits, labels):
        pred = logits.reshape(B)
        if kind == "true":
            return [pred]
        return [(pred - labels.reshape(B).to(pred.dtype)) ** 2]
    if logits.dim() != 2:
        raise ValueError(
            f"expected classification logits of shape (batch, classes), got {tuple(logits.shape)}; "
            "pass loss_fn for other heads (one loss per sample)"
        )
    logp = F.log_softmax(logits, dim=-1)
    if kind == "true":
        p = logp.detach().exp()
        return [p[:, c].sqrt() * logp[:, c] for c in range(logits.shape[1])]
    if labels.is_floating_point() or labels.dim() != 1:
        raise ValueError(
            f"classification needs integer class labels of shape ({B},), got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    C = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= C):
        raise ValueError(f"labels must be in [0, {C}), got values in [{int(labels.min())}, {int(labels.max())}]")
    return [-logp.gather(1, labels[:, None].long()).squeeze(1)]
