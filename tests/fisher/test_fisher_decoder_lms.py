"""Fisher for decoder LMs: the causal-LM per-sequence loss, and batched rules for what Llama / Qwen2 /
Mistral / Gemma / GPT-2 contain (RMSNorm forms, Conv1D, scaled and tied embeddings), each against
the batch-size-1 loop, with no fallback of any kind."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fishkern.fisher import estimate_fisher, fisher_reference
from fishkern.fisher.rules import Conv1DRule, EmbeddingRule, RMSNormRule, rule_for
from fishkern.mask.heads import head_names
from tests._tiny_lms import FAMILIES, VOCAB, assert_scores_close, lm_batches, tiny_lm

pytest.importorskip("transformers")


def batched_without_fallback(model, data, n, **kw):
    """The batched estimate, failing on any fishkern warning (loop fallback, generic rule)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = estimate_fisher(model, data, n, progress=False, **kw)
    ours = [str(w.message) for w in seen if "fishkern" in str(w.message)]
    assert not ours, ours
    assert got.implementation == "torch" and got.fallback_reason is None and got.generic_modules == []
    return got


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [True, False])
def test_batched_equals_the_loop_in_float64(family, padded):
    model = tiny_lm(family)
    data = lm_batches(padded=padded)
    got = batched_without_fallback(model, data, 8)
    assert_scores_close(got.scores, fisher_reference(model, data, 8, progress=False), 1e-10)


@pytest.mark.parametrize("family", ["llama_tied", "gemma_tied", "gpt2_tied"])
def test_batched_equals_the_loop_in_float32(family):
    model = tiny_lm(family, dtype=torch.float32)
    data = lm_batches()
    got = batched_without_fallback(model, data, 8)
    assert_scores_close(got.scores, fisher_reference(model, data, 8, progress=False), 1e-5)


def test_the_rules_that_run_are_the_batched_ones():
    for family, expect in [("llama", RMSNormRule), ("gemma_tied", RMSNormRule), ("gpt2_tied", Conv1DRule)]:
        model = tiny_lm(family)
        kinds = {type(rule_for(m, n)) for n, m in model.named_modules() if list(m.parameters(recurse=False))}
        assert expect in kinds
    gemma = tiny_lm("gemma_tied")
    emb = gemma.model.embed_tokens
    rule = rule_for(emb, "model.embed_tokens")
    assert isinstance(rule, EmbeddingRule)
    if type(emb).__name__.endswith("ScaledWordEmbedding"):  # transformers 5: the embedding scales its output
        assert float(rule.scale) == pytest.approx(math.sqrt(64), rel=1e-6)
    else:  # transformers 4.x: a plain embedding, the model scales its output downstream
        assert rule.scale is None


def test_tied_weights_cross_term_is_not_optional():
    """Σ(A+B)² ≠ ΣA² + ΣB²: scoring each use alone (what an untied model would do) is wrong."""
    model = tiny_lm("llama_tied")
    data = lm_batches(n_batches=1)
    ref = fisher_reference(model, data, 4, progress=False)["model.embed_tokens.weight"]
    untied = tiny_lm("llama")  # same seed: the same draws, except the separate head
    untied.load_state_dict({**model.state_dict(), "lm_head.weight": model.model.embed_tokens.weight.detach().clone()})
    parts = fisher_reference(untied, data, 4, progress=False)
    no_cross = parts["model.embed_tokens.weight"] + parts["lm_head.weight"]
    assert (no_cross - ref).abs().max() > 1e-3 * ref.abs().max()
    got = batched_without_fallback(model, data, 4).scores["model.embed_tokens.weight"]
    assert_scores_close({"w": got}, {"w": ref}, 1e-10)


def test_padding_and_prompt_tokens_do_not_count():
    """A padded batch scores what the same sequences score unpadded; masked prompt labels are
    excluded (changing their ids' labels changes nothing)."""
    model = tiny_lm("qwen2_tied")
    (batch,) = lm_batches(n_batches=1)
    padded = batched_without_fallback(model, [batch], 4).scores
    one_by_one = []
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        one_by_one.append({k: v[i:i + 1, :n] for k, v in batch.items()})
    unpadded = batched_without_fallback(model, one_by_one, 4).scores
    assert_scores_close(padded, unpadded, 1e-10)
    other = dict(batch, labels=batch["labels"].clone())
    other["labels"][:, :3] = -100  # already masked: same
    other_ids = dict(other, input_ids=batch["input_ids"].clone())
    assert_scores_close(batched_without_fallback(model, [other], 4).scores, padded, 0)
    other_ids["labels"][:, 4] = -100  # one more target masked: different
    changed = batched_without_fallback(model, [other_ids], 4).scores
    assert any(not torch.equal(changed[n], padded[n]) for n in padded)


