"""What a user meets building masks, diffs and files (issue 17, items 4 and 10): degenerate densities,
typos in patterns, the boolean round trip, a live state dict as the diff's base, one head rule for
every builder, and file modes that follow the umask."""
import copy
import math
import os
import pickle
import stat

import pytest
import torch
from torch import nn

from fishkern import FishMask, MaskedAdamW, fisher_mask
from fishkern._native import native_available
from fishkern.diff import SparseCheckpointer, SparseDiff
from fishkern.diff._io import write_json
from fishkern.finetune import select_mask
from fishkern.mask.heads import head_names

needs_native = pytest.mark.skipif(not native_available(), reason="fishkern's native extension is not built")


class Classifier(nn.Module):
    """A body and a head named like a Hugging Face model's (``classifier`` or ``score``)."""

    def __init__(self, head="classifier", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        setattr(self, head, nn.Linear(8, 2))
        self.head_name = head

    def forward(self, x):
        return getattr(self, self.head_name)(torch.relu(self.norm(self.body(x))))


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 3)


def scores_of(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}


class Untouchable:
    """Data that records whether it was read (arguments must be checked before the Fisher pass)."""

    def __init__(self):
        self.read = False

    def __iter__(self):
        self.read = True
        return iter([(torch.randn(4, 8), torch.randint(0, 2, (4,)))])


# ------------------------------------------------------------------ densities that select nothing
@needs_native
def test_a_density_that_gives_k_zero_is_refused_by_every_builder():
    model = Classifier()
    total = sum(p.numel() for p in model.parameters())  # 108
    builders = {
        "from_scores": lambda d: FishMask.from_scores(scores_of(model), d),
        "random": lambda d: FishMask.random(model, d, seed=0, force=()),
    }
    for name, build in builders.items():
        for density in (0.0, 0.5 / total):
            with pytest.raises(ValueError, match="gives k = .* = 0 entries") as e:
                build(density)
            msg = str(e.value)
            assert repr(density) in msg and f"{total:,} parameters" in msg and f"1/{total:,}" in msg, (name, msg)
            suggested = float(msg.split("density=")[1].split(";")[0])
            assert build(suggested).k == 1, (name, suggested)  # the suggestion works
    data = Untouchable()
    with pytest.raises(ValueError, match="0 entries"):
        fisher_mask(model, data, 1e-4, num_samples=4, progress=False)
    assert not data.read, "the density was checked only after the Fisher pass"


@needs_native
def test_an_explicit_k_zero_is_still_an_empty_mask():
    model = Classifier()
    assert FishMask.from_scores(scores_of(model), k=0).k == 0
    assert FishMask.random(model, k=0, force=()).k == 0
    with pytest.raises(ValueError, match="more than the whole budget k = 0"):  # the head cannot fit in k = 0
        FishMask.random(model, k=0)


@pytest.mark.parametrize("total", [1, 3, 7, 49, 90, 98, 1234, 10**9 + 7, 2**53])
def test_the_suggested_density_selects_one_entry(total):
    from fishkern.mask.builders import smallest_density

    d = smallest_density(total)
    assert math.floor(d * total) == 1
    assert 1 / total <= d <= 1.01 / total  # 1/total rounded up to three significant digits


