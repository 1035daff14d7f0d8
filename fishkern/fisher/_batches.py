"""Batches as users have them: Hugging Face-style dicts with labels, or (inputs, targets) pairs.

The estimator needs four things from a batch: how many samples it holds, how to run the model on
it, its labels, and how to cut it to its first n samples (to stop at exactly N mid-batch).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LABEL_KEYS = ("labels", "label")


@dataclass
class Batch:
    inputs: Any  # what the model is called with: a Mapping (→ **kwargs), a tuple (→ *args) or one value
    labels: Tensor | None
    size: int
    raw: Any  # the batch as given (handed to a custom loss)
    first: int = 0  # the index of its first sample in the whole estimate
    picked: tuple[int, ...] | None = None  # or, after select(), the index of each sample

    def sample_index(self, i: int) -> int:
        """The index in the whole estimate of sample i: what seeds its own random draws, so that
        they do not depend on how the samples are batched."""
        return self.picked[i] if self.picked is not None else self.first + i

    def call(self, model):
        if isinstance(self.inputs, Mapping):
            return model(**self.inputs)
        if isinstance(self.inputs, tuple):
            return model(*self.inputs)
        return model(self.inputs)

    @property
    def attention_mask(self) -> Tensor | None:
        if isinstance(self.inputs, Mapping):
            m = self.inputs.get("attention_mask")
            if isinstance(m, Tensor) and m.dim() == 2:
                return m
        return None


def _first_tensor_size(obj) -> int | None:
    if isinstance(obj, Tensor):
        return obj.shape[0] if obj.dim() > 0 else None
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for v in obj:
            s = _first_tensor_size(v)
            if s is not None:
                return s
    return None


def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to(v, device) for v in obj)
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


def parse_batch(batch, device, *, need_labels: bool) -> Batch:
    """Split a batch into model inputs and labels, on the model's device.

    A Mapping is a Hugging Face-style batch: its "labels" (or "label") entry is taken out and the
    rest is passed as keyword arguments. A 2-sequence is (inputs, targets); inputs that are a Mapping
    are passed as keyword arguments, a tuple as positional ones, anything else as the one argument.
    """
    if isinstance(batch, Mapping):
        batch = _to(batch, device)
        key = next((k for k in LABEL_KEYS if k in batch), None)
        labels = batch[key] if key is not None else None
        inputs = {k: v for k, v in batch.items() if k != key}
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = _to(batch[0], device), _to(batch[1], device)
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        batch = (inputs, labels)
    else:
        raise TypeError(
            "a Fisher batch must be a dict with a 'labels' entry (Hugging Face style) or an "
            f"(inputs, targets) pair; got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    if labels is not None and not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels, device=device)
    if need_labels and labels is None:
        raise ValueError(
            "the batch has no labels ('labels' or 'label' key, or the second item of a pair); the "
            "empirical Fisher needs the true labels (or pass kind='true', or a custom loss_fn)"
        )
    size = labels.shape[0] if labels is not None and labels.dim() > 0 else _first_tensor_size(inputs)
    if size is None:
        raise ValueError("cannot tell the batch size: no tensor with a leading batch dimension in the batch")
    return Batch(inputs, labels, int(size), batch)


def truncate(b: Batch, n: int) -> Batch:
    """The first n samples of a batch."""
    return take(b, 0, n)


def right_padded_lengths(mask: Tensor) -> Tensor | None:
    """Per-sample lengths when an attention mask is a prefix of ones then zeros (right padding).

    Row sums of a (B, T) mask, so every value lies in [0, T] by construction: the sequence-Linear
    rule passes them to fishkern::linear_fisher_acc_ without its per-call range check (a device
    sync on CUDA); the one sync per batch is the prefix check here."""
    m = mask.bool()
    lengths = m.sum(1)
    positions = torch.arange(m.shape[1], device=m.device)
    if torch.equal(m, positions[None, :] < lengths[:, None]):
        return lengths
    return None


def model_output_logits(out) -> Tensor:
    """The logits of a model's output: a tensor, an object or dict with `logits`, or a tuple's first item."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"cannot find logits in the model's output ({type(out).__name__}); return a tensor, an "
            "object with .logits, or pass loss_fn"
        )
    return logits


def _map_samples(b: Batch, cut_tensor, n: int, first: int, picked) -> Batch:
    """Apply `cut_tensor` to every tensor whose leading dimension is the batch size."""

    def cut(obj):
        if isinstance(obj, Tensor):
            return cut_tensor(obj) if obj.dim() > 0 and obj.shape[0] == b.size else obj
        if isinstance(obj, Mapping):
            return {k: cut(v) for k, v in obj.items()}
        if isinstance(obj, tuple):
            return tuple(cut(v) for v in obj)
        if isinstance(obj, list):
            return [cut(v) for v in obj]
        return obj

    labels = cut_tensor(b.labels) if b.labels is not None else None
    return Batch(cut(b.inputs), labels, n, cut(b.raw), first, picked)


def take(b: Batch, start: int, stop: int) -> Batch:
    """Samples start..stop-1 of a batch (for the batch-size-1 loop)."""
    picked = b.picked[start:stop] if b.picked is not None else None
    return _map_samples(b, lambda t: t[start:stop], stop - start, b.first + start, picked)


def select(b: Batch, idx: Tensor) -> Batch:
    """The samples at `idx` (a 1-D index tensor) of a batch."""
    picked = tuple(b.sample_index(i) for i in idx.tolist())
    return _map_samples(b, lambda t: t.index_select(0, idx.to(t.device)), idx.numel(), 0, picked)
