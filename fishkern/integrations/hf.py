"""Hugging Face integration: FISH fine-tuning of any AutoModelForSequenceClassification, and of
causal LMs (AutoModelForCausalLM: Llama, Qwen2, Mistral, Gemma, GPT-2, …; no head forced in).

Two ways in:

- `FishTrainer`, a `transformers.Trainer` whose optimizer is MaskedAdamW over a FISH mask computed
  from the training set at the start of `train()` (the new head forced in). The learning-rate
  scheduler, logging, evaluation and checkpoint machinery stay the Trainer's. Gradient clipping
  (`max_grad_norm`) is applied to the trained entries only, as if the model were only those.
  Its checkpoints are sparse (see "Checkpoints" below) and training resumes from them bit-identically.
- `fish_trainer_class(Base)`: the same for any Trainer subclass (TRL's `SFTTrainer`, …).
- In a hand-written loop: `fish_mask_for(model, batches, density, num_samples)` gives the mask;
  `fishkern.MaskedAdamW(model.named_parameters(), mask, ...)` trains it; `opt.clip_grad_norm_` clips.

Either way, `save_task_file` writes the trained entries as a small sparse diff and `load_task_file`
puts them back onto the base model, for the same predictions.

Checkpoints
-----------
Each `checkpoint-N/` of a FishTrainer holds, instead of the dense `model.safetensors` (and the
config and tokenizer files, which training does not change):

- `fish_model.safetensors`: a task file (`SparseDiff`, checksummed; `load_task_file` reads it) with
  the k trained values as deltas from the weights training started from, the head stored whole, and
  the sha256 of those weights with the head zeroed, i.e. of the pretrained model: resuming onto
  another base model is refused (`BaseMismatchError`, the model unchanged);
- `fish_mask.safetensors`: the mask;
- what the Trainer writes itself: `optimizer.pt` (MaskedAdamW's state, k-sized), `scheduler.pt`,
  `rng_state.pth`, `trainer_state.json`, `training_args.bin`; `save_only_model=True` skips the
  first three, as for the Trainer; `save_total_limit` rotation deletes whole checkpoint
  directories (each checkpoint stands alone on the base: no chain).

`train(resume_from_checkpoint=...)` puts the trained values back onto the model given to the
trainer, which must be the base (a fresh `from_pretrained`; the randomly initialised head does not
matter), or onto the same trainer's model; `load_best_model_at_end=True` loads the best
checkpoint's values the same way. A save holds one temporary CPU copy of the parameters that have
trained entries. Parameters outside the mask or buffers that changed since training started
cannot be held by a sparse checkpoint: that save is an error. `fish_sparse_checkpoints=False`
gives the Trainer's dense checkpoints (plus the mask). The model that `trainer.save_model()` writes
at the end is dense, as with the Trainer.

The Trainer's hooks FishTrainer depends on
------------------------------------------
Public methods overridden: `create_optimizer()`, `train(resume_from_checkpoint, ...)`; public
methods used: `get_train_dataloader()`, `get_decay_parameter_names(model)`, the callback events
`on_train_begin`, `on_pre_optimizer_step`, `on_save`, `on_train_end`. Private hooks overridden:

- `_save_checkpoint(model, trial)`: wrapped; while it runs, the Trainer's
  `save_model(output_dir, _internal_call=True)` call writes the sparse model and the mask;
- `save_model(output_dir, _internal_call)`: overridden, changed only inside `_save_checkpoint`;
- `_load_from_checkpoint(resume_from_checkpoint, model)`: loads a sparse checkpoint (a dense one
  goes to the Trainer's);
- `_load_best_model()`: the same for `load_best_model_at_end`.

Relied on: the Trainer clips with `self.accelerator.clip_grad_norm_(model.parameters(), max_norm)`
(inline in transformers 4.x, inside `_clip_grad_norm` / `_get_grad_norm` in 5.x). FishTrainer routes
that call, for the model's parameters, to `MaskedAdamW.clip_grad_norm_` (with `free_dense_grads` the
dense gradients are gone; without it a dense clip would count the untrained entries).

Checked: building `FishTrainer` fails with an `ImportError` naming the hook when the installed
transformers lacks one of these methods or its parameters; and during training, a step in which
the Trainer did not call the clipping (with `max_grad_norm > 0`), a checkpoint saved without
`_save_checkpoint` → `save_model`, a resume or a best-model load that did not go through
`_load_from_checkpoint` / `_load_best_model` are errors (`RuntimeError`) rather than silently
dense, unclipped or not loaded. Tested with transformers 4.57.6 and 5.24.0.
"""
from __future__ import annotations