# ------------------------------------------------------------------ patterns that match nothing
@needs_native
def test_a_pattern_that_matches_nothing_is_an_error_with_suggestions():
    model = Classifier()
    cases = [
        lambda: FishMask.from_scores(scores_of(model), 0.5, force="classifer"),
        lambda: FishMask.random(model, 0.5, force="classifer"),
        lambda: FishMask.bitfit(model, head="classifer"),
        lambda: head_names(model, "classifer"),
        lambda: FishMask.random(model, 0.5, force=["classifier", "classifer.*"]),  # one typo among good ones
    ]
    for build in cases:
        with pytest.raises(ValueError, match=r"classifer.*matches no parameter.*did you mean 'classifier'"):
            build()
    with pytest.raises(ValueError, match=r"exclude='bdy' matches no parameter.*did you mean 'body'"):
        FishMask.from_scores(scores_of(model), 0.5, exclude="bdy")
    data = Untouchable()
    with pytest.raises(ValueError, match="force='classifer' matches no parameter"):
        fisher_mask(model, data, 0.5, num_samples=4, force="classifer", progress=False)
    assert not data.read
    with pytest.raises(ValueError, match="'nothing_like_it' matches no parameter.*the parameters are e.g."):
        FishMask.from_scores(scores_of(model), 0.5, force="nothing_like_it")
    # patterns that do match still work: globs, module prefixes, full names
    mask = FishMask.from_scores(scores_of(model), 0.5, force=["classifier", "norm.*"], exclude="body.bias")
    assert set(mask.forced) == {"classifier.weight", "classifier.bias", "norm.weight", "norm.bias"}
    assert "body.bias" not in mask.indices


# ------------------------------------------------------------------ boolean round trip
@needs_native
def test_the_boolean_round_trip_keeps_the_forced_set():
    model = Classifier()
    mask = FishMask.random(model, 0.5, seed=1, force="classifier")
    assert mask.forced == ("classifier.weight", "classifier.bias")
    back = FishMask.from_boolean(mask.to_boolean())
    assert back == mask and back.forced == mask.forced and back.digest == mask.digest
    for copied in (copy.deepcopy(mask.to_boolean()), pickle.loads(pickle.dumps(mask.to_boolean()))):
        assert FishMask.from_boolean(copied) == mask
    # a plain dict has no record: nothing is forced unless the caller says so
    plain = dict(mask.to_boolean())
    assert FishMask.from_boolean(plain).forced == ()
    assert FishMask.from_boolean(plain, forced=list(mask.forced)) == mask
    assert FishMask.from_boolean(mask.to_boolean(), forced=()).forced == ()  # explicit wins
    with pytest.raises(ValueError, match=r"forced names \['classifer.weight'\] are not among.*classifier.weight"):
        FishMask.from_boolean(plain, forced=["classifer.weight"])


# ------------------------------------------------------------------ a live state dict as the base
def test_from_models_refuses_a_base_that_is_the_live_model():
    model = Classifier()
    mask = FishMask.bitfit(model)
    live = model.state_dict()  # shares memory with the parameters
    snapshot = {n: t.detach().clone() for n, t in live.items()}
    opt = MaskedAdamW(model.named_parameters(), mask, lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match=r"shares memory with the tuned model's.*detach\(\)\.clone\(\)"):
        SparseDiff.from_models(live, model, mask)
    with pytest.raises(ValueError, match="shares memory"):
        SparseDiff.from_models(live, model)  # no mask: every tensor shared, nothing could differ
    diff = SparseDiff.from_models(snapshot, model, mask)  # a copy: fine, and it applies
    fresh = Classifier()
    diff.apply_(fresh)
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters()))
    # tensors the mask leaves frozen may be shared (they cannot change)
    tuned = dict(snapshot)
    for n in mask.indices:
        tuned[n] = snapshot[n] + 1
    assert SparseDiff.from_models(snapshot, tuned, mask).k == mask.k


# ------------------------------------------------------------------ one head rule for every builder
@needs_native
@pytest.mark.parametrize("head", ["classifier", "score"])
def test_every_builder_forces_the_head_in_by_default(head):
    model = Classifier(head)
    want = (f"{head}.weight", f"{head}.bias")
    random = FishMask.random(model, 0.3, seed=0)  # as the README writes it
    assert random.forced == want
    assert all(random.k_of(n) == p.numel() for n, p in model.named_parameters() if n in want)
    assert FishMask.random(model.named_parameters(), 0.3, seed=0) == random  # its parameters: the same rule
    bitfit = FishMask.bitfit(model)
    assert bitfit.forced == want and set(bitfit.indices) == {"body.bias", "norm.bias", *want}
    assert head_names(model) == list(want)
    for method in ("random", "bitfit"):  # finetune's default is the same rule
        mask, _ = select_mask(model, method, 0.3)
        assert mask.forced == want, method


