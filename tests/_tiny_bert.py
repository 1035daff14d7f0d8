"""A tiny random BERT with the MiniLM tokenizer, saved like a hub model, and a free TCP port: what
the multi-process Hugging Face tests (test_ddp_hf.py, test_ddp_glue.py) share."""
from __future__ import annotations

import socket
from pathlib import Path

import torch

WORDS = ["good", "great", "awful", "bad", "lovely", "terrible", "nice", "horrible", "fine", "sad", "happy", "ugly"]


def save_tiny_bert(directory: Path) -> Path:
    """No dropout: processes with their own random streams must compute what one process does."""
    import transformers

    from fishkern.data import minilm_path

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    cfg = transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