import inspect
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..diff import BaseMismatchError, SparseDiff, content_hash
from ..diff._io import cpu_copy, gather_flat, scatter_flat_
from ..fisher import fisher_mask
from ..mask import FishMask
from ..mask.heads import DEFAULT_HEADS, head_names  # noqa: F401 (re-exported)
from ..optim import MaskedAdamW

FISH_MASK_FILE = "fish_mask.safetensors"  # saved in every Trainer checkpoint
FISH_MODEL_FILE = "fish_model.safetensors"  # the sparse model of a Trainer checkpoint (a task file)
TRAINING_ARGS_FILE = "training_args.bin"  # the Trainer's name for it (TRAINING_ARGS_NAME)
TESTED_TRANSFORMERS = ("4.57.6", "5.24.0")


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
    (HF-style batches with "labels"), the classification head forced in, k = ⌊density × all⌋. For a
    causal LM: its per-sequence next-token loss, and no head forced in unless `head` names one."""
    return fisher_mask(model, batches, density, num_samples, force=head_names(model, head), **fisher_kwargs)


# ----------------------------------------------------------------------------------- Trainer
# (name, parameters FishTrainer calls or receives): see "The Trainer's hooks" in the module docstring
TRAINER_HOOKS = (
    ("create_optimizer", ()),
    ("train", ("resume_from_checkpoint",)),
    ("get_train_dataloader", ()),
    ("get_decay_parameter_names", ("model",)),
    ("_save_checkpoint", ("model", "trial")),
    ("save_model", ("output_dir", "_internal_call")),
    ("_load_from_checkpoint", ("resume_from_checkpoint", "model")),
    ("_load_best_model", ()),
)
CALLBACK_EVENTS = ("on_train_begin", "on_pre_optimizer_step", "on_save", "on_train_end")


def _trainer_base():
    from transformers import Trainer

    return Trainer


def check_trainer_hooks(trainer_cls: type, callback_cls: type | None = None, version: str | None = None) -> None:
    """Raise ImportError naming the first Trainer method (or parameter, or callback event) that
    FishTrainer depends on and `trainer_cls` lacks: a transformers FishTrainer was not made for."""
    if version is None:
        import transformers

        version = transformers.__version__
    tested = f"FishTrainer is tested with transformers {' and '.join(TESTED_TRANSFORMERS)}"
    for name, params in TRAINER_HOOKS:
        fn = getattr(trainer_cls, name, None)
        if not callable(fn):
            raise ImportError(
                f"FishTrainer overrides or calls Trainer.{name}({', '.join(params)}), which transformers {version} "
                f"does not have ({tested})"
            )
        try:
            have = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # no signature to check
            continue
        missing = [p for p in params if p not in have]
        if missing:
            raise ImportError(
                f"FishTrainer calls Trainer.{name} with the parameter {missing[0]!r}, which Trainer.{name} of "
                f"transformers {version} does not take ({tested})"
            )
    if callback_cls is not None:
        for event in CALLBACK_EVENTS:
            if not callable(getattr(callback_cls, event, None)):
                raise ImportError(
                    f"FishTrainer needs the TrainerCallback event {event}, which transformers {version} does not "
                    f"have ({tested})"
                )


def _save_strategy(args) -> str:
    s = args.save_strategy
    return str(getattr(s, "value", s))


class _FishTrainerMixin:
    """Methods shared by FishTrainer (kept apart so the class can be built lazily)."""

    def _init_fish(self, fish_density, fish_num_samples, fish_mask, fish_head, fish_free_dense_grads, fish_kind,
                   fish_comm_hook, fish_comm_dtype, fish_sparse_checkpoints, fish_sparse_backward=True):
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
        self.fish_sparse_checkpoints = bool(fish_sparse_checkpoints)
        self.fish_sparse_backward = bool(fish_sparse_backward)
        self.fish_comm_state = None  # the masked DDP hook's state (byte counters) once training runs under DDP
        self._fish_base = None  # the weights training started from, at the mask's entries (see _fish_record_base)
        self._fish_in_checkpoint = False  # inside Trainer._save_checkpoint
        self._fish_saved_step = None  # global step of the last checkpoint written through save_model
        self._fish_clip_calls = 0  # routed clipping calls since the last optimizer step
        self._fish_resume_pending = None  # a sparse checkpoint that _load_from_checkpoint has to load
        self._fish_best_loaded = None
        self.add_callback(_fish_callback(self))

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
        if self.fish_sparse_backward and self._sparse_backward_possible():
            # Linear / Embedding weight gradients at the masked entries only (layers that cannot take it
            # stay dense); the optimizer gives the layers back their forward when it is dropped
            self.optimizer.enable_sparse_backward(self.model, strict=False)
        return self.optimizer

    def _sparse_backward_possible(self) -> bool:
        """One process, one device, no DeepSpeed / FSDP: the Trainer wraps the model in DDP (whose
        reducer needs dense gradients) or DataParallel (which copies modules) after this point."""
        a = self.args
        wrapped = getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False)
        return a.world_size == 1 and getattr(a, "n_gpu", 1) <= 1 and not wrapped

    def _masked_optimizer(self) -> MaskedAdamW:
        opt = self.optimizer
        while not isinstance(opt, MaskedAdamW) and hasattr(opt, "optimizer"):
            opt = opt.optimizer  # accelerate's AcceleratedOptimizer wraps ours
        return opt

    # ------------------------------------------------------------------ clipping
    def _route_clipping(self) -> None:
        """Make the Trainer's `accelerator.clip_grad_norm_(model.parameters(), max_norm)` clip the
        trained entries (MaskedAdamW.clip_grad_norm_); any other call goes to accelerate unchanged.
        Done when training starts: the Trainer re-creates its accelerator in hyper-parameter search."""
        acc = self.accelerator
        original = getattr(acc, "clip_grad_norm_", None)
        if original is None:
            raise ImportError("FishTrainer routes the Trainer's accelerator.clip_grad_norm_ call, but this accelerate has none")
        if getattr(original, "_fishkern_route", False):
            return
        trainer_ref = weakref.ref(self)  # the accelerator must not keep the trainer alive

        def clip_grad_norm_(parameters, max_norm, norm_type=2, *args, **kwargs):
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            trainer = trainer_ref()
            opt = trainer._masked_optimizer() if trainer is not None and trainer.optimizer is not None else None
            if isinstance(opt, MaskedAdamW):
                mine = {id(p) for g in opt.param_groups for p in g["params"]}
                if {id(p) for p in params} == mine:
                    trainer._fish_clip_calls += 1
                    return opt.clip_grad_norm_(max_norm, norm_type)
            return original(params, max_norm, norm_type, *args, **kwargs)

        clip_grad_norm_._fishkern_route = True
        acc.clip_grad_norm_ = clip_grad_norm_

    # ------------------------------------------------------------------ the base
    def _fish_has_base(self) -> bool:
        b = self._fish_base
        return b is not None and b["model"]() is self.model and self.fish_mask is not None and b["digest"] == self.fish_mask.digest

    @torch.no_grad()
    def _fish_record_base(self, content: bool = True) -> dict[str, Any]:
        """The weights training starts from, in k values: the model's values at the mask's entries
        (zeros for the head, which is new at fine-tuning), and the sha256 of the whole model with the
        head zeroed (the pretrained weights: what a sparse checkpoint must be loaded onto)."""
        mask = self.fish_mask
        params = dict(self.model.named_parameters())
        head = set(mask.forced)
        for n in head:
            if mask.k_of(n) != params[n].numel():
                raise ValueError(
                    f"the mask forces {n!r} in but holds {mask.k_of(n)} of its {params[n].numel()} entries; sparse "
                    "checkpoints store forced parameters whole (pass fish_sparse_checkpoints=False)"
                )
        entries = {
            n: torch.zeros(int(i.numel()), dtype=params[n].dtype) if n in head else gather_flat(params[n], i).cpu()
            for n, i in mask.indices.items()
        }
        canonical = {n: torch.zeros(p.shape, dtype=p.dtype) if n in head else p.detach() for n, p in params.items()}
        return {
            "model": weakref.ref(self.model),
            "digest": mask.digest,
            "entries": entries,
            "content_sha256": content_hash(canonical) if content else None,
            "buffers_sha256": content_hash(dict(self.model.named_buffers())),
        }

    @torch.no_grad()
    def _fish_write_entries(self, values: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for n, v in values.items():
            scatter_flat_(params[n], self.fish_mask.indices[n], v)

    # ------------------------------------------------------------------ saving
    def _save_checkpoint(self, model, trial, *args, **kwargs):
        """The Trainer's checkpoint (optimizer, scheduler, RNG, trainer state, rotation), with the
        model written by `save_model` below as a sparse diff and the mask."""
        self._fish_in_checkpoint = True
        try:
            return super()._save_checkpoint(model, trial, *args, **kwargs)
        finally:
            self._fish_in_checkpoint = False

    def save_model(self, output_dir=None, _internal_call=False, *args, **kwargs):
        """As Trainer.save_model (dense) — except when the Trainer calls it to write a checkpoint:
        then the sparse model (FISH_MODEL_FILE) and the mask are written instead."""
        if not self._fish_in_checkpoint:
            return super().save_model(output_dir, _internal_call, *args, **kwargs)
        self._fish_saved_step = self.state.global_step
        if not self.fish_sparse_checkpoints:
            super().save_model(output_dir, _internal_call, *args, **kwargs)
        if not self.args.should_save:  # the main process writes (the Trainer's rule)
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if self.fish_sparse_checkpoints:
            self._checkpoint_diff().save(os.path.join(output_dir, FISH_MODEL_FILE), overwrite=True)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))
        if self.fish_mask is not None:
            self.fish_mask.save(os.path.join(output_dir, FISH_MASK_FILE), overwrite=True)
        return None

    @torch.no_grad()
    def _checkpoint_diff(self) -> SparseDiff:
        """The model as a task file relative to the weights training started from."""
        if not self._fish_has_base():
            raise RuntimeError(
                "FishTrainer: no record of the weights training started from (the mask or the model was replaced "
                "after train() began); pass fish_sparse_checkpoints=False for dense checkpoints"
            )
        rec, mask = self._fish_base, self.fish_mask
        params = dict(self.model.named_parameters())
        head = set(mask.forced)
        base = {}
        for n, p in params.items():
            if n in head:
                base[n] = torch.zeros(p.shape, dtype=p.dtype)
            elif mask.k_of(n):
                base[n] = cpu_copy(p)
                scatter_flat_(base[n], mask.indices[n], rec["entries"][n])
            else:
                base[n] = p.detach()  # never trained: the base itself
        tuned = {n: p.detach() for n, p in params.items()}
        diff = SparseDiff.from_models(
            base, tuned, mask, kind="delta", content_hash=True, check_outside_mask=False, step=self.state.global_step,
            extra={"fishkern_task_file": 1, "head": list(mask.forced), "fishkern_trainer_checkpoint": 1},
        )
        if diff.base["content_sha256"] != rec["content_sha256"]:
            raise RuntimeError(
                f"FishTrainer: at step {self.state.global_step} the model differs from the weights training started "
                "from at entries outside the FISH mask (something other than the optimizer changed them), which a "
                "sparse checkpoint cannot hold; pass fish_sparse_checkpoints=False for dense checkpoints"
            )
        if content_hash(dict(self.model.named_buffers())) != rec["buffers_sha256"]:
            raise RuntimeError(
                f"FishTrainer: at step {self.state.global_step} the model's buffers (e.g. BatchNorm statistics) differ "
                "from those at the start of training, which a sparse checkpoint cannot hold; pass "
                "fish_sparse_checkpoints=False for dense checkpoints"
            )
        return diff

    # ------------------------------------------------------------------ loading
    @torch.no_grad()
    def _fish_load_sparse(self, folder: str, what: str) -> None:
        """Put a sparse checkpoint's values onto the model: the base's values (recorded, or the
        model's own if it is the base) at the mask's entries, then the diff, verified against the
        base's hash. On any error the model is left as it was."""
        path = os.path.join(folder, FISH_MODEL_FILE)
        diff = SparseDiff.load(path)
        mask = self.fish_mask
        if diff.mask_digest != mask.digest:
            raise ValueError(
                f"{path} was saved with another FISH mask (digest {str(diff.mask_digest)[:16]}…) than this trainer's "
                f"({mask.digest[:16]}…)"
            )
        params = dict(self.model.named_parameters())
        current = {n: gather_flat(params[n], i).cpu() for n, i in mask.indices.items()}
        fresh = not self._fish_has_base()
        rec = self._fish_record_base(content=False) if fresh else self._fish_base
        try:
            self._fish_write_entries(rec["entries"])
            diff.apply_(self.model, verify="full", mask=mask)
        except BaseMismatchError as e:
            self._fish_write_entries(current)
            raise BaseMismatchError(
                f"cannot {what} {folder}: {e}. A FishTrainer checkpoint holds the trained entries only and loads onto "
                "the model training started from (the same pretrained weights; the head may differ); this model is "
                "another one"
            ) from None
        except BaseException:
            self._fish_write_entries(current)
            raise
        if fresh:
            rec["content_sha256"] = diff.base["content_sha256"]  # verified by apply_
            self._fish_base = rec

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None, *args, **kwargs):
        self._fish_resume_pending = None
        if os.path.isfile(os.path.join(resume_from_checkpoint, FISH_MODEL_FILE)):
            if model is not None and model is not self.model:
                raise ValueError("a sparse FishTrainer checkpoint cannot be loaded into a wrapped (FSDP/SageMaker) model")
            return self._fish_load_sparse(resume_from_checkpoint, "resume from")
        if self.fish_sparse_checkpoints and self.fish_mask is not None and not self._fish_has_base():
            self._fish_base = self._fish_record_base()  # before the dense weights replace the base
        return super()._load_from_checkpoint(resume_from_checkpoint, model, *args, **kwargs)

    def _load_best_model(self, *args, **kwargs):
        best = self.state.best_model_checkpoint
        if self.fish_mask is not None and best and os.path.isfile(os.path.join(best, FISH_MODEL_FILE)):
            self._fish_load_sparse(best, "load the best model from")
            self._fish_best_loaded = best
            return None
        return super()._load_best_model(*args, **kwargs)

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
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, FISH_MODEL_FILE)):
            self._fish_resume_pending = os.fspath(path)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _fish_train_begin(self) -> None:
        """on_train_begin: the optimizer exists, the model is wrapped, nothing has been stepped."""
        if self._fish_resume_pending is not None:
            raise RuntimeError(
                f"FishTrainer: the Trainer resumed from {self._fish_resume_pending} without calling "
                "Trainer._load_from_checkpoint, so its sparse model was not loaded; this transformers version is not "
                f"supported (tested: {', '.join(TESTED_TRANSFORMERS)})"
            )
        if self.fish_sparse_checkpoints and _save_strategy(self.args) != "no":
            if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
                raise ValueError("FishTrainer's sparse checkpoints need an unsharded model: pass "
                                 "fish_sparse_checkpoints=False under DeepSpeed or FSDP")
            if self.fish_mask is not None and not self._fish_has_base():
                self._fish_base = self._fish_record_base()
        self._setup_ddp()
        self._route_clipping()
        self._fish_clip_calls = 0

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


