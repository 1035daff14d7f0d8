"""Integrations with training frameworks (Hugging Face transformers). Importing this package does not
import transformers; `FishTrainer` is built on first access, `fish_trainer_class(SFTTrainer)` on call."""
from .hf import (
    FISH_MASK_FILE, FISH_MODEL_FILE, fish_mask_for, fish_trainer_class, head_names, load_task_file, save_task_file,
)


def __getattr__(name):
    if name == "FishTrainer":
        from .hf import _build_fish_trainer

        return _build_fish_trainer()
    raise AttributeError(name)


__all__ = [
    "FishTrainer", "FISH_MASK_FILE", "FISH_MODEL_FILE", "fish_mask_for", "fish_trainer_class", "head_names",
    "load_task_file", "save_task_file",
]
