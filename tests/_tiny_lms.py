"""Tiny random decoder LMs of today's families, built from transformers' config classes (a few
layers, hidden 64, vocabulary 1-5k), and causal-LM batches with padding and masked prompts."""
from __future__ import annotations

import torch

VOCAB = 1000
FAMILIES = ("llama", "llama_tied", "qwen2_tied", "mistral", "gemma_tied", "gpt2_tied")


def tiny_config(family: str, vocab: int = VOCAB):
    import transformers as tr

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        return tr.LlamaConfig(**common, tie_word_embeddings=False)
    if family == "llama_tied":
        return tr.LlamaConfig(**common, tie_word_embeddings=True)
    if family == "qwen2_tied":
        return tr.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "mistral":
        return tr.MistralConfig(**common, tie_word_embeddings=False)
    if family == "gemma_tied":  # (1 + w) RMSNorm, √hidden-scaled word embeddings, tied lm_head
        return tr.GemmaConfig(**common, head_dim=16, tie_word_embeddings=True)
    if family == "gpt2_tied":  # Conv1D projections, LayerNorm, learned positions, tied lm_head
        return tr.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    raise ValueError(family)


def tiny_lm(family: str, dtype=torch.float64, seed: int = 0, vocab: int = VOCAB):
    import transformers as tr

    torch.manual_seed(seed)
    model = tr.AutoModelForCausalLM.from_config(tiny_config(family, vocab)).to(dtype)
    with torch.no_grad():  # Gemma's RMSNorm weights start at 0 and its head at the embedding: make every
        for p in model.parameters():  # parameter's score depend on its value
            p.add_(torch.randn_like(p) * 0.05)
    return model


def lm_batches(vocab: int = VOCAB, n_batches: int = 2, batch: int = 4, tokens: int = 12, *, padded: bool = True,
               prompt: int = 3, seed: int = 1):
    """Right-padded batches (attention mask 0 and labels -100 after each length) with the first
    ``prompt`` tokens' labels masked (-100), as an SFT collator gives."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (batch, tokens), generator=g)
        mask = torch.ones_like(ids)
        if padded:
            lengths = torch.randint(prompt + 2, tokens + 1, (batch,), generator=g)
            lengths[0] = tokens
            mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
            ids = ids.masked_fill(mask == 0, 0)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :prompt] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out



def assert_scores_close(got, ref, rtol):
    """tests._reference.assert_scores_close, with every reference tensor required non-zero: each
    parameter of these models has a score."""
    from tests._reference import assert_scores_close as close

    close(got, ref, rtol, zero_tensors_allowed=False)