def _fish_callback(trainer):
    """A TrainerCallback for what FishTrainer does at the Trainer's events, and its checks that the
    Trainer's hooks were called (see the module docstring). Holds the trainer weakly."""
    from transformers import TrainerCallback

    ref = weakref.ref(trainer)
    unsupported = f"this transformers version is not supported (tested: {', '.join(TESTED_TRANSFORMERS)})"

    class FishTrainerCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            t = ref()
            if t is not None:
                t._fish_train_begin()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            t = ref()
            if t is None:
                return
            calls, t._fish_clip_calls = t._fish_clip_calls, 0
            if args.max_grad_norm is not None and args.max_grad_norm > 0 and calls == 0:
                raise RuntimeError(
                    f"FishTrainer: max_grad_norm={args.max_grad_norm} but the Trainer did not clip through "
                    "accelerator.clip_grad_norm_(model.parameters(), ...) before this optimizer step, so the trained "
                    f"entries would not be clipped; {unsupported}"
                )

        def on_save(self, args, state, control, **kwargs):
            t = ref()
            if t is not None and t._fish_saved_step != state.global_step:
                raise RuntimeError(
                    f"FishTrainer: the Trainer wrote checkpoint-{state.global_step} without calling "
                    "Trainer._save_checkpoint -> save_model(output_dir, _internal_call=True), so it holds neither the "
                    f"sparse model nor the FISH mask; {unsupported}"
                )

        def on_train_end(self, args, state, control, **kwargs):
            t = ref()
            best = state.best_model_checkpoint
            if (t is not None and args.load_best_model_at_end and best and t._fish_best_loaded != best
                    and os.path.isfile(os.path.join(best, FISH_MODEL_FILE))):
                raise RuntimeError(
                    f"FishTrainer: load_best_model_at_end=True but the Trainer did not call Trainer._load_best_model, "
                    f"so the best checkpoint {best} was not loaded; {unsupported}"
                )

    return FishTrainerCallback()


