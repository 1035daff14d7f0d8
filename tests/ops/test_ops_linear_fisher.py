"""fishkern::linear_fisher_acc_: the op (schema, fake, default PyTorch kernel, Triton kernel for CUDA)
checked with torch.library.opcheck; its default kernel and its Triton kernel (CUDA, or the
interpreter on CPU) against the float64 reference on odd shapes; the split path's fixed-order
reduction (bit-identical runs); argument errors from the op's own checks; and the estimator's
implementation= option routing to the kernel it documents."""
import pytest
import torch
from torch.library import opcheck

from fishkern.fisher import estimate_fisher
from fishkern.ops import library
from fishkern.ops import linear_fisher as lf
from fishkern.ops.linear_fisher import linear_fisher_acc_, linear_fisher_default_, linear_fisher_reference
from fishkern.ops.triton_support import triton_usable_on
from tests.conftest import HAS_CUDA, HAS_TRITON, requires_triton, triton_devices

OP = torch.ops.fishkern.linear_fisher_acc_.default
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available"))]


def _inputs(b, t, out_f, in_f, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, in_f, generator=gen).to(dtype).to(device)
    g = torch.randn(b, t, out_f, generator=gen).to(dtype).to(device)
    return x, g


def _lengths(b, t, device="cpu", dtype=torch.int64):
    # 0, the full length and values in between, cycled over the batch
    return torch.tensor([[0, t, max(t // 2, 1), t - 1 if t > 1 else 0][i % 4] for i in range(b)],
                        dtype=dtype, device=device)


def _check(acc, expected, dtype=torch.float32):
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-4)
    atol = rtol * float(expected.abs().mean()) if expected.numel() else 0.0
    torch.testing.assert_close(acc.double().cpu(), expected.cpu(), rtol=rtol, atol=atol)


def _samples(device):
    """(args, kwargs) for opcheck: dtypes, lengths or none, odd shapes, non-contiguous x / g."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x, g = _inputs(3, 13, 37, 29, dtype=dtype, device=device)
        acc_dt = torch.float64 if dtype == torch.float64 else torch.float32
        acc = torch.rand(37, 29, dtype=acc_dt, device=device)
        out.append(((acc, x, g), {}))
        out.append(((acc.clone(), x, g, _lengths(3, 13, device)), {}))
    x, g = _inputs(5, 7, 9, 100, device=device, seed=1)  # odd rows, short T (token-pair form on CPU)
    out.append(((torch.zeros(9, 100, device=device), x, g, _lengths(5, 7, device, torch.int32)), {"chunk_elems": 50}))
    # non-contiguous: x stored (T, B, IN), g's feature dim strided, every other sample / token
    xt = torch.randn(11, 4, 21, device=device).transpose(0, 1)
    gt = torch.randn(4, 17, 11, device=device).transpose(1, 2)
    out.append(((torch.zeros(17, 21, device=device), xt, gt, _lengths(4, 11, device, torch.uint8)), {}))
    xs, gs = (torch.randn(8, 22, n, device=device)[::2, ::2] for n in (21, 17))
    out.append(((torch.zeros(17, 21, device=device), xs, gs), {"check_lengths": False}))
    out.append(((torch.zeros(1, 1, device=device), *_inputs(2, 3, 1, 1, device=device)), {}))  # 1 x 1 layer
    out.append(((torch.zeros(4, 3, device=device), *_inputs(0, 3, 4, 3, device=device)), {}))  # B = 0
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args, kwargs in _samples(device):
        opcheck(OP, args, kwargs)


def test_op_is_declared_once_with_a_cuda_kernel():
    assert "linear_fisher_acc_" in library.defined_ops()
    assert library.has_kernel("linear_fisher_acc_", "CUDA")
    assert lf.OP is OP
    schema = str(OP._schema)
    assert "Tensor(a!) acc" in schema and "Tensor? lengths=None" in schema and schema.endswith("-> ()")


# ------------------------------------------------------------------------------ default kernel
SHAPES = [(3, 13, 37, 29), (1, 13, 37, 29), (4, 1, 37, 29), (2, 40, 70, 67), (2, 5, 1, 1), (6, 9, 3, 130)]


@pytest.fixture(params=["pairs", "per_sample", "chunks", "fused"])
def form(request, monkeypatch):
    """Every exact form (and both paths of the per-sample form) of the default kernel; "fused" runs
    through the dispatcher's CPU kernel (natively; the default kernel called directly runs the
    per-sample form for it)."""
    monkeypatch.setattr(lf, "choose_form", lambda *args, **kwargs: request.param)
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_default_kernel_matches_reference(device, shape, with_lengths, form):
    b, t, out_f, in_f = shape
    lengths = _lengths(b, t, device) if with_lengths else None
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x, g = _inputs(*shape, dtype=dtype, device=device)
        acc_dt = torch.float64 if dtype == torch.float64 else torch.float32
        acc0 = torch.rand(out_f, in_f, dtype=acc_dt, device=device)
        for chunk in (1, 64, lf.DEFAULT_CHUNK_ELEMS):  # one sample at a time, a few, all
            acc = acc0.clone()
            linear_fisher_default_(acc, x, g, lengths, chunk_elems=chunk)
            _check(acc, acc0.double() + linear_fisher_reference(x, g, lengths), dtype)
        acc = acc0.clone()
        assert linear_fisher_acc_(acc, x, g, lengths) is acc  # through the dispatcher
        _check(acc, acc0.double() + linear_fisher_reference(x, g, lengths), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_default_kernel_does_not_read_padding(device, form):
    b, t, out_f, in_f = 3, 11, 37, 29
    x, g = _inputs(b, t, out_f, in_f, device=device, seed=2)
    lengths = torch.tensor([11, 0, 4], device=device)
    xp, gp = x.clone(), g.clone()
    for i, n in enumerate(lengths.tolist()):
        xp[i, n:], gp[i, n:] = float("nan"), float("inf")
    acc = torch.zeros(out_f, in_f, device=device)
    linear_fisher_acc_(acc, xp, gp, lengths)
    assert torch.isfinite(acc).all()
    _check(acc, linear_fisher_reference(x, g, lengths))


# ------------------------------------------------------------------------------ Triton kernel
TRITON_SHAPES = [(3, 13, 37, 29), (2, 5, 1, 1), (2, 40, 70, 67), (3, 17, 16, 64), (2, 3, 20, 40), (3, 9, 61, 13)]


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.triton
@requires_triton
def test_triton_kernel_matches_reference(device, shape):
    from fishkern.ops.linear_fisher import linear_fisher_triton_

    b, t, out_f, in_f = shape
    for lengths in (None, _lengths(b, t, device, torch.int32)):
        x, g = _inputs(*shape, device=device, seed=3)
        acc = torch.zeros(out_f, in_f, device=device)
        linear_fisher_triton_(acc, x, g, lengths)
        _check(acc, linear_fisher_reference(x, g, lengths))


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.triton
@requires_triton
def test_split_reduction_is_fixed_order_and_deterministic(device):
    """Forced sample splits: each run is bit-identical to the last, and equal, bit for bit, to
    acc + (the splits' partial sums, each made by a one-split launch, summed over dim 0) — the
    fixed-order reduction, with no atomics — and close to the float64 reference."""
    from fishkern.ops import linear_fisher_triton as lft

    b, t, out_f, in_f = 7, 19, 37, 29
    x, g = _inputs(b, t, out_f, in_f, device=device, seed=4)
    lengths = torch.tensor([19, 0, 3, 16, 17, 1, 19], device=device)
    acc0 = torch.rand(out_f, in_f, generator=torch.Generator().manual_seed(5)).to(device)
    expected = acc0.double() + linear_fisher_reference(x, g, lengths)
    for splits in (1, 2, 3, 7):
        runs = []
        for _ in range(3):
            acc = acc0.clone()
            lft._launch(acc, x, g, lengths, splits=splits, block_o=16, block_i=16, block_t=16)
            runs.append(acc)
        assert all(torch.equal(r, runs[0]) for r in runs), splits
        _check(runs[0], expected)
        if splits > 1:
            parts = []
            for s in range(splits):
                lo, hi = s * b // splits, (s + 1) * b // splits
                part = torch.zeros(out_f, in_f, device=device)
                lft._launch(part, x[lo:hi], g[lo:hi], lengths[lo:hi], splits=1, block_o=16, block_i=16, block_t=16)
                parts.append(part)
            assert torch.equal(runs[0], acc0 + torch.stack(parts).sum(0)), splits


# ------------------------------------------------------------------------------ errors
def test_bad_inputs_get_the_ops_errors():
    x, g = _inputs(2, 5, 3, 4)
    acc = torch.zeros(3, 4)
    bad = [
        ((acc, x[0], g), {}, "x must be a 3-D"),
        ((acc, x, g[0]), {}, "g must be a 3-D"),
        ((acc, x, g[:1]), {}, "must agree on"),
        ((acc, x, g[:, :4]), {}, "must agree on"),
        ((acc, x, g.bfloat16()), {}, "share one dtype"),
        ((acc, x.int(), g.int()), {}, "share one dtype"),
        ((acc, x.double(), g.double()), {}, "acc must be float32 .float64 for float64 x and g"),
        ((torch.zeros(4, 3), x, g), {}, r"acc must have shape \(OUT, IN\) = \(3, 4\)"),
        ((torch.zeros(12), x, g), {}, "acc must have shape"),
        ((torch.zeros(3, 4, dtype=torch.float64), x, g), {}, "acc must be float32"),
        ((torch.zeros(4, 3).t(), x, g), {}, "acc must be contiguous"),
        ((torch.zeros(3, 4, device="meta"), x, g), {}, "one device"),
        ((acc, x, g, torch.tensor([5])), {}, "lengths must have shape"),
        ((acc, x, g, torch.tensor([[5, 5]])), {}, "lengths must have shape"),
        ((acc, x, g, torch.tensor([5.0, 5.0])), {}, "integer tensor"),
        ((acc, x, g, torch.tensor([True, True])), {}, "integer tensor"),
        ((acc, x, g, torch.tensor([-1, 5])), {}, r"lengths must lie in \[0, T\] = \[0, 5\], got values in \[-1, 5\]"),
        ((acc, x, g, torch.tensor([0, 6])), {}, r"\[0, T\] = \[0, 5\]"),
        ((acc, x, g), {"chunk_elems": 0}, "chunk_elems must be >= 1"),
    ]
    for args, kwargs, msg in bad:
        for call in (OP, linear_fisher_acc_, linear_fisher_default_):
            with pytest.raises(ValueError, match="^fishkern::linear_fisher_acc_: .*" + msg):
                call(*args, **kwargs)
    assert torch.equal(acc, torch.zeros(3, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_lengths_out_of_range_are_clamped(device, form):
    """check_lengths=False (lengths known valid upstream): a bad value never reads outside the
    sample; it counts as 0 or T tokens, in every kernel."""
    b, t, out_f, in_f = 3, 6, 5, 7
    x, g = _inputs(b, t, out_f, in_f, device=device, seed=6)
    bad = torch.tensor([-4, 9, 3], device=device)
    expected = linear_fisher_reference(x, g, bad.clamp(0, t))
    acc = torch.zeros(out_f, in_f, device=device)
    linear_fisher_acc_(acc, x, g, bad, check_lengths=False)
    _check(acc, expected)
    if HAS_TRITON and (device == "cuda" or not HAS_CUDA):
        from fishkern.ops.linear_fisher import linear_fisher_triton_

        acc = torch.zeros(out_f, in_f, device=device)
        linear_fisher_triton_(acc, x, g, bad, check_lengths=False)
        _check(acc, expected)
        with pytest.raises(ValueError, match=r"\[0, T\]"):
            linear_fisher_triton_(acc, x, g, bad)


# ------------------------------------------------------------------------------ estimator routing
class _SeqModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 16)
        self.lin = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.lin(self.emb(input_ids)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def _batches():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 20, (6, 12), generator=gen)
    mask = (torch.arange(12)[None] < torch.tensor([12, 3, 7, 1, 12, 9])[:, None]).long()
    labels = torch.randint(0, 3, (6,), generator=gen)
    return [{"input_ids": ids[s:s + 3] * mask[s:s + 3], "attention_mask": mask[s:s + 3], "labels": labels[s:s + 3]}
            for s in (0, 3)]


def _spy(monkeypatch, module, name, log, tag):
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        log.append((tag, kwargs.get("check_lengths")))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("implementation", ["auto", "torch", "triton"])
def test_estimator_implementation_picks_the_documented_kernel(monkeypatch, implementation):
    """auto: the op (the dispatcher picks by device); torch: the default kernel called directly;
    triton: the Triton launcher called directly (the interpreter on CPU). The estimator's lengths
    are valid by construction, so no call checks them (no device sync per Linear call). "auto" and
    "torch" run a CPU model; "triton" a model where Triton runs (CUDA on a GPU machine, where CPU
    tensors have no interpreter and "triton" on them is refused)."""
    device = triton_devices()[0] if implementation == "triton" else "cpu"
    if implementation == "triton" and not (HAS_TRITON and triton_usable_on(torch.device(device))):
        pytest.skip(f"triton is not usable on {device} here")
    log = []
    _spy(monkeypatch, lf, "linear_fisher_acc_", log, "op")
    _spy(monkeypatch, lf, "linear_fisher_default_", log, "default")
    _spy(monkeypatch, lf, "linear_fisher_triton_", log, "triton")
    torch.manual_seed(0)
    model = _SeqModel().to(device)
    data = [{k: v.to(device) for k, v in b.items()} for b in _batches()]
    res = estimate_fisher(model, data, 6, implementation=implementation, progress=False)
    ref = estimate_fisher(model, data, 6, implementation="loop", progress=False)
    for name in ref.scores:
        _check(res.scores[name], ref.scores[name].double())
    tags = {tag for tag, _ in log}
    want = {"auto": "op", "torch": "default", "triton": "triton"}[implementation]
    assert want in tags
    if implementation == "torch":
        assert tags == {"default"}
    if implementation == "triton":
        assert "op" not in tags and "default" not in tags
    assert all(check is False for _, check in log)
    assert res.implementation == ("torch" if implementation == "auto" else implementation)  # auto: a CPU model


def test_cuda_kernel_routes_by_dtype(monkeypatch):
    """The op's CUDA kernel (called here on CPU tensors): float64 runs the default kernel; float32
    / bf16 / fp16 the Triton launcher when triton is usable on the device, else the default."""
    log = []
    _spy(monkeypatch, lf, "linear_fisher_default_", log, "default")
    _spy(monkeypatch, lf, "linear_fisher_triton_", log, "triton")
    x, g = _inputs(2, 5, 3, 4, dtype=torch.float64)
    acc = torch.zeros(3, 4, dtype=torch.float64)
    lf._cuda_kernel(acc, x, g)
    _check(acc, linear_fisher_reference(x, g), torch.float64)
    assert [t for t, _ in log] == ["default"]
    monkeypatch.setattr(lf, "triton_usable_on", lambda device: False)
    log.clear()
    acc = torch.zeros(3, 4)
    lf._cuda_kernel(acc, x.float(), g.float())
    assert [t for t, _ in log] == ["default"]
    if HAS_TRITON and not HAS_CUDA:  # the interpreter runs the Triton kernel on CPU tensors
        monkeypatch.setattr(lf, "triton_usable_on", lambda device: True)
        log.clear()
        acc = torch.zeros(3, 4)
        lf._cuda_kernel(acc, x.float(), g.float(), check_lengths=False)
        assert log == [("triton", False)]
        _check(acc, linear_fisher_reference(x, g))


def test_linear_rule_takes_mixed_input_dtypes():
    """Under autocast a Linear's input can be fp32 and its output gradient bf16: the rule hands the
    op one dtype (the promoted one), and a float64 accumulator float64 inputs."""
    from fishkern.fisher import rules

    x, g = _inputs(3, 13, 37, 29, seed=7)
    g = g.bfloat16()
    layer = torch.nn.Linear(29, 37)
    for kernel in ("op", "default"):
        acc = {"weight": torch.zeros(37, 29)}
        rules.LinearRule().accumulate(layer, (x,), {}, g, None, acc, rules.Context(torch.float32, kernel, 1 << 21))
        _check(acc["weight"], linear_fisher_reference(x, g.float()))
    acc = {"weight": torch.zeros(37, 29, dtype=torch.float64)}
    rules.LinearRule().accumulate(layer, (x,), {}, g, None, acc, rules.Context(torch.float64, "op", 1 << 21))
    _check(acc["weight"], linear_fisher_reference(x, g.float()), torch.float64)


# ------------------------------------------------------------------------------ CPU kernel: fused form
needs_fused = pytest.mark.skipif(not lf.fused_available(), reason="fishkern's native extension is not built")
FUSED_SHAPES = [(3, 13, 37, 29), (1, 1, 1, 1), (5, 4, 6, 16), (2, 7, 7, 17), (4, 9, 13, 8), (3, 5, 130, 3),
                (2, 3, 1, 33), (6, 2, 12, 48)]


def _fused(acc, x, g, lengths=None):
    """The fused form alone (forced), through the op's CPU kernel."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lf, "choose_form", lambda *args, **kwargs: "fused")
        return lf.linear_fisher_cpu_(acc, x, g, lengths)


@needs_fused
@pytest.mark.parametrize("shape", FUSED_SHAPES)
def test_fused_form_matches_reference(shape):
    """Edge tiles in both directions (OUT not a multiple of 6, IN of 16 / 8), zero-length samples,
    float64 to 1e-12, float32 and bf16 inputs to fp32 rounding, added to what acc held."""
    b, t, out_f, in_f = shape
    for lengths in (None, _lengths(b, t)):
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            x, g = _inputs(*shape, dtype=dtype, seed=b + t)
            acc_dt = torch.float64 if dtype == torch.float64 else torch.float32
            acc0 = torch.rand(out_f, in_f, dtype=acc_dt)
            acc = acc0.clone()
            assert _fused(acc, x, g, lengths) is acc
            _check(acc, acc0.double() + linear_fisher_reference(x, g, lengths), dtype)


@needs_fused
def test_fused_form_chunks_strides_and_padding():
    """Samples long enough to be chunked one by one (and short ones packed many to a chunk), inputs
    strided in every dimension (the last one copied), NaN / inf past the lengths never read."""
    x, g = _inputs(5, 60, 19, 1000, seed=3)  # 60 tokens x 1000 inputs: 240 kB per sample > the chunk budget
    lengths = torch.tensor([60, 0, 1, 59, 30])
    acc = torch.zeros(19, 1000)
    _fused(acc, x, g, lengths)
    _check(acc, linear_fisher_reference(x, g, lengths))
    xs = torch.randn(9, 23, 2 * 29, dtype=torch.float64)[::2, ::2, ::2]  # (5, 12, 29), no unit stride
    gs = torch.randn(9, 23, 37, dtype=torch.float64)[::2, ::2]
    acc = torch.zeros(37, 29, dtype=torch.float64)
    _fused(acc, xs, gs)
    _check(acc, linear_fisher_reference(xs, gs), torch.float64)
    x, g = _inputs(3, 11, 37, 29, seed=4)
    lengths = torch.tensor([11, 0, 4])
    xp, gp = x.clone(), g.clone()
    for i, n in enumerate(lengths.tolist()):
        xp[i, n:], gp[i, n:] = float("nan"), float("inf")
    acc = torch.zeros(37, 29)
    _fused(acc, xp, gp, lengths)
    assert torch.isfinite(acc).all()
    _check(acc, linear_fisher_reference(x, g, lengths))


@needs_fused
def test_fused_form_is_deterministic_across_thread_counts():
    x, g = _inputs(16, 9, 61, 45, seed=5)
    lengths = _lengths(16, 9)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, threads):
            torch.set_num_threads(n)
            acc = torch.zeros(61, 45)
            _fused(acc, x, g, lengths)
            results.append(acc)
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])