def test_the_loss_is_the_sum_of_next_token_negative_log_likelihoods():
    """The per-sequence loss, by an independent route: cross_entropy over the shifted labels with
    ignore_index, summed, at batch size 1 (the model's own .loss would do, but Hugging Face upcasts
    it to float32 even for a float64 model)."""
    model = tiny_lm("llama")
    (batch,) = lm_batches(n_batches=1, batch=1, padded=False)
    got = batched_without_fallback(model, [batch], 1).scores
    params = [p for _, p in model.named_parameters()]
    logits = model(input_ids=batch["input_ids"]).logits
    loss = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100, reduction="sum")
    grads = torch.autograd.grad(loss, params)
    ref = {n: g.square() for (n, _), g in zip(model.named_parameters(), grads)}
    assert_scores_close(got, ref, 1e-10)


def test_labels_default_to_the_input_ids():
    model = tiny_lm("mistral")
    data = lm_batches(n_batches=1, prompt=0)
    without = [{k: v for k, v in b.items() if k != "labels"} for b in data]
    assert_scores_close(batched_without_fallback(model, without, 4).scores,
                        batched_without_fallback(model, data, 4).scores, 0)


# ------------------------------------------------------------------------------- true Fisher
def test_true_fisher_draws_do_not_depend_on_batching_and_equal_the_loop():
    model = tiny_lm("gpt2_tied")
    data = lm_batches(n_batches=2, batch=4)
    a = batched_without_fallback(model, data, 8, kind="true", lm_samples=3).scores
    regrouped = [{k: torch.cat([b[k] for b in data])[i:i + 3] for k in data[0]} for i in (0, 3, 6)]
    b = batched_without_fallback(model, regrouped, 8, kind="true", lm_samples=3).scores
    assert_scores_close(b, a, 1e-10)
    loop = estimate_fisher(model, data, 8, kind="true", lm_samples=3, implementation="loop", progress=False).scores
    assert_scores_close(loop, a, 1e-10)
    other_seed = batched_without_fallback(model, data, 8, kind="true", lm_samples=3, seed=1).scores
    assert any(not torch.allclose(other_seed[n], a[n]) for n in a)


def test_true_fisher_converges_to_the_exact_expectation():
    """One target token per sequence and a vocabulary of 7: the exact Σ_c p(c)·(∇ log p(c))² is
    computable (7 empirical estimates with label c), and 800 seeded draws land within 12% of it
    (3.6% measured; Monte Carlo error ≈ 1/√800). A wrong weighting of the draws (a sum, 1/S², or
    draws not from p) is off by far more."""
    import transformers as tr

    torch.manual_seed(0)
    cfg = tr.LlamaConfig(vocab_size=7, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = tr.AutoModelForCausalLM.from_config(cfg).double()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 1, 2]])
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]  # one target: position 3, predicted from positions 0..2
    batch = {"input_ids": ids, "labels": labels}
    sampled = batched_without_fallback(model, [batch], 2, kind="true", lm_samples=800).scores
    with torch.no_grad():
        p = F.softmax(model(input_ids=ids).logits[:, 2].double(), -1)  # (2, 7)
    exact = {n: torch.zeros_like(v) for n, v in sampled.items()}
    for i in range(2):
        for c in range(7):
            lab = torch.full((1, 4), -100)
            lab[0, 3] = c
            one = fisher_reference(model, [{"input_ids": ids[i:i + 1], "labels": lab}], 1, progress=False)
            for n in exact:
                exact[n] += p[i, c] * one[n]
    num = sum((sampled[n] - exact[n]).square().sum() for n in exact)
    den = sum(exact[n].square().sum() for n in exact)
    assert math.sqrt(num / den) < 0.12


