"""Hugging Face integration: FISH fine-tuning of any AutoModelForSequenceClassification.

Two ways in:

- `FishTrainer`, a `transformers.Trainer` whose optimizer is MaskedAdamW over a FISH mask computed
  from the training set at the start of `train()` (the new head forced in). The learning-rate
  scheduler, logging, evaluation and checkpoint machinery stay the Trainer's. Gradient clipping
  (`max_grad_norm`) is applied to the trained entries only, as if the model were only those, and
  the mask is saved in every checkpoint so that training resumes on it.
- In a hand-written loop: `fish_mask_for(model, batches, density, num_samples)` gives the mask;
  `fishkern.MaskedAdamW(model.named_parameters(), mask, ...)` trains it; `opt.clip_grad_norm_` clips.

Either way, `save_task_file` writes the trained entries as a small sparse diff and `load_task_file`
puts them back onto the base model, for the same predictions.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..diff import SparseDiff
from ..fisher import fisher_mask
from ..mask import FishMask
from ..mask.heads import DEFAULT_HEADS, head_names  # noqa: F401 (re-exported)
from ..optim import MaskedAdamW

FISH_MASK_FILE = "fish_mask.safetensors"  # saved in every Trainer checkpoint


def fish_mask_for(
    model: nn.Module,
    batches: Iterable,
    density: float = 0.005,
    num_samples: int = 1024,
    *,
    head: Sequence[str] | str | None = None,
    **fisher_kwargs,
) -> FishMask:
    """The paper's mask for a sequence classifier: Fisher scores over `num_samples` training samples
    (HF-style batches with "labels"), the classification head forced in, k = ⌊density × all⌋."""
    return fisher_mask(model, batches, density, num_samples, force=head_names(model, head), **fisher_kwargs)


# ----------------------------------------------------------------------------------- Trainer
def _trainer_base():
    from transformers import Trainer

    return Trainer


class _FishTrainerMixin:
    """Methods shared by FishTrainer (kept apart so the class can be built lazily)."""

    def _init_fish(self, fish_density, fish_num_samples, fish_mask, fish_head, fish_free_dense_grads, fish_kind,
                   fish_comm_hook, fish_comm_dtype):
        if fish_mask is None and not (0.0 < fish_density <= 1.0):
            raise ValueError(f"fish_density must be in (0, 1], got {fish_density!r}")
        if fish_comm_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"fish_comm_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {fish_comm_dtype!r}")
        self.fish_density = fish_density
        self.fish_num_samples = fish_num_samples
        self.fish_mask = fish_mask
        self.fish_head = fish_head
        self.fish_free_dense_grads = fish_free_dense_grads
        self.fish_kind = fish_kind
        self.fish_comm_hook = fish_comm_hook
        self.fish_comm_dtype = fish_comm_dtype
        self.fish_comm_state = None  # the masked DDP hook's state (byte counters) once training runs under DDP
        self.add_callback(_distributed_callback(self))

    def _multi_process(self) -> bool:
        import torch.distributed as dist

        return self.args.world_size > 1 and dist.is_available() and dist.is_initialized()

    def compute_fish_mask(self) -> FishMask:
        """Fisher scores over the training set as the Trainer will feed it (its collator, its seed).
        With several processes (torchrun, accelerate launch) each process scores its share of the N
        samples from its own shard of the data, the scores are summed over the processes and the
        main process selects the mask and broadcasts it: one mask, the same on every rank. The N
        samples are the first N of one process's order when N is a multiple of the global batch
        (each process takes the first N/W of its shard)."""
        loader = self.get_train_dataloader()
        kwargs = dict(kind=self.fish_kind, seed=self.args.seed, progress=not self.args.disable_tqdm and self.is_world_process_zero())
        if self._multi_process():
            from ..distributed.fisher import fisher_mask_distributed

            return fisher_mask_distributed(
                self.model, loader, self.fish_density, self.fish_num_samples,
                force=head_names(self.model, self.fish_head), **kwargs,
            )
        return fish_mask_for(self.model, loader, self.fish_density, self.fish_num_samples, head=self.fish_head, **kwargs)

    def _setup_ddp(self) -> None:
        """Called when training starts, after the Trainer wrapped the model: under DDP, send only the
        masked gradient entries (4·k bytes a step instead of 4·|θ|)."""
        from torch.nn.parallel import DistributedDataParallel

        ddp = self.model_wrapped
        if not isinstance(ddp, DistributedDataParallel) or getattr(ddp, "_fishkern_comm_state", None) is not None:
            return
        from ..distributed.ddp import register_masked_comm_hook

        if self.fish_comm_hook and getattr(ddp, "_comm_hooks", None):
            import warnings

            warnings.warn(
                "FishTrainer: the DDP module already has a communication hook (e.g. from accelerate's "
                "DistributedDataParallelKwargs(comm_hook=...)); keeping it, so all dense gradients are reduced. "
                "Drop that hook to reduce only the masked entries, or pass fish_comm_hook=False to silence this",
                stacklevel=2,
            )
            return
        if self.fish_comm_hook:
            self.fish_comm_state = register_masked_comm_hook(ddp, self._masked_optimizer(), dtype=self.fish_comm_dtype)

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is not None:
            return self.optimizer
        a = self.args
        if "adamw" not in str(getattr(a.optim, "value", a.optim)).lower():
            raise ValueError(f"FishTrainer trains with MaskedAdamW; TrainingArguments.optim={a.optim!r} is not an AdamW")
        if a.fp16:
            raise ValueError("FishTrainer does not support fp16 loss scaling (its clipping sees scaled gradients); use bf16=True")
        if self.fish_mask is None:
            self.fish_mask = self.compute_fish_mask()
        else:
            self.fish_mask.check_matches(self.model.named_parameters())
        # the Trainer's weight-decay grouping: no decay for biases and norm weights
        decay = set(self.get_decay_parameter_names(self.model))
        named = list(self.model.named_parameters())
        groups = [
            {"params": [(n, p) for n, p in named if n in decay], "weight_decay": a.weight_decay},
            {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        self.optimizer = MaskedAdamW(
            groups, self.fish_mask, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
            eps=a.adam_epsilon, free_dense_grads=self.fish_free_dense_grads,
        )
        return self.optimizer

    def _masked_optimizer(self) -> MaskedAdamW:
        opt = self.optimizer
        while not isinstance(opt, MaskedAdamW) and hasattr(opt, "optimizer"):
            opt = opt.optimizer  # accelerate's AcceleratedOptimizer wraps ours
        return opt

    def _clip_grad_norm(self, model):
        """The Trainer's clipping, applied to the trained entries only (with free_dense_grads the
        dense .grad is None): clip as if the model were only those entries."""
        return self._masked_optimizer().clip_grad_norm_(self.args.max_grad_norm)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.fish_mask is not None and self.args.should_save and os.path.isdir(folder):  # the main process only
            self.fish_mask.save(os.path.join(folder, FISH_MASK_FILE), overwrite=True)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """As Trainer.train; resuming reads the FISH mask saved with the checkpoint (a mask
        recomputed from the fine-tuned weights would not match the saved optimizer state)."""
        path = resume_from_checkpoint
        if path is True:
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(self.args.output_dir)
        if isinstance(path, (str, os.PathLike)) and self.fish_mask is None:
            mask_file = os.path.join(path, FISH_MASK_FILE)
            if not os.path.exists(mask_file):
                raise FileNotFoundError(
                    f"{mask_file} not found: the checkpoint was not written by FishTrainer; pass fish_mask= to resume"
                )
            self.fish_mask = FishMask.load(mask_file)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_task_file(self, path: str | os.PathLike, base, *, overwrite: bool = False) -> int:
        """Write the task file (see ``save_task_file``); with several processes only the main one
        writes (the others return 0 once it is written)."""
        written, error = 0, None
        if self.args.should_save:
            try:
                written = save_task_file(self.model, base, self.fish_mask, path, overwrite=overwrite)
            except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = e
        if self._multi_process():  # every rank learns whether the main process wrote it
            from ..distributed._comm import Comm

            Comm().agree_ok("FishTrainer.save_task_file", error)
        elif error is not None:
            raise error
        return written


def _distributed_callback(trainer):
    """A TrainerCallback whose on_train_begin — after the Trainer has built the optimizer and
    wrapped the model (DDP) — sets up the masked gradient all-reduce."""
    from transformers import TrainerCallback

    class FishDistributedCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            trainer._setup_ddp()

    return FishDistributedCallback()


_FISH_TRAINER = None


def _build_fish_trainer():
    global _FISH_TRAINER
    if _FISH_TRAINER is None:
        Trainer = _trainer_base()

        class FishTrainer(_FishTrainerMixin, Trainer):
            """`transformers.Trainer` that trains only a FISH mask's entries with MaskedAdamW.

            Extra arguments: fish_density (0.005), fish_num_samples (1024, the paper's N),
            fish_mask (a precomputed FishMask: skips the Fisher pass), fish_head (head patterns,
            default "classifier"/"score"), fish_free_dense_grads (True: dense .grad freed during
            backward), fish_kind ("empirical" or "true"), fish_comm_hook (True: under DDP only the masked
            gradient entries are all-reduced, 4·k bytes a step), fish_comm_dtype (None, or torch.bfloat16
            to send them in 2·k bytes). The rest is the Trainer's: its scheduler,
            its weight-decay grouping (none on biases and norm weights), its max_grad_norm (applied
            to the trained entries). TrainingArguments.optim must be an AdamW; fp16 loss scaling is
            not supported (use bf16). Set weight_decay=0.0 for the paper's recipe. The mask is
            computed on the first `train()` from `get_train_dataloader()` (`trainer.fish_mask`) and
            saved in every checkpoint, from where `train(resume_from_checkpoint=...)` reads it.
            """

            def __init__(self, *args, fish_density: float = 0.005, fish_num_samples: int = 1024,
                         fish_mask: FishMask | None = None, fish_head=None, fish_free_dense_grads: bool = True,
                         fish_kind: str = "empirical", fish_comm_hook: bool = True, fish_comm_dtype=None, **kwargs):
                super().__init__(*args, **kwargs)
                self._init_fish(fish_density, fish_num_samples, fish_mask, fish_head, fish_free_dense_grads, fish_kind,
                                fish_comm_hook, fish_comm_dtype)

        _FISH_TRAINER = FishTrainer
    return _FISH_TRAINER


def __getattr__(name):  # FishTrainer subclasses transformers.Trainer: build it on first use only
    if name == "FishTrainer":
        return _build_fish_trainer()
    raise AttributeError(name)


# -------------------------------------------------------------------------------- task files
def _params(model_or_state, names) -> dict[str, torch.Tensor]:
    src = dict(model_or_state.named_parameters()) if isinstance(model_or_state, nn.Module) else model_or_state
    missing = [n for n in names if n not in src]
    if missing:
        raise ValueError(f"the base model has no parameter {missing[0]!r}: not the model that was fine-tuned")
    return {n: src[n].detach() for n in names}


def save_task_file(
    model: nn.Module,
    base: nn.Module | Mapping[str, torch.Tensor],
    mask: FishMask,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> int:
    """Write the mask's entries of a fine-tuned model as a sparse diff (safetensors); returns bytes.

    base: the model (or its state dict) as it was before fine-tuning. The head (the mask's forced
    parameters, new at fine-tuning) is stored whole as absolute values: the diff's base has it at
    zero, and `load_task_file` zeroes a fresh model's randomly initialised head before applying, so
    the file loads onto any copy of the pretrained model, and onto nothing else (its weights are
    verified byte for byte by hash)."""
    names = [n for n, _ in model.named_parameters()]
    base_params = _params(base, names)
    for n, p in model.named_parameters():
        if base_params[n].untyped_storage().data_ptr() == p.untyped_storage().data_ptr() and p.numel():
            raise ValueError(
                f"the base's {n!r} shares memory with the fine-tuned model's: pass a copy of the pretrained "
                "weights taken before training ({n: p.detach().clone() for n, p in model.named_parameters()})"
            )
    head = list(mask.forced)
    canonical = {n: torch.zeros_like(t) if n in head else t for n, t in base_params.items()}
    tuned = {n: p.detach() for n, p in model.named_parameters()}
    diff = SparseDiff.from_models(
        canonical, tuned, mask, kind="delta", check_outside_mask=True,
        extra={"fishkern_task_file": 1, "head": head, **(extra or {})},
    )
    return diff.save(path, overwrite=overwrite)


@torch.no_grad()
def load_task_file(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Apply a task file written by `save_task_file` to a freshly loaded base model, in place.
    Refuses (leaving the model unchanged) a file for another base model or a damaged file."""
    diff = SparseDiff.load(path)
    head = list(diff.extra.get("head", [])) if isinstance(diff.extra, Mapping) else []
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in head if n in params}
    try:
        for n in saved:
            params[n].zero_()
        diff.apply_(model)
    except Exception:
        for n, v in saved.items():
            params[n].copy_(v)
        raise
    return model
