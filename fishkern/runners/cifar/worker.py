"""One rank of `fishkern cifar`: its shard, the training steps, the exchanges, masks, checkpoints and
the record of each run."""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .build import build_model, make_mask, make_optimizer
from .config import CifarConfig, RunSpec, lr_at, steps_per_epoch

if TYPE_CHECKING:
    import torch


class _Run:
    """The state of one run on one rank: model, generators, counters, checkpointer, current mask."""

    def __init__(self, worker: Worker, spec: RunSpec):
        import torch

        self.spec, self.t_start = spec, time.perf_counter()
        self.model = build_model(worker.cfg, worker.shape, spec.seed).to(worker.device)
        self.numel = sum(p.numel() for p in self.model.parameters())
        self.gen = torch.Generator().manual_seed(10_007 * spec.seed + worker.rank)  # this rank's augmentation
        self.gen_std = torch.Generator().manual_seed(10_007 * spec.seed + 5_003)  # standard training: same on all ranks
        self.run_dir = worker.artifacts / spec.name if worker.artifacts is not None else None
        self.mask = None
        self.stats: dict[str, Any] = {"rank": worker.rank, "buffer_bytes": 0, "exchanges": 0, "sync_checks": 0,
                                      "comm_seconds": 0.0, "fisher_seconds": 0.0, "mask_recomputes": 0, "local_steps": 0}
        self.result: dict[str, Any] = {**asdict(spec), "numel": self.numel}
        self.ckpt = None
        if spec.checkpoint_every_epochs and worker.rank == 0:
            from ...diff import SparseCheckpointer

            self.ckpt = SparseCheckpointer(self.run_dir / "checkpoints", base=self.model, overwrite=worker.cfg.overwrite)


