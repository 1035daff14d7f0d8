"""What is differentiated per sample.

The Fisher score of a parameter is Σₙ (∂ℓₙ/∂θ)², with ℓₙ a function of sample n alone. The estimator
back-propagates Σₙ ℓₙ once per "term" and squares each sample's gradient, so every term must be a
vector of per-sample values (shape (B,)) — never a batch mean (which would scale scores by 1/B²).

- empirical (the paper's default): ℓₙ = −log p(yₙ|xₙ) for the true label; for a regression head
  (one output, float labels) the model's own loss at batch size 1, (f(xₙ) − yₙ)², as the original code.
- true: Σ_c p(c|xₙ) (∂ log p(c|xₙ)/∂θ)², exactly, as C terms √p(c|xₙ)·log p(c|xₙ) (√p held constant).
  For a regression head, the Gaussian model with unit variance: E_y[(y − f)²] (∂f/∂θ)² = (∂f/∂θ)².
- a custom loss_fn(outputs, batch) → per-sample losses of shape (B,).

Causal language models (``CausalLM``): one loss per sequence, ℓₙ = Σ_t −log p(y_{t+1} | y_≤t) over
its target tokens — the labels shifted by one as Hugging Face shifts them, ``-100`` and positions
whose attention mask is 0 excluded (mask prompt tokens with -100). Labels default to the input ids.
- empirical: the true next tokens.
- true: the expectation over the model's own distribution cannot be taken exactly over a
  vocabulary, so it is sampled: ``samples`` draws of every target token from p(·|y_≤t) (teacher
  forcing: the inputs stay the true tokens), F̂ = (1/S) Σ_s (∇ℓₙ⁽ˢ⁾)², an unbiased estimate.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

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


IGNORE_INDEX = -100  # Hugging Face's label for "no loss here"


class CausalLM:
    """The per-sequence objective of a causal LM (see the module docstring); ``samples``: draws per
    target token for kind='true', seeded by ``seed`` and each sample's index."""

    def __init__(self, samples: int = 1, seed: int = 0):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"lm_samples must be a positive integer, got {samples!r}")
        self.samples, self.seed = samples, int(seed)

    def terms(self, out, batch: Batch, kind: str) -> list[Tensor]:
        logits = model_output_logits(out)
        B = batch.size
        labels = batch.labels
        if labels is None:
            ids = batch.inputs.get("input_ids") if isinstance(batch.inputs, Mapping) else None
            if not isinstance(ids, Tensor):
                raise ValueError("a causal-LM batch needs 'labels' or 'input_ids' (the targets are the next tokens)")
            labels = ids
        if logits.dim() != 3 or logits.shape[0] != B or tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"a causal LM needs logits (batch, tokens, vocab) and labels (batch, tokens); got logits "
                f"{tuple(logits.shape)} and labels {tuple(labels.shape)} for {B} samples"
            )
        if labels.is_floating_point():
            raise ValueError(f"causal-LM labels must be token ids (integers), got {labels.dtype}")
        V = logits.shape[-1]
        targets = labels[:, 1:].long()
        valid = targets != IGNORE_INDEX
        mask = batch.attention_mask
        if mask is not None and tuple(mask.shape) == tuple(labels.shape):
            valid &= mask[:, 1:].bool()
        if kind == "empirical":
            bad = valid & ((targets < 0) | (targets >= V))
            if bool(bad.any()):
                v = targets[bad]
                raise ValueError(
                    f"causal-LM labels must be token ids in [0, {V}) or {IGNORE_INDEX}; got values in "
                    f"[{int(v.min())}, {int(v.max())}]"
                )
        logp = F.log_softmax(logits[:, :-1].float() if logits.dtype != torch.float64 else logits[:, :-1], dim=-1)
        if kind == "empirical":
            drawn = [targets.clamp(0, V - 1)]
        else:
            drawn = self._draws(batch, logp)
        scale = 1.0 / math.sqrt(len(drawn))
        terms = []
        for y in drawn:
            nll = -logp.gather(-1, y[..., None]).squeeze(-1)
            loss = nll.masked_fill(~valid, 0).sum(1)
            terms.append(loss * scale if len(drawn) > 1 else loss)
        return terms

    def _draws(self, batch: Batch, logp: Tensor) -> list[Tensor]:
        """S draws (B, T-1) of every target token from p(·|y_≤t). Each sample's draws come from its
        own generator, seeded by the estimate's seed and the sample's index: the same whatever the
        batching, so the batched estimate equals the per-sample loop's, and the self-check holds."""
        B, T1, V = logp.shape
        probs = logp.detach().exp()
        out = torch.empty(B, self.samples, T1, dtype=torch.long, device=logp.device)
        gen = torch.Generator(device=logp.device)
        for i in range(B):
            gen.manual_seed((self.seed * 1_000_003 + batch.sample_index(i)) % (1 << 63))
            out[i] = torch.multinomial(probs[i], self.samples, replacement=True, generator=gen).t()
        return list(out.unbind(1))


def _is_regression(logits: Tensor, labels: Tensor | None) -> bool:
    # one output is a regression head (as Hugging Face treats num_labels=1), whatever the label dtype
    return logits.dim() == 1 or logits.shape[-1] == 1


def fisher_terms(out, batch: Batch, kind: str, loss_fn: Callable | None, lm: CausalLM | None = None) -> list[Tensor]:
    """Per-sample vectors (B,) whose per-sample gradients are squared and summed. ``lm``: the model
    is a causal LM (its logits are per token)."""
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
    if lm is not None:
        return lm.terms(out, batch, kind)
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
            "for a causal LM pass causal_lm=True, for other heads loss_fn (one loss per sample)"
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
