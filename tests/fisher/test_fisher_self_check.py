"""The Fisher estimator's first-batch self-check: two samples, one device sync to compare, and a
verdict remembered per model and structure for the process (never across model instances, never
when the check saw no padding to judge)."""
import warnings

import pytest
import torch
import torch.nn as nn

import fishkern.fisher.estimator as estimator
from fishkern.fisher import clear_self_check_cache, estimate_fisher, fisher_reference
from tests.fisher.test_fisher import SeqFirst, UnmaskedPadding, _pairs, assert_scores_close


class Flip(nn.Module):
    """Mixes samples across the batch when `mix` is set (a flag read in forward): the batched rules
    are then wrong, only running the check can tell two instances of this class apart."""

    def __init__(self, mix: bool):
        super().__init__()
        self.mix = mix
        self.l, self.out = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.l(x))
        if self.mix:
            h = h + h.flip(0)
        return self.out(h)


@pytest.fixture
def loop_calls(monkeypatch):
    """How many times the check's per-sample reference loop ran, and on how many samples."""
    calls = []
    real = estimator._loop_batch

    def counted(model, params, acc, b, kind, loss_fn, lm=None):
        calls.append(b.size)
        return real(model, params, acc, b, kind, loss_fn, lm)

    monkeypatch.setattr(estimator, "_loop_batch", counted)
    clear_self_check_cache()
    yield calls
    clear_self_check_cache()


def test_checks_two_samples_once_per_model(loop_calls):
    torch.manual_seed(0)
    model = Flip(False).double()
    data = _pairs((5,), 3)
    first = estimate_fisher(model, data, 8, progress=False)
    assert first.implementation == "torch" and loop_calls == [2]
    again = estimate_fisher(model, data, 8, progress=False)
    assert loop_calls == [2], "the same model and structure is checked once per process"
    assert_scores_close(again.scores, first.scores, 0)
    other = Flip(False).double()  # another instance: checked again
    estimate_fisher(other, data, 8, progress=False)
    assert loop_calls == [2, 2]
    clear_self_check_cache()
    estimate_fisher(model, data, 8, progress=False)
    assert loop_calls == [2, 2, 2]


def test_another_structure_of_the_same_model_is_checked_again(loop_calls):
    torch.manual_seed(0)
    model = Flip(False).double()
    estimate_fisher(model, _pairs((5,), 3), 8, progress=False)
    model.out.weight.requires_grad_(False)  # other trainable parameters
    estimate_fisher(model, _pairs((5,), 3), 8, progress=False)
    assert loop_calls == [2, 2]
    estimate_fisher(model, _pairs((5,), 3), 8, progress=False, kind="true")  # another Fisher kind
    assert loop_calls == [2, 2, 2]


def test_an_instance_that_mixes_samples_is_caught_after_a_clean_one_passed(loop_calls):
    torch.manual_seed(0)
    data = _pairs((5,), 3)
    assert estimate_fisher(Flip(False).double(), data, 8, progress=False).implementation == "torch"
    bad = Flip(True).double()
    with pytest.warns(UserWarning, match="per-sample loop"):
        got = estimate_fisher(bad, data, 8, progress=False)
    assert got.implementation == "loop" and loop_calls[:2] == [2, 2]
    assert_scores_close(got.scores, fisher_reference(bad, data, 8, progress=False), 1e-10)


def test_a_verdict_without_padding_is_not_remembered(loop_calls):
    """Unpadded first batch: the check cannot judge the padding skip, so the next estimate (with
    padding that matters) checks again and does not skip padded tokens."""
    torch.manual_seed(0)
    model = UnmaskedPadding().double()
    ids = torch.randint(1, 20, (6, 7))
    full = [{"input_ids": ids, "attention_mask": torch.ones(6, 7, dtype=torch.long), "labels": torch.randint(0, 2, (6,))}]
    estimate_fisher(model, full, 6, progress=False)
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[:4, 3:] = 0
    padded = [{"input_ids": ids, "attention_mask": mask, "labels": full[0]["labels"]}]
    got = estimate_fisher(model, padded, 6, progress=False)
    assert loop_calls == [2, 2]
    # that verdict (padding matters: do not skip it) saw padding, so it is kept
    again = estimate_fisher(model, padded, 6, progress=False)
    assert loop_calls == [2, 2]
    ref = fisher_reference(model, padded, 6, progress=False)
    assert_scores_close(got.scores, ref, 1e-10)
    assert_scores_close(again.scores, ref, 1e-10)