_FISH_TRAINERS: dict[type, type] = {}  # Trainer class -> its FISH subclass


_FISH_DOC = """`{base}` that trains only a FISH mask's entries with MaskedAdamW.

            Extra arguments: fish_density (0.005), fish_num_samples (1024, the paper's N),
            fish_mask (a precomputed FishMask: skips the Fisher pass), fish_head (head patterns,
            default "classifier"/"score"; nothing for a causal LM), fish_free_dense_grads (True: dense
            .grad freed during backward), fish_kind ("empirical" or "true"), fish_comm_hook (True: under
            DDP only the masked gradient entries are all-reduced, 4·k bytes a step), fish_comm_dtype (None,
            or torch.bfloat16 to send them in 2·k bytes), fish_sparse_checkpoints (True: checkpoints hold
            the k trained values, the mask and the k-sized optimizer state instead of the dense model; see
            the module docstring), fish_sparse_backward (True: Linear / Embedding weight gradients
            computed at the masked entries only, in one process on one device; see
            fishkern.optim.sparse_backward). The rest is the Trainer's: its scheduler,
            its weight-decay grouping (none on biases and norm weights), its max_grad_norm (applied
            to the trained entries). TrainingArguments.optim must be an AdamW; fp16 loss scaling is
            not supported (use bf16). Set weight_decay=0.0 for the paper's recipe. The mask is
            computed on the first `train()` from `get_train_dataloader()` (`trainer.fish_mask`) and
            saved in every checkpoint, from where `train(resume_from_checkpoint=...)` reads it.
            A causal LM (``*ForCausalLM``) is scored with its per-sequence next-token loss.
            """


