"""Sparse backward (fishkern.optim.sparse_backward): weight gradients computed at the masked entries
only. The k gradient values equal the dense weight gradient gathered at the mask (float64 within
1e-12 relative; float32 within the op's rounding bound, see test_ops_sampled_grad.py) for Linear
with 2-D / 3-D / padded inputs, Embedding with padding_idx and repeated ids, Conv1D, a tied
embedding + LM head, and HF BERT end to end with random and real FISH masks (k = 1 and k = all
included); whole runs equal the dense-gradient MaskedAdamW path and leave unmasked entries
bit-identical; accumulation, zero_grad, clipping, param groups, state_dict, bf16, no_grad, eval,
gradient checkpointing, autocast and GradScaler keep working; no dense weight gradient is formed;
what cannot work is refused with a clear error."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fishkern
from fishkern.optim import MaskedGrad
from fishkern.optim import sparse_backward as sb


def _mask_for(model, frac=0.1, seed=0, overrides=None):
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for name, p in model.named_parameters():
        n = p.numel()
        k = (overrides or {}).get(name, max(1, int(n * frac)))
        masks.append(torch.randperm(n, generator=gen)[:k])
    return masks


def _dense_grads(model, loss_fn):
    """Plain autograd's gradients (no fishkern anywhere)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.grad = None
    loss_fn(ref).backward()
    return [p.grad for p in ref.parameters()]


def _k_values(opt, model):
    """Each parameter's gradient as the optimizer holds it, as k values (MaskedGrad proxies)."""
    out = []
    for p in model.parameters():
        g = p.grad
        out.append(None if g is None else (g._k_values if isinstance(g, MaskedGrad) else g))
    return out


def _assert_grads_match(opt, model, dense, rel=1e-12):
    lay = opt._layouts[0]
    for i, (p, gd) in enumerate(zip(model.parameters(), dense)):
        idx = lay.indices[i].long()
        if idx.numel() == 0:
            assert p.grad is None
            continue
        got = p.grad
        assert isinstance(got, MaskedGrad), f"parameter {i}: {type(got)}"
        want = gd.reshape(-1).index_select(0, idx).to(got._k_values.dtype)
        scale = float(gd.abs().max()) or 1.0
        torch.testing.assert_close(got._k_values, want, rtol=rel, atol=rel * scale)


class Tagger(nn.Module):
    def __init__(self, vocab=40, dim=12, hidden=20, out=5, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out, bias=False)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.fc1(self.emb(ids))))


def _ids(seed=0, b=3, t=7, vocab=40):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=gen)
    ids[0, -3:] = 0  # padding
    ids[1, :3] = ids[1, 3]  # repeated ids
    return ids


def _tagger_loss(ids, weights=None):
    def f(m):
        out = m(ids)
        w = weights if weights is not None else torch.ones(ids.shape, dtype=out.dtype)
        return (out.pow(2).sum(-1) * w).sum()
    return f


@pytest.mark.parametrize("dense_above", [1.0, 0.0])  # the sampled kernel; dense-then-gather
def test_gradients_equal_dense_gathered_float64(dense_above):
    torch.manual_seed(0)
    model = Tagger().double()
    masks = _mask_for(model, 0.2, overrides={"fc2.weight": 1, "fc1.bias": 20})  # k = 1, and k = all of a bias
    masks[1] = torch.arange(model.fc1.weight.numel())  # k = all of a weight
    opt = fishkern.MaskedAdamW(model.parameters(), masks, lr=1e-2)
    handle = opt.enable_sparse_backward(model, dense_above=dense_above)
    assert {r["name"] for r in handle.layers()} == {"emb", "fc1", "fc2"}
    ids = _ids()
    pad = (ids != 0).double()  # a padded batch: padded tokens weigh 0
    loss = _tagger_loss(ids, pad)
    dense = _dense_grads(model, loss)
    loss(model).backward()
    _assert_grads_match(opt, model, dense)