def test_the_check_still_catches_a_time_major_model(loop_calls):
    torch.manual_seed(0)
    model = SeqFirst().double()
    batches = _pairs((4, 4), 3, batch=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = estimate_fisher(model, batches, 8, progress=False)
    assert got.implementation == "loop"
    assert_scores_close(got.scores, fisher_reference(model, batches, 8, progress=False), 1e-10)


def test_disagreement_names_the_parameter_and_syncs_once(monkeypatch):
    ref = {"a": torch.ones(3), "b": torch.full((2,), 4.0), "c": torch.zeros(0)}
    params = [(n, nn.Parameter(torch.zeros_like(v))) for n, v in ref.items()]
    same = {k: v.clone() for k, v in ref.items()}
    assert estimator._disagreement(same, ref, params) is None
    assert torch.equal(ref["b"], torch.full((2,), 4.0))  # ref is read, got (the check's own acc) overwritten
    got = {"a": torch.ones(3), "b": torch.tensor([4.0, 4.4]), "c": torch.zeros(0)}
    syncs = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: syncs.append(1) or real_tolist(t))
    message = estimator._disagreement(got, ref, params)
    assert message.startswith("'b'") and "0.1" in message
    assert len(syncs) == 1


class TiedLM(nn.Module):
    """Embedding (padding_idx, repeated ids) whose weight is also the output layer's: the reference
    gets a sparse part (the rows of the ids) and a dense part (the logits) that autograd must sum."""

    def __init__(self, tied: bool):
        super().__init__()
        self.emb = nn.Embedding(11, 5, padding_idx=0)
        self.pos = nn.Embedding(7, 5)
        self.l = nn.Linear(5, 5)
        self.tied = tied

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.l(self.emb(input_ids) + self.pos(torch.arange(input_ids.shape[1])[None])))
        h = (h * attention_mask[..., None]).sum(1)
        return h @ self.emb.weight[:3].T if self.tied else h[:, :3]


@pytest.mark.parametrize("tied", [False, True])
def test_the_reference_with_sparse_embedding_gradients_equals_the_dense_loop(tied):
    torch.manual_seed(0)
    model = TiedLM(tied).double()
    ids = torch.tensor([[3, 3, 0, 5, 3, 0], [1, 2, 2, 2, 9, 10]])  # repeated ids and the padding id
    b = estimator.parse_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                               "labels": torch.tensor([1, 2])}, torch.device("cpu"), need_labels=True)
    params = [(n, p) for n, p in model.named_parameters()]
    like = {n: torch.zeros_like(p) for n, p in params}
    seen = []
    real_grad = torch.autograd.grad

    def recording(outputs, inputs, **kw):
        grads = real_grad(outputs, inputs, **kw)
        seen.extend(g.is_sparse for g, p in zip(grads, inputs) if p is model.emb.weight and g is not None)
        return grads

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.autograd, "grad", recording)
        sparse = estimator._reference_scores(model, params, like, b, "empirical", None)
    dense = {n: torch.zeros_like(p) for n, p in params}
    for _, p in params:
        p.requires_grad_(True)
    estimator._loop_batch(model, params, dense, b, "empirical", None)
    assert seen == [not tied, not tied]  # sparse per sample unless the weight is also used densely
    assert not model.emb.sparse and not model.pos.sparse  # switched back
    for n in dense:
        assert torch.allclose(sparse[n], dense[n], rtol=1e-12, atol=0), n
    if not tied:
        assert sparse["emb.weight"][0].abs().max() == 0  # padding_idx row: no gradient
    assert sparse["emb.weight"][3].abs().max() > 0 and sparse["emb.weight"][4].abs().max() == 0


def test_the_embedding_switch_is_undone_when_the_reference_raises():
    model = TiedLM(False)
    params = list(model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"):
        with estimator._sparse_embedding_grads(model, params):
            assert model.emb.sparse
            raise RuntimeError("boom")
    assert not model.emb.sparse and not model.pos.sparse


def test_scores_do_not_depend_on_whether_the_check_ran(loop_calls):
    # the check runs its samples into the real accumulators, then zeroes them: bit-identical results
    torch.manual_seed(0)
    model = TiedLM(False).double()
    ids = torch.randint(1, 11, (6, 7))
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[:4, 5:] = 0
    data = [{"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (6,))}] * 2
    checked = estimate_fisher(model, data, 12, progress=False)
    unchecked = estimate_fisher(model, data, 12, progress=False, self_check=False)
    assert loop_calls == [2] and checked.implementation == "torch"
    assert_scores_close(checked.scores, unchecked.scores, 0)
    assert_scores_close(checked.scores, fisher_reference(model, data, 12, progress=False), 1e-10)