# ------------------------------------------------------------------------------------ errors
def test_bad_causal_lm_inputs_are_clear_errors():
    model = tiny_lm("llama")
    (batch,) = lm_batches(n_batches=1)
    with pytest.raises(ValueError, match="token ids in"):
        estimate_fisher(model, [dict(batch, labels=batch["labels"].masked_fill(batch["labels"] > 0, VOCAB + 5))], 4,
                        progress=False)
    with pytest.raises(ValueError, match="labels \\(batch, tokens\\)"):
        estimate_fisher(model, [dict(batch, labels=batch["labels"][:, :5])], 4, progress=False)
    with pytest.raises(ValueError, match="custom loss_fn"):
        estimate_fisher(model, [batch], 4, causal_lm=True, loss_fn=lambda o, b: o.logits.sum((1, 2)), progress=False)
    with pytest.raises(ValueError, match="lm_samples"):
        estimate_fisher(model, [batch], 4, kind="true", lm_samples=0, progress=False)
    with pytest.raises(ValueError, match="causal_lm=True"):
        estimate_fisher(model, [batch], 4, causal_lm=False, progress=False)  # treated as a classifier


def test_a_custom_module_named_like_an_lm_can_opt_in():
    """causal_lm=True for a model of one's own: logits (B, T, V) and token labels."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.norm = nn.RMSNorm(8) if hasattr(nn, "RMSNorm") else nn.LayerNorm(8)
            self.head = nn.Linear(8, 11, bias=False)
            self.head.weight = self.emb.weight  # tied

        def forward(self, input_ids):
            h = self.emb(input_ids).cumsum(1)  # each position sees its prefix
            return self.head(self.norm(h))

    torch.manual_seed(0)
    model = Tiny().double()
    ids = torch.randint(0, 11, (5, 6))
    data = [({"input_ids": ids}, ids)]
    got = batched_without_fallback(model, data, 5, causal_lm=True)
    ref = estimate_fisher(model, data, 5, causal_lm=True, implementation="loop", progress=False)
    assert_scores_close(got.scores, ref.scores, 1e-10)


def test_no_head_is_forced_for_a_causal_lm_by_default():
    model = tiny_lm("llama")
    assert head_names(model) == []
    assert head_names(model, "lm_head") == ["lm_head.weight"]


@pytest.mark.parametrize("family", ["llama_tied", "gemma_tied", "gpt2_tied"])
def test_bf16_models_stay_batched(family):
    """bf16 parameters (fp32 scores): the self-check passes at bf16's tolerance, so the batched path
    runs, and agrees with the loop to bf16 rounding (about 1% measured)."""
    model = tiny_lm(family, dtype=torch.bfloat16)
    data = lm_batches()
    got = batched_without_fallback(model, data, 8)
    assert all(v.dtype == torch.float32 for v in got.scores.values())
    assert_scores_close(got.scores, fisher_reference(model, data, 8, progress=False), 5e-2)


# Config class -> extra arguments. What they add: q/k RMSNorms over heads (Qwen3, OLMo-2), Gemma 2/3's
# extra norms and soft-capping, Phi-3's fused qkv and gate-up projections, OLMo's parameter-free norm.
MORE_FAMILIES = {
    "Qwen3Config": dict(head_dim=16, tie_word_embeddings=True),
    "Gemma2Config": dict(head_dim=16),
    "Gemma3TextConfig": dict(head_dim=16),
    "Phi3Config": dict(pad_token_id=0),
    "OlmoConfig": {},
    "Olmo2Config": {},
}


@pytest.mark.parametrize("config_name", sorted(MORE_FAMILIES))
def test_more_decoder_families_are_exact_and_batched(config_name):
    import transformers as tr

    cls = getattr(tr, config_name, None)
    if cls is None:
        pytest.skip(f"transformers {tr.__version__} has no {config_name}")
    cfg = cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, **MORE_FAMILIES[config_name])
    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    data = lm_batches()
    got = batched_without_fallback(model, data, 8)
    assert_scores_close(got.scores, fisher_reference(model, data, 8, progress=False), 1e-10)


def test_an_unseeded_empirical_pass_leaves_the_callers_rng_alone():
    model = tiny_lm("llama")
    data = lm_batches(n_batches=1)
    torch.manual_seed(123)
    estimate_fisher(model, data, 4, seed=None, progress=False)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))