class Worker:
    """One rank: its shard, its device, and the training of each RunSpec."""

    def __init__(self, cfg: CifarConfig, data: dict[str, Any], rank: int, world: int, device: torch.device,
                 artifacts: Path | None):
        import torch.distributed as dist

        self.cfg, self.rank, self.world, self.device, self.artifacts = cfg, rank, world, device, artifacts
        self.dist = dist
        mean, std = data["mean"].view(1, -1, 1, 1), data["std"].view(1, -1, 1, 1)

        def prep(x):
            return ((x.float() / data["scale"] - mean) / std).to(device)

        self.x_train, self.y_train = prep(data["x_train"]), data["y_train"].to(device)
        self.x_test, self.y_test = prep(data["x_test"]), data["y_test"].to(device)
        self.shape = (data["x_train"].shape[1], data["num_classes"])
        self.aug = cfg.augment()

    # ---- small pieces
    def _order(self, idx: torch.Tensor, seed: int, stream: int, epoch: int) -> list[torch.Tensor]:
        import numpy as np
        import torch

        rng = np.random.default_rng([seed, stream, epoch])
        order = idx[torch.from_numpy(rng.permutation(idx.numel()))]
        n = steps_per_epoch(idx.numel(), self.cfg.batch_size)
        return [order[i * self.cfg.batch_size: (i + 1) * self.cfg.batch_size] for i in range(n)]

    def _shard(self, seed: int) -> torch.Tensor:
        import numpy as np
        import torch

        perm = torch.from_numpy(np.random.default_rng([seed, 9973]).permutation(self.y_train.numel()))
        return perm[self.rank:: self.world]

    def _step(self, model, opt, idx, gen, lr: float) -> torch.Tensor:
        import torch.nn.functional as F

        idx = idx.to(self.device)
        x = self.aug(self.x_train.index_select(0, idx), gen)
        loss = F.cross_entropy(model(x), self.y_train.index_select(0, idx))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    def _train_epochs(self, model, opt, idx, first: int, last: int, seed: int, stream: int, gen, after_epoch=None):
        """Single-process training (standard runs and the dense warm-up) on the examples ``idx``."""
        c = self.cfg
        spe = steps_per_epoch(idx.numel(), c.batch_size)
        for e in range(first, last):
            for i, b in enumerate(self._order(idx, seed, stream, e)):
                self._step(model, opt, b, gen, lr_at(e + i / spe, c.lr, c.lr_warmup_epochs, c.epochs))
            if after_epoch is not None:
                after_epoch(e + 1, opt)

    def evaluate(self, model) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        model.eval()
        correct, loss = 0, 0.0
        with torch.no_grad():
            for s in range(0, self.y_test.numel(), 1000):
                out = model(self.x_test[s: s + 1000])
                y = self.y_test[s: s + 1000]
                correct += int((out.argmax(1) == y).sum())
                loss += float(F.cross_entropy(out, y, reduction="sum"))
        model.train()
        n = self.y_test.numel()
        return {"accuracy": correct / n, "loss": loss / n, "test_examples": n}

    def _average_buffers(self, model) -> int:
        """Average the BatchNorm running statistics over the ranks (before evaluation, Fisher
        estimates and checkpoints; they are not part of the exchanges). Returns bytes sent."""
        import torch

        bufs = [b for b in model.buffers() if b.is_floating_point()]
        if self.world == 1 or not bufs:
            return 0
        flat = torch.cat([b.reshape(-1) for b in bufs])
        self.dist.all_reduce(flat)
        flat /= self.world
        at = 0
        for b in bufs:
            b.copy_(flat[at: at + b.numel()].view_as(b))
            at += b.numel()
        return flat.numel() * flat.element_size()

    def _make_mask(self, spec: RunSpec, model, shard: torch.Tensor, n_mask: int):
        """Rank 0's new mask (FISH: Fisher over num_samples of its shard, un-augmented; random:
        seeded); None on the other ranks. Returns (mask or None, Fisher seconds)."""
        import numpy as np
        import torch

        if self.rank != 0:
            return None, 0.0
        prov = {"run": spec.name, "mask_number": n_mask}
        if spec.method == "random":
            return make_mask(self.cfg, model, "random", spec.density, None, 0, seed=1_000 * spec.seed + n_mask,
                             provenance=prov), 0.0
        rng = np.random.default_rng([spec.seed, 7, n_mask])
        idx = shard[torch.from_numpy(rng.permutation(shard.numel()))][: self.cfg.num_samples].to(self.device)
        batches = [(self.x_train[idx[s: s + 128]], self.y_train[idx[s: s + 128]]) for s in range(0, idx.numel(), 128)]
        t0 = time.perf_counter()
        mask = make_mask(self.cfg, model, "fish", spec.density, batches, idx.numel(), seed=spec.seed, provenance=prov)
        return mask, time.perf_counter() - t0

    # ---- one run
    def run(self, spec: RunSpec) -> dict[str, Any] | None:
        """Train one run on this rank; rank 0 returns its record (the others None)."""
        r = _Run(self, spec)
        if spec.method == "standard":
            self._standard(r)
        else:
            self._distributed(r)
        return self._finish(r)

    def _checkpoint(self, r: _Run, epoch: int, opt, average: bool) -> None:
        every = r.spec.checkpoint_every_epochs
        if every and epoch % every == 0:
            if average:  # rank 0 saves: give it everyone's BatchNorm statistics
                r.stats["buffer_bytes"] += self._average_buffers(r.model)
            if r.ckpt is not None:
                r.ckpt.save(r.model, opt, r.mask, epoch=epoch)

    def _standard(self, r: _Run) -> None:
        """Standard training on the whole training set. Every rank runs the same computation (same
        seeds, so nobody waits long in a collective); rank 0 reports."""
        import torch

        c = self.cfg
        idx = torch.arange(self.y_train.numel())
        opt = make_optimizer(self.cfg, r.model, None)
        self._train_epochs(r.model, opt, idx, 0, c.epochs, r.spec.seed, 1_000_000, r.gen_std,
                           lambda epoch, o: self._checkpoint(r, epoch, o, average=False))
        r.stats["local_steps"] = c.epochs * steps_per_epoch(idx.numel(), c.batch_size)
        r.result.update(k=r.numel, world_size=1)

    def _distributed(self, r: _Run) -> None:
        """Dense warm-up (standard training), then H local steps on this rank's shard between
        exchanges of the mask's k values (dense: all parameters); new masks every R exchanges or E
        epochs; an exchange before every checkpoint, new mask and the end."""
        import torch

        from ...distributed import SparseAverager

        c, spec, model, stats = self.cfg, r.spec, r.model, r.stats
        avg = SparseAverager(model, None, timeout=c.timeout)
        avg.sync_parameters(src=0)
        warm = c.dense_warmup_epochs
        if warm:  # the same on every rank; then rank 0's weights and statistics everywhere
            opt = make_optimizer(self.cfg, model, None)
            self._train_epochs(model, opt, torch.arange(self.y_train.numel()), 0, warm, spec.seed, 1_000_000, r.gen_std,
                               lambda epoch, o: self._checkpoint(r, epoch, o, average=False))
            avg.sync_parameters(src=0)
        shard = self._shard(spec.seed)
        spe = steps_per_epoch(shard.numel(), c.batch_size)
        total_steps = (c.epochs - warm) * spe
        masked = spec.method in ("fish", "random")

        def new_mask():
            stats["buffer_bytes"] += self._average_buffers(model)  # Fisher runs in eval mode
            mask, secs = self._make_mask(spec, model, shard, stats["mask_recomputes"])
            stats["fisher_seconds"] += secs
            r.mask = avg.set_mask(mask, broadcast_from=0)
            stats["mask_recomputes"] += 1
            return make_optimizer(self.cfg, model, r.mask)

        opt = new_mask() if masked else make_optimizer(self.cfg, model, None)
        if c.save_states and r.run_dir is not None:
            self._save_states(r.run_dir, model, r.mask, "start")
        since = 0

        def exchange():
            nonlocal since, opt
            t0 = time.perf_counter()
            avg.exchange() if masked else avg.dense_exchange()
            stats["comm_seconds"] += time.perf_counter() - t0
            stats["exchanges"] += 1
            since = 0
            if c.verify_sync:
                avg.assert_in_sync()
                stats["sync_checks"] += 1
            every = spec.mask_every_exchanges
            if masked and every and stats["exchanges"] % every == 0 and stats["local_steps"] < total_steps:
                opt = new_mask()

        for e in range(warm, c.epochs):
            for i, b in enumerate(self._order(shard, spec.seed, self.rank, e)):
                self._step(model, opt, b, r.gen, lr_at(e + i / spe, c.lr, c.lr_warmup_epochs, c.epochs))
                stats["local_steps"] += 1
                since += 1
                if since == spec.merge_interval:
                    exchange()
            end = e + 1
            ck = bool(spec.checkpoint_every_epochs) and end % spec.checkpoint_every_epochs == 0
            mk = masked and bool(spec.mask_every_epochs) and (end - warm) % spec.mask_every_epochs == 0 and end < c.epochs
            if since and (ck or mk or end == c.epochs):
                exchange()  # checkpoints, new masks and the end need the ranks in agreement
            self._checkpoint(r, end, opt, average=True)
            if mk:
                opt = new_mask()
        stats["buffer_bytes"] += self._average_buffers(model)
        a = avg.stats()
        stats.update({key: a[key] for key in ("k", "k_exchanged", "numel", "dense_exchanges", "bytes_per_exchange",
                                              "dense_bytes_per_exchange", "sparse_bytes_sent", "dense_bytes_sent",
                                              "mask_bytes_sent", "bytes_sent")}, sparse_exchanges=a["exchanges"])
        r.result.update(k=avg.k if masked else r.numel, world_size=self.world, steps_per_epoch=spe,
                        local_steps_total=total_steps, warmup_broadcast_bytes=4 * r.numel if warm and self.world > 1 else 0)

    def _finish(self, r: _Run) -> dict[str, Any] | None:
        """Gather every rank's counters; rank 0 evaluates and builds the run's record."""
        if self.cfg.save_states and r.run_dir is not None:
            self._save_states(r.run_dir, r.model, None, f"final_rank{self.rank}")
        r.stats["seconds"] = time.perf_counter() - r.t_start
        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, r.stats)
        if self.rank != 0:
            return None
        result = r.result
        result.update(self.evaluate(r.model))
        result["ranks"] = gathered
        result["seconds"] = max(s["seconds"] for s in gathered)
        if r.spec.method != "standard":
            result["bytes_per_worker"] = statistics.mean(s["bytes_sent"] + s["mask_bytes_sent"] for s in gathered)
            result["model_copies_per_worker"] = result["bytes_per_worker"] / (4 * r.numel)
            result["exchanges"] = gathered[0]["exchanges"]
        if r.mask is not None:
            result["mask_digest"] = r.mask.digest
            if r.run_dir is not None:
                r.run_dir.mkdir(parents=True, exist_ok=True)
                r.mask.save(r.run_dir / "mask.safetensors", overwrite=True)
        if r.ckpt is not None:
            sizes, entries = r.ckpt.sizes(), r.ckpt.checkpoints
            result["checkpoints"] = {
                "count": len(entries),
                "bytes_written": sizes["total_checkpoint_bytes"],
                "bytes_per_checkpoint": sizes["checkpoint_bytes"],
                "changed_entries": [e["changed"] for e in entries],
                "full_state_dict_bytes": sizes["dense_bytes"],
                # a dense checkpoint of the weights (state_dict) plus SGD's dense momentum buffer
                "full_bytes": len(entries) * (sizes["dense_bytes"] + (4 * r.numel if self.cfg.momentum else 0)),
                "base_bytes": sizes["base_bytes"],
                "composition": _checkpoint_composition(r.ckpt.directory, [e["file"] for e in entries]),
            }
        return result

    def _save_states(self, run_dir: Path, model, mask, name: str) -> None:
        import torch

        d = run_dir / "states"
        d.mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().cpu().clone() for n, p in model.named_parameters()}, d / f"{name}.pt")
        if mask is not None and self.rank == 0:
            mask.save(d / f"{name}_mask.safetensors", overwrite=True)


def _checkpoint_composition(directory: str, files: list[str]) -> dict[str, int]:
    """Bytes of a chain's checkpoint files by content (from the safetensors headers, no data read):
    weights (changed values + their indices + tensors stored whole), mask, optimizer, rng, and
    the rest (header and metadata)."""
    import torch

    from safetensors import safe_open

    out = {"weights": 0, "mask": 0, "optimizer": 0, "rng": 0, "other": 0}
    part = {"indices": "weights", "values": "weights", "dense": "weights", "mask": "mask", "optim": "optimizer",
            "rng": "rng"}
    for f in files:
        path = os.path.join(directory, f)
        tensors = 0
        with safe_open(path, "pt") as st:
            for key in st.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                sl = st.get_slice(key)
                n = math.prod(sl.get_shape()) * torch.empty((), dtype=getattr(torch, _ST_DTYPES[sl.get_dtype()])).element_size()
                out[part.get(key.split("/")[0], "other")] += n
                tensors += n
        out["other"] += os.path.getsize(path) - tensors
    return out


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
              "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