@needs_fused
def test_dispatcher_runs_the_fused_form_on_cpu_for_short_samples(monkeypatch):
    """With the extension loaded the op's CPU kernel takes the fused form where the cost model says so;
    the default kernel called directly never does (it is plain PyTorch)."""
    calls = []
    real = lf._fused_form
    monkeypatch.setattr(lf, "_fused_form", lambda *a: (calls.append(a[1].shape), real(*a))[1])
    x, g = _inputs(8, 12, 30, 20)
    acc = torch.zeros(30, 20)
    linear_fisher_acc_(acc, x, g)
    assert calls == [(8, 12, 20)]
    _check(acc, linear_fisher_reference(x, g))
    linear_fisher_default_(torch.zeros(30, 20), x, g)
    assert len(calls) == 1


@needs_fused
def test_fused_internal_op_refuses_bad_arguments():
    """The native op checks what the Python kernel guarantees, so a direct call cannot read out of bounds."""
    fused = torch.ops.fishkern.linear_fisher_fused_cpu_
    x, g = _inputs(2, 3, 4, 5)
    ok = torch.tensor([3, 3])
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        fused(torch.zeros(5, 4), x, g, ok)
    with pytest.raises(RuntimeError, match="unit stride"):
        fused(torch.zeros(4, 5), x.transpose(1, 2).contiguous().transpose(1, 2), g, ok)
    with pytest.raises(RuntimeError, match="int64"):
        fused(torch.zeros(4, 5), x, g, ok.int())
    with pytest.raises(RuntimeError, match="dtype"):
        fused(torch.zeros(4, 5), x.double(), g, ok)
    acc = torch.zeros(4, 5)
    fused(acc, x, g, torch.tensor([-7, 99]))  # clamped to [0, T]: sample 0 counts 0 tokens, sample 1 all 3
    _check(acc, linear_fisher_reference(x, g, torch.tensor([0, 3])))