def test_linear_2d_and_1d_inputs_and_no_input_grad():
    torch.manual_seed(1)
    lin = nn.Linear(9, 4).double()
    opt = fishkern.MaskedSGD(lin, _mask_for(lin, 0.3), lr=0.1, sparse_backward=True)
    for x in (torch.randn(6, 9, dtype=torch.float64), torch.randn(9, dtype=torch.float64),
              torch.randn(2, 3, 5, 9, dtype=torch.float64, requires_grad=True)):
        dense = _dense_grads(lin, lambda m: m(x).sin().sum())
        gx = None
        if x.requires_grad:
            gx = torch.autograd.grad(copy.deepcopy(lin)(x).sin().sum(), x)[0]
        out = lin(x).sin().sum()
        if x.requires_grad:
            got_gx = torch.autograd.grad(out, x, retain_graph=True)[0]
            torch.testing.assert_close(got_gx, gx, rtol=1e-12, atol=0)
        out.backward()
        _assert_grads_match(opt, lin, dense)
        opt.zero_grad()


def test_no_dense_weight_gradient_is_formed():
    """Every tensor created during backward is recorded: none has a weight's (distinctive) shape."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(97, 13), nn.Linear(13, 29), nn.ReLU(), nn.Linear(29, 11))
    opt = fishkern.MaskedAdamW(model, _mask_for(model, 0.01), lr=1e-3)  # below the dense-then-gather density
    assert [r["path"] for r in opt.sparse_backward.layers()] == ["sampled"] * 3
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}

    class Shapes(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (list, tuple)) else [out]:
                if type(o) is torch.Tensor:  # a MaskedGrad has the weight shape, k values only
                    self.seen.add(tuple(o.shape))
            return out

    loss = model(torch.randint(0, 97, (4, 6))).square().mean()
    with Shapes() as mode:
        loss.backward()
    assert not (mode.seen & weight_shapes), mode.seen & weight_shapes
    assert all(isinstance(p.grad, MaskedGrad) for p in model.parameters() if p.dim() == 2)


def _train(model, masks, steps, sparse, seed=0, accumulate=2, clip=0.5, dense_above=None):
    opt = fishkern.MaskedAdamW(model.parameters(), masks, lr=3e-2, weight_decay=0.1)
    if sparse:
        opt.enable_sparse_backward(model, dense_above=dense_above)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for _ in range(accumulate):
            ids = torch.randint(0, 40, (3, 7), generator=gen)
            model(ids).pow(2).mean().backward()
        opt.clip_grad_norm_(clip)
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("dense_above", [1.0, 0.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_runs_equal_dense_gradient_path(dtype, dense_above):
    torch.manual_seed(3)
    base = Tagger().to(dtype)
    masks = _mask_for(base, 0.1, seed=4)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a = _train(a, masks, 6, sparse=True, dense_above=dense_above)
    assert opt_a.sparse_backward.layers()
    _train(b, masks, 6, sparse=False)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for (name, pa), pb, p0, m in zip(a.named_parameters(), b.parameters(), base.parameters(), masks):
        torch.testing.assert_close(pa, pb, **tol, msg=name)
        keep = torch.ones(p0.numel(), dtype=torch.bool)
        keep[m] = False
        assert torch.equal(pa.detach().reshape(-1)[keep], p0.detach().reshape(-1)[keep]), name  # bit-identical


def test_param_groups_state_dict_and_resume():
    torch.manual_seed(5)
    base = Tagger().double()
    masks = _mask_for(base, 0.2)
    names = [n for n, _ in base.named_parameters()]

    def groups(m):
        ps = dict(m.named_parameters())
        return [{"params": [ps[n] for n in names[:2]], "mask_indices": masks[:2], "lr": 1e-2},
                {"params": [ps[n] for n in names[2:]], "mask_indices": masks[2:], "lr": 5e-2}]

    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a = fishkern.MaskedAdamW(groups(a), None)
    opt_a.enable_sparse_backward(a)
    opt_b = fishkern.MaskedAdamW(groups(b), None)
    ids = _ids()
    for m, o in ((a, opt_a), (b, opt_b)):
        for _ in range(3):
            m(ids).pow(2).sum().backward()
            o.step()
            o.zero_grad()
    sd = opt_a.state_dict()
    c = copy.deepcopy(a)
    opt_c = fishkern.MaskedAdamW(groups(c), None)
    opt_c.enable_sparse_backward(c)
    opt_c.load_state_dict(sd)
    for m, o in ((a, opt_a), (b, opt_b), (c, opt_c)):
        m(ids).pow(2).sum().backward()
        o.step()
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)
        assert torch.equal(pa, pc)


def test_bf16_parameters_accumulate_in_fp32():
    torch.manual_seed(6)
    model = Tagger().to(torch.bfloat16)
    masks = _mask_for(model, 0.2)
    opt = fishkern.MaskedAdamW(model, masks, lr=1e-2, master_weights=True)
    ids = _ids()
    ref = copy.deepcopy(model).double()
    ref(ids).pow(2).sum().backward()
    model(ids).float().pow(2).sum().backward()
    lay = opt._layouts[0]
    for i, (p, pr) in enumerate(zip(model.parameters(), ref.parameters())):
        g = p.grad
        if p.dim() != 2:
            continue
        assert isinstance(g, MaskedGrad) and g._k_values.dtype == torch.float32 and g.dtype == torch.bfloat16
        want = pr.grad.reshape(-1).index_select(0, lay.indices[i].long())
        # bf16 activations differ from the float64 model's by bf16 rounding; the sums are fp32
        torch.testing.assert_close(g._k_values.double(), want, rtol=0.05, atol=0.05 * float(want.abs().max()))
    opt.step()


def test_no_grad_eval_and_plain_forward_agree():
    torch.manual_seed(7)
    model = Tagger()
    ref = copy.deepcopy(model)
    opt = fishkern.MaskedAdamW(model, _mask_for(model), lr=1e-3)
    assert len(opt.sparse_backward.layers()) == 3
    ids = _ids()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    model.train()
    assert torch.equal(model(ids), ref(ids))
    # a deep copy of a patched model is a plain model (it has no optimizer) and can take its own
    twin = copy.deepcopy(model)
    assert sb.patched_layers(twin) == []
    opt2 = fishkern.MaskedAdamW(twin, _mask_for(twin), lr=1e-3)
    assert len(opt2.sparse_backward.layers()) == 3 and len(opt.sparse_backward.layers()) == 3


def test_disable_and_dropping_the_optimizer_restore_the_layers():
    model = Tagger()
    opt = fishkern.MaskedAdamW(model, _mask_for(model), lr=1e-3)
    assert set(sb.patched_layers(model)) == {"emb", "fc1", "fc2"}
    opt.disable_sparse_backward()
    assert sb.patched_layers(model) == [] and "forward" not in model.fc1.__dict__
    opt.enable_sparse_backward(model)
    assert len(sb.patched_layers(model)) == 3
    del opt
    import gc

    gc.collect()
    assert sb.patched_layers(model) == []


def test_a_second_optimizer_over_the_same_layers_is_refused():
    model = Tagger()
    masks = _mask_for(model)
    opt = fishkern.MaskedAdamW(model, masks, lr=1e-3)
    with pytest.raises(RuntimeError, match="already computes its weight gradient sparsely for another optimizer"):
        fishkern.MaskedSGD(model, masks, lr=1e-3, sparse_backward=True)
    with pytest.raises(RuntimeError, match="already computes"):
        fishkern.MaskedSGD(model, masks, lr=1e-3)  # "auto" too: never a silent half-patched model
    with pytest.raises(RuntimeError, match="already on"):
        opt.enable_sparse_backward(model)
    assert opt.sparse_backward.active


def test_sparse_backward_true_needs_the_model():
    model = Tagger()
    with pytest.raises(ValueError, match="needs the model"):
        fishkern.MaskedAdamW(model.parameters(), _mask_for(model), sparse_backward=True)
    with pytest.raises(ValueError, match="sparse_backward must be"):
        fishkern.MaskedAdamW(model, _mask_for(model), sparse_backward="yes")
    with pytest.raises(ValueError, match="dense_above"):
        fishkern.MaskedAdamW(model.parameters(), _mask_for(model)).enable_sparse_backward(model, dense_above=2)
    opt = fishkern.MaskedAdamW(model, _mask_for(model), sparse_backward=False)
    assert opt.sparse_backward is None and sb.patched_layers(model) == []


def test_frozen_weights_get_no_gradient_and_subclasses_keep_their_forward():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(4, 5), MyLinear(5, 3), nn.Linear(3, 2))
    masks = _mask_for(model, 0.3)
    masks[0] = torch.tensor([], dtype=torch.long)  # layer 0's weight frozen
    opt = fishkern.MaskedAdamW(model, masks, lr=1e-3)
    assert [r["name"] for r in opt.sparse_backward.layers()] == ["2"]
    model(torch.randn(3, 4)).sum().backward()
    assert model[0].weight.grad is None and not model[0].weight.requires_grad
    assert isinstance(model[1].weight.grad, MaskedGrad)  # torch's dense gradient, gathered by the hook
    assert isinstance(model[2].weight.grad, MaskedGrad)
    opt.step()


def test_autocast_cpu_bf16_matches_dense_autocast():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    masks = _mask_for(model, 0.25)
    ref = copy.deepcopy(model)
    opt = fishkern.MaskedAdamW(model, masks, lr=1e-3)
    x = torch.randn(10, 16, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = model(x), ref(xr)
    assert out.dtype == out_ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    out.float().square().sum().backward()
    out_ref.float().square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-2, atol=1e-2)
    lay = opt._layouts[0]
    for i, (p, pr) in enumerate(zip(model.parameters(), ref.parameters())):
        want = pr.grad.reshape(-1).index_select(0, lay.indices[i].long())
        # dense autocast rounds the weight gradient to bf16; ours keeps the fp32 sums
        torch.testing.assert_close(p.grad._k_values, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_grad_scaler_unscales_the_masked_entries():
    torch.manual_seed(9)
    model = Tagger()
    masks = _mask_for(model)
    ref = copy.deepcopy(model)
    opt = fishkern.MaskedAdamW(model, masks, lr=1e-2)
    opt_ref = fishkern.MaskedAdamW(ref.parameters(), masks, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ids = _ids()
    scaler.scale(model(ids).pow(2).sum()).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    ref(ids).pow(2).sum().backward()
    opt_ref.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_ddp_models_are_refused_or_left_dense(monkeypatch):
    model = Tagger()
    monkeypatch.setattr(sb, "_is_ddp", lambda m: m is model)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        fishkern.MaskedAdamW(model, _mask_for(model), sparse_backward=True)
    opt = fishkern.MaskedAdamW(model, _mask_for(model))  # auto: dense
    assert opt.sparse_backward.layers() == [] and sb.patched_layers(model) == []


def test_double_backward_is_refused():
    lin = nn.Linear(3, 2).double()
    opt = fishkern.MaskedAdamW(lin, _mask_for(lin, 0.5))  # kept: dropping the optimizer unpatches
    assert opt.sparse_backward.layers()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(lin(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="(?i)once_differentiable|double backward|does not require grad"):
        gx.sum().backward()


# ---------------------------------------------------------------- Hugging Face models

transformers = pytest.importorskip("transformers")


def _tiny_bert(seed=0):
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).double()


def _bert_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (4, 9), generator=gen)
    att = torch.ones_like(ids)
    att[0, 6:] = 0
    att[2, 4:] = 0
    ids[att == 0] = 0
    return dict(input_ids=ids, attention_mask=att, labels=torch.randint(0, 3, (4,), generator=gen))


@pytest.mark.parametrize("dense_above", [1.0, None])  # sampled everywhere; the default per-layer choice
def test_bert_end_to_end_random_and_fish_masks(dense_above):
    model = _tiny_bert()
    batch = _bert_batch()
    # a real FISH mask (head forced in), and a random one with k = 1 and k = all tensors
    fish = fishkern.integrations.fish_mask_for(model, [batch], density=0.05, num_samples=4)
    for mask in (fish, None):
        m = copy.deepcopy(model)
        if mask is None:
            over = {"bert.encoder.layer.0.attention.self.query.weight": 1,
                    "bert.encoder.layer.1.output.dense.weight": 16 * 24}
            opt = fishkern.MaskedAdamW(m.named_parameters(), _mask_for(m, 0.05, overrides=over), lr=1e-3)
        else:
            opt = fishkern.MaskedAdamW(m.named_parameters(), mask, lr=1e-3)
        opt.enable_sparse_backward(m, dense_above=dense_above)
        kinds = {r["kind"] for r in opt.sparse_backward.layers()}
        assert kinds == {"linear", "embedding"}
        dense = _dense_grads(m, lambda x: x(**batch).loss)
        m(**batch).loss.backward()
        _assert_grads_match(opt, m, dense, rel=1e-11)


def test_bert_gradient_checkpointing():
    model = _tiny_bert(1)
    model.gradient_checkpointing_enable()
    model.train()
    batch = _bert_batch(1)
    masks = _mask_for(model, 0.1)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = fishkern.MaskedAdamW(a, masks, lr=1e-2)
    opt_b = fishkern.MaskedAdamW(b.parameters(), masks, lr=1e-2)
    for m, o in ((a, opt_a), (b, opt_b)):
        for _ in range(2):
            m(**batch).loss.backward()
            o.step()
            o.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-11, atol=1e-12)


def test_gpt2_conv1d_and_tied_head():
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=12, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(10)
    model = transformers.GPT2LMHeadModel(cfg).double()
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = fishkern.MaskedAdamW(model.named_parameters(), _mask_for(model, 0.1), lr=1e-3)
    opt.enable_sparse_backward(model, dense_above=1.0)
    assert {r["path"] for r in opt.sparse_backward.layers()} == {"sampled"}
    kinds = {r["name"]: r["kind"] for r in opt.sparse_backward.layers()}
    assert kinds["transformer.h.0.attn.c_attn"] == "conv1d" and kinds["lm_head"] == "linear"
    assert kinds["transformer.wte"] == "embedding"
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    dense = _dense_grads(model, lambda m: m(input_ids=ids, labels=ids).loss)
    model(input_ids=ids, labels=ids).loss.backward()
    _assert_grads_match(opt, model, dense)


def test_a_gradient_for_another_mask_is_refused_not_misread():
    """Layers patched for optimizer A feed their k values; an optimizer B over another mask of the
    same parameters cannot use them (its entries were never computed): a clear error at its step."""
    model = Tagger()
    opt_a = fishkern.MaskedAdamW(model, _mask_for(model, seed=1), lr=1e-3)
    opt_b = fishkern.MaskedAdamW(model.parameters(), _mask_for(model, seed=2), lr=1e-3)
    assert opt_a.sparse_backward.active
    model(_ids()).sum().backward()
    with pytest.raises(RuntimeError, match="another optimizer's mask"):
        opt_b.step()


def test_the_finetune_loop_switch():
    from fishkern.finetune import FinetuneConfig, build_optimizer
    from fishkern.mask.fishmask import FishMask

    model = Tagger()
    mask = FishMask.random(dict(model.named_parameters()), 0.1, seed=0, force=())
    on = build_optimizer(model, mask, FinetuneConfig())
    assert len(on.sparse_backward.layers()) == 3
    on.disable_sparse_backward()
    off = build_optimizer(model, mask, FinetuneConfig(sparse_backward=False))
    assert off.sparse_backward is None and sb.patched_layers(model) == []
