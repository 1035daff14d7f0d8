"""Shared helpers: deterministic mini-batches over pre-tokenized tensors."""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

__all__ = ["TensorBatches"]


class TensorBatches:
    """Mini-batches of HF-style dicts (``{"input_ids": ..., "attention_mask": ..., "labels": ...}``)
    sliced from tensors that share their first dimension.

    ``shuffle=True`` draws a new order for every pass, fixed by ``(seed, epoch)``: the same seed
    gives the same sequence of batches on every machine. The epoch starts at 0 and advances by one
    each time the object is iterated; ``set_epoch(e)`` sets it explicitly (as with a
    ``DistributedSampler``). Without shuffling the order is the stored one.

    ``trim_padding=True`` cuts each batch's 2-D tensors (those whose second dimension is the
    sequence length of ``attention_mask``) to the longest sequence in the batch. It assumes
    right padding (BERT tokenizers pad right) and changes nothing a model computes on the kept
    tokens, only how many padded positions it runs over.
    """

    def __init__(
        self,
        encodings: Mapping[str, torch.Tensor],
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        *,
        drop_last: bool = False,
        trim_padding: bool = False,
    ) -> None:
        if not isinstance(encodings, Mapping) or not encodings:
            raise ValueError("encodings must be a non-empty dict of tensors")
        n = None
        for key, value in encodings.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"encodings[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() == 0:
                raise ValueError(f"encodings[{key!r}] is a scalar; every tensor needs a first (example) dimension")
            if n is None:
                n = value.shape[0]
            elif value.shape[0] != n:
                sizes = {k: v.shape[0] for k, v in encodings.items()}
                raise ValueError(f"all tensors must have the same number of examples, got {sizes}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if trim_padding and "attention_mask" not in encodings:
            raise ValueError("trim_padding=True needs an 'attention_mask' tensor")
        self.encodings = dict(encodings)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.trim_padding = bool(trim_padding)
        self.epoch = 0
        self._n = int(n)

    @property
    def num_examples(self) -> int:
        return self._n

    def __len__(self) -> int:
        if self.drop_last:
            return self._n // self.batch_size
        return (self._n + self.batch_size - 1) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The example order of a pass (``epoch`` defaults to the current one)."""
        if not self.shuffle:
            return torch.arange(self._n)
        e = self.epoch if epoch is None else int(epoch)
        # SeedSequence mixes (seed, epoch) into independent streams; PCG64 is reproducible
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, e])))
        return torch.from_numpy(rng.permutation(self._n).astype(np.int64))

    def iter_epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one pass, without touching ``self.epoch``."""
        order = self.order(epoch)
        stop = len(self) * self.batch_size if self.drop_last else self._n
        seq_len = self.encodings["attention_mask"].shape[1] if self.trim_padding else None
        for start in range(0, stop, self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.shuffle:
                batch = {k: v.index_select(0, idx) for k, v in self.encodings.items()}
            else:
                batch = {k: v[start : start + self.batch_size] for k, v in self.encodings.items()}
            if seq_len is not None:
                keep = int(batch["attention_mask"].any(dim=0).nonzero().max().item()) + 1 if batch["attention_mask"].any() else 1
                if keep < seq_len:
                    batch = {k: (v[:, :keep] if v.dim() >= 2 and v.shape[1] == seq_len else v) for k, v in batch.items()}
            yield batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self.iter_epoch(epoch)

    def __repr__(self) -> str:
        return (
            f"TensorBatches(num_examples={self._n}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"seed={self.seed}, keys={list(self.encodings)})"
        )