@needs_native
def test_a_model_without_a_known_head_must_name_it_or_opt_out():
    model = ResNetLike()
    for build, arg in ((lambda: FishMask.random(model, 0.5), "force"), (lambda: FishMask.bitfit(model), "head"),
                       (lambda: head_names(model), "head")):
        with pytest.raises(ValueError, match=rf"matches the default head patterns.*{arg}='fc'.*{arg}=\(\)"):
            build()
    assert FishMask.random(model, 0.5, force="fc").forced == ("fc.weight", "fc.bias")
    assert FishMask.bitfit(model, head="fc").forced == ("fc.weight", "fc.bias")
    assert FishMask.random(model, 0.5, force=()).forced == ()
    assert FishMask.bitfit(model, head=()).forced == () and set(FishMask.bitfit(model, head=()).indices) == {
        "conv.bias", "fc.bias"}
    assert head_names(model, ()) == []
    # plain shapes are no model: nothing forced unless named (as before)
    assert FishMask.random({"w": (4, 4), "classifier.weight": (2, 4)}, k=3).forced == ()


# ------------------------------------------------------------------ file modes
def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask, want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, want):
    model = Classifier()
    mask = FishMask.from_boolean({n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()})
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    old = os.umask(umask)
    try:
        mask.save(tmp_path / "m.safetensors")
        mask.save(tmp_path / "m.safetensors", overwrite=True)
        with torch.no_grad():
            model.body.weight.add_(1)
        SparseDiff.from_models(base, model.state_dict(), mask).save(tmp_path / "d.safetensors")
        write_json(str(tmp_path / "x.json"), {"a": 1})
        ck = SparseCheckpointer(tmp_path / "ck", base, save_rng=False)
        ck.save(model, mask=mask, epoch=0)
        ck.close()
        files = [tmp_path / "m.safetensors", tmp_path / "d.safetensors", tmp_path / "x.json"]
        files += [p for p in (tmp_path / "ck").iterdir() if p.is_file() and not p.name.startswith(".")]
    finally:
        os.umask(old)
    assert len(files) >= 5, files  # the checkpoint wrote its manifest and files
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: oct(want) for p in files}


# ----------------------------------------------------------- one mask switch, finetune's loop
@needs_native
def test_every_caller_uses_the_one_mask_switch():
    """fisher_mask, finetune.select_mask and the cifar runner give make_mask's masks (same digest and
    forced head), for every method; bad methods and arguments are refused by name."""
    from fishkern.fisher.mask import MASK_METHODS, make_mask
    from fishkern.finetune import METHODS
    from fishkern.runners.cifar import CifarConfig
    from fishkern.runners.cifar import make_mask as cifar_mask

    assert METHODS == MASK_METHODS == ("dense", "fish", "random", "bitfit")
    model = Classifier()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 8, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(3)]
    head = head_names(model)
    assert make_mask(model, "dense", 0.3) == (None, None) and select_mask(model, "dense", 0.3) == (None, None)
    for method in ("fish", "random", "bitfit"):
        kw = {"data": data, "num_samples": 12, "progress": False} if method == "fish" else {}
        mask, result = make_mask(model, method, 0.3, force=head, seed=1, **kw)
        assert (result is not None) == (method == "fish") and mask.forced == tuple(head), method
        fdata = {"fisher_data": data, "num_samples": 12, "progress": False} if method == "fish" else {}
        assert select_mask(model, method, 0.3, seed=1, **fdata)[0] == mask, method
    fish, result = make_mask(model, "fish", 0.3, data=data, num_samples=12, force=head, progress=False)
    assert fisher_mask(model, data, 0.3, 12, force=head, progress=False) == fish
    assert fish.provenance["fisher_samples"] == result.num_samples == 12
    assert fish.provenance["fisher_kind"] == "empirical" and fish.provenance["method"] == "fish"
    assert fish == FishMask.from_scores({n: result.scores[n] for n, _ in model.named_parameters()}, 0.3, force=head)
    random = FishMask.random(model, 0.3, seed=5, force=head)
    assert make_mask(model, "random", 0.3, force=head, seed=5)[0] == random
    assert make_mask(model, "bitfit", force=head)[0] == FishMask.bitfit(model)
    # the cifar runner: its head ("fc", or none with force_head=False) through the same switch
    resnet = ResNetLike()
    for force_head, forced in ((True, ("fc.weight", "fc.bias")), (False, ())):
        cfg = CifarConfig(force_head=force_head)
        got = cifar_mask(cfg, resnet, "random", 0.5, None, 0, seed=2, provenance={"run": "r"})
        assert got == FishMask.random(resnet, 0.5, seed=2, force=list(forced)) and got.forced == forced
        assert got.provenance["run"] == "r"
    with pytest.raises(ValueError, match="method must be one of"):
        make_mask(model, "lora", 0.3)
    with pytest.raises(ValueError, match=r"needs data for the Fisher estimate \(data=\)"):
        make_mask(model, "fish", 0.3)
    with pytest.raises(ValueError, match=r"\(fisher_data\)"):
        select_mask(model, "fish", 0.3)
    with pytest.raises(ValueError, match="exclude= does not apply to BitFit"):
        make_mask(model, "bitfit", exclude="body")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        make_mask(lambda x: x, "random", 0.3)


