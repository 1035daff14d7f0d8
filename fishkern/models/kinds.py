"""What kind of model a module is, where the library's defaults depend on it (the Fisher objective,
the head forced into a mask). By class name: transformers need not be importable."""
from __future__ import annotations

import torch.nn as nn

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # Llama/Qwen/Mistral/Gemma…, GPT-2-style


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal language model (``*ForCausalLM``, ``*LMHeadModel``)."""
    return type(model).__name__.endswith(CAUSAL_LM_SUFFIXES)
