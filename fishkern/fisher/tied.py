"""Tied input embedding and output head, done exactly in the batched pass.

GPT-2, Gemma, Qwen2-0.5B, Llama-3.2-1B use one (V, d) weight twice: as the token embedding and as the
``lm_head`` Linear. Sample n's gradient of the weight is the sum of both uses, Aₙ + Bₙ, so

    Σₙ (Aₙ + Bₙ)² = Σₙ Aₙ² + Σₙ Bₙ² + 2 Σₙ Aₙ ⊙ Bₙ.

The embedding and Linear rules add the first two terms into the one accumulator as for untied
weights. Aₙ is zero outside the rows of sample n's ids, so the cross term needs Bₙ only at those
rows: Bₙ[r] = Σ_t g[n, t, r] · x[n, t] (one small product per sample), never the whole per-sample
(V, d) gradient. Whichever use's gradient arrives second in the backward adds the cross term.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .rule_base import Context
from .rules import EmbeddingRule, LinearRule, sample_id_keys


class TiedPair:
    """One weight shared by an Embedding (its ids seen in the forward) and a Linear head."""

    def __init__(self, name: str, embedding: nn.Embedding, head: nn.Linear):
        self.name, self.embedding, self.head = name, embedding, head
        self.ids: Tensor | None = None
        self.forget()

    def forget(self) -> None:
        """Drop one backward's halves (each term of the Fisher pass is its own backward)."""
        self.a: tuple[Tensor, Tensor] | None = None  # (rows, Aₙ at the batch's (sample, id) pairs)
        self.b: Tensor | None = None  # Bₙ at the same pairs

    def release(self) -> None:
        self.ids = None
        self.forget()

    def head_rows(self, x: Tensor, g: Tensor, dt: torch.dtype) -> Tensor:
        """Bₙ[r] for every distinct (sample n, id r) of the batch, in the embedding's key order."""
        if self.ids is None:
            raise RuntimeError(f"fishkern Fisher: the tied weight '{self.name}' reached its head before its embedding")
        uniq, _, _ = sample_id_keys(self.embedding, self.ids)
        B, V, d = x.shape[0], self.embedding.num_embeddings, x.shape[-1]
        x3, g3 = x.reshape(B, -1, d).to(dt), g.reshape(B, -1, V).to(dt)
        sample, row = uniq // V, uniq % V
        out = torch.empty(uniq.numel(), d, dtype=dt, device=x.device)
        # keys are sorted by sample: one (U_n × T) · (T × d) product per sample
        ends = torch.bincount(sample, minlength=B).cumsum(0).tolist()
        start = 0
        for n, end in enumerate(ends):
            if end > start:
                out[start:end] = g3[n][:, row[start:end]].t() @ x3[n]
            start = end
        return out

    def add_cross(self, acc: Tensor) -> None:
        if self.a is not None and self.b is not None:
            rows, a = self.a
            acc.index_add_(0, rows, a.mul_(self.b).mul_(2))
            self.forget()


class TiedEmbeddingRule(EmbeddingRule):
    def __init__(self, inner: EmbeddingRule, pair: TiedPair):
        super().__init__(inner.scale)
        self.pair = pair

    def accumulate(self, m, args, kwargs, g, lengths, acc, ctx: Context):
        rows, sums = self.row_sums(m, args[0] if args else kwargs["input"], g, ctx.acc_dtype)
        acc["weight"].index_add_(0, rows, sums.square())
        self.pair.a = (rows, sums)
        self.pair.add_cross(acc["weight"])


class TiedHeadRule(LinearRule):
    def __init__(self, pair: TiedPair):
        self.pair = pair

    def accumulate(self, m, args, kwargs, g, lengths, acc, ctx: Context):
        super().accumulate(m, args, kwargs, g, lengths, acc, ctx)
        x = args[0] if args else kwargs["input"]
        self.pair.b = self.pair.head_rows(x, g, ctx.acc_dtype)
        self.pair.add_cross(acc["weight"])