class _Out:
    def __init__(self, loss):
        self.loss = loss


class _LossModel(nn.Module):
    """A Hugging Face-style model: called with the batch, returns ``.loss`` (mean cross entropy)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 3)

    def forward(self, x, labels):
        return _Out(nn.functional.cross_entropy(self.lin(x), labels))


class _Scaled(dict):
    loss_scale = 0.5  # a data-parallel rank's share of the global batch


def _epoch_reference(model, batches, opt, sched):
    """The loop as it was: the loss read (a sync) after every step, summed in Python floats."""
    total, n = 0.0, 0
    for batch in batches:
        scale = getattr(batch, "loss_scale", 1.0)
        out = model(**batch)
        (out.loss * scale if scale != 1.0 else out.loss).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        total += out.loss.item() * scale
        n += 1
    return total / n


def test_train_epoch_reads_the_loss_once_per_epoch_and_returns_the_same_mean(monkeypatch):
    from fishkern import finetune as ft
    from fishkern._progress import PlainProgress

    g = torch.Generator().manual_seed(1)
    batches = [(_Scaled if i % 3 == 2 else dict)(x=torch.randn(5, 6, generator=g, dtype=torch.float64),
                                                   labels=torch.randint(0, 3, (5,), generator=g)) for i in range(7)]

    def setup():
        model = _LossModel().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)

    ref_model, opt, sched = setup()
    want = [_epoch_reference(ref_model, batches, opt, sched) for _ in range(2)]

    reads = []
    real_item, real_float = torch.Tensor.item, torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append("item") or real_item(t))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append("float") or real_float(t))
    monkeypatch.setattr(ft, "LOG_EVERY_S", 1e9)  # the bar's loss: only at the epoch's end
    model, opt, sched = setup()
    lines = []
    bar = PlainProgress(14, desc="t", unit="step", stream=type("S", (), {"write": lines.append, "flush": lambda s: 0})())
    steps, opts = [], []
    got = []
    for _ in range(2):
        reads.clear()
        got.append(ft.train_epoch(model, batches, opt, sched, progress=bar, step_times=steps, opt_times=opts))
        assert reads == ["float"], reads  # one read of the summed loss, after the last step
    assert got == want  # bit for bit: float64 on the device sums what the Python floats summed
    assert torch.equal(model.lin.weight, ref_model.lin.weight)
    assert len(steps) == len(opts) == 14 and all(s >= o >= 0 for s, o in zip(steps, opts))
    bar.close()
    assert f"loss={want[1]:.4f}" in "".join(lines)
    reads.clear()
    assert ft.train_epoch(model, batches, opt, sched) == pytest.approx(want[1], rel=0.5)  # no bar, no times
    assert reads == ["float"]