def fish_trainer_class(base: type | None = None) -> type:
    """The FISH version of a `transformers.Trainer` subclass — e.g. TRL's ``SFTTrainer``:
    ``FishSFTTrainer = fish_trainer_class(SFTTrainer)`` takes the base's arguments plus
    FishTrainer's ``fish_*`` ones. ``base=None``: ``transformers.Trainer`` (that is `FishTrainer`).
    One class per base (cached). The base must keep the Trainer's hooks FishTrainer relies on (see
    the module docstring; checked: an ImportError names a missing one) and not replace
    ``create_optimizer``'s choice of optimizer itself."""
    from transformers import TrainerCallback

    Trainer = _trainer_base()
    base = Trainer if base is None else base
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise TypeError(f"fish_trainer_class needs a subclass of transformers.Trainer, got {base!r}")
    if issubclass(base, _FishTrainerMixin):
        raise TypeError(f"{base.__name__} already trains a FISH mask")
    if base not in _FISH_TRAINERS:
        check_trainer_hooks(base, TrainerCallback)

        def __init__(self, *args, fish_density: float = 0.005, fish_num_samples: int = 1024,
                     fish_mask: FishMask | None = None, fish_head=None, fish_free_dense_grads: bool = True,
                     fish_kind: str = "empirical", fish_comm_hook: bool = True, fish_comm_dtype=None,
                     fish_sparse_checkpoints: bool = True, fish_sparse_backward: bool = True, **kwargs):
            base.__init__(self, *args, **kwargs)
            self._init_fish(fish_density, fish_num_samples, fish_mask, fish_head, fish_free_dense_grads, fish_kind,
                            fish_comm_hook, fish_comm_dtype, fish_sparse_checkpoints, fish_sparse_backward)

        name = "FishTrainer" if base is Trainer else f"Fish{base.__name__}"
        cls = type(name, (_FishTrainerMixin, base), {
            "__init__": __init__, "__doc__": _FISH_DOC.format(base=f"{base.__module__}.{base.__qualname__}"),
            "__module__": __name__, "__qualname__": name,
        })
        _FISH_TRAINERS[base] = cls
    return _FISH_TRAINERS[base]


def _build_fish_trainer():
    return fish_trainer_class(None)


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