def test_cost_model_switch_points():
    """Token pairs for very short sequences, per-sample GEMMs from a few tokens up; padding counts
    against the pair form (it runs to the longest sample) but not the per-sample one."""
    pick = lf.choose_form
    assert [pick(t, [t] * 32) for t in (1, 2, 3, 4)] == ["pairs"] * 4
    assert [pick(t, [t] * 32) for t in (6, 8, 16, 128, 512)] == ["per_sample"] * 5
    t = 4
    assert pick(t, [t] * 32) == "pairs" and pick(t, [1] * 31 + [t]) == "per_sample"
    # the rule behind it: pairs cost t(t + 1) per sample, per-sample 2 t + ADDCMUL_COST
    for t in range(1, 12):
        assert (pick(t, [t]) == "pairs") == (t * (t + 1) <= 2 * t + lf.ADDCMUL_COST)
    # with the native fused form: it beats the per-sample form up to ~100 tokens, pairs only at t = 1
    assert [pick(t, [t] * 32, fused=True) for t in (1, 2, 4, 16, 64)] == ["pairs"] + ["fused"] * 4
    assert pick(512, [512] * 32, fused=True) == "per_sample"
    for t in range(1, 300, 7):
        fused = lf.FUSED_TOKEN_COST * t + lf.FUSED_SAMPLE_COST
        want = min((t * (t + 1), "pairs"), (fused, "fused"), (2 * t + lf.ADDCMUL_COST, "per_sample"),
                   key=lambda c: c[0])[1]
        assert pick(t, [t], fused=True) == want
