"""fishkern::conv2d_fisher_acc_: the op checked with torch.library.opcheck; each default-kernel form
("grouped", "unfold", and "auto" on both sides of its crossover) against the float64 per-sample
reference on odd geometries; argument errors from the op's own checks; the Conv1d / Conv2d rules
through the estimator with the cost model forced to each form."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.library import opcheck

from fishkern.fisher import estimate_fisher
from fishkern.ops import conv_fisher as cf
from fishkern.ops import linear_fisher as lf
from fishkern.ops import library
from tests.conftest import HAS_CUDA

OP = torch.ops.fishkern.conv2d_fisher_acc_.default
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available"))]

# (B, Cin, Cout, H, W, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (3, 4, 6, 7, 9, 3, 1, 1, 1, 1),
    (1, 3, 5, 8, 5, (3, 2), (2, 1), (1, 0), (1, 2), 1),
    (4, 6, 4, 9, 9, 3, 2, 2, 2, 2),
    (5, 6, 6, 6, 7, (1, 3), 1, (0, 1), 1, 6),  # depthwise
    (2, 5, 3, 5, 5, 1, 2, 0, 1, 1),  # 1x1, stride 2
    (3, 2, 4, 3, 4, 3, 1, 0, 1, 1),  # a single output row
]
FORMS = ("grouped", "unfold", "fused")  # "fused": the CPU kernel's native form (else unfold)


def _inputs(geom, dtype=torch.float64, device="cpu", seed=0):
    b, cin, cout, h, w, k, s, p, d, grp = geom
    gen = torch.Generator().manual_seed(seed)
    k = (k, k) if isinstance(k, int) else k
    x = torch.randn(b, cin, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(cout, cin // grp, *k, generator=gen, dtype=torch.float64)
    gy = torch.randn_like(F.conv2d(x, weight, None, s, p, d, grp))
    return x.to(dtype).to(device), gy.to(dtype).to(device), tuple(weight.shape), (s, p, d, grp)


def _acc(shape, dtype, device):
    return torch.zeros(shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)


def _check(acc, expected, dtype):
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-4)
    torch.testing.assert_close(acc.double().cpu(), expected.cpu(), rtol=rtol, atol=rtol * float(expected.abs().mean()))


def _samples(device):
    out = []
    for i, geom in enumerate(GEOMETRIES[:4]):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x, g, shape, (s, p, d, grp) = _inputs(geom, dtype, device, seed=i)
            pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
            acc = torch.rand(shape, device=device).to(_acc(shape, dtype, device).dtype)
            for form in ("auto", *FORMS):
                out.append(((acc.clone(), x, g, pair(s), pair(p), pair(d), grp), {"form": form}))
    x, g, shape, (s, p, d, grp) = _inputs((0, 3, 4, 5, 5, 3, 1, 1, 1, 1), torch.float32, device)
    out.append(((torch.zeros(shape, device=device), x, g, [1, 1], [1, 1], [1, 1], 1), {}))  # B = 0
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args, kwargs in _samples(device):
        opcheck(OP, args, kwargs)


def test_op_is_declared_once_with_a_cuda_kernel():
    assert "conv2d_fisher_acc_" in library.defined_ops()
    assert library.has_kernel("conv2d_fisher_acc_", "CUDA")
    assert cf.OP is OP
    assert str(OP._schema).endswith("-> ()") and "Tensor(a!) acc" in str(OP._schema)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("form", ("auto", *FORMS))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_default_kernel_matches_reference(device, geom, form, dtype):
    x, g, shape, (s, p, d, grp) = _inputs(geom, dtype, device, seed=hash(geom) % 1000)
    expected = cf.conv2d_fisher_reference(x, g, shape, s, p, d, grp)
    # on CPU also the CPU kernel, whose "fused" is the native form where the extension is loaded
    kernels = [cf.conv2d_fisher_default_] + ([cf.conv2d_fisher_cpu_] if device == "cpu" else [])
    for kernel in kernels:
        for chunk in (1, 37, cf.DEFAULT_CHUNK_ELEMS):  # one sample per chunk, a few, all
            acc = _acc(shape, dtype, device)
            kernel(acc, x, g, s, p, d, grp, form=form, chunk_elems=chunk)
            _check(acc, expected, dtype)
    # accumulates: a second call adds the same again
    cf.conv2d_fisher_acc_(acc, x, g, s, p, d, grp, form=form)
    _check(acc, 2 * expected, dtype)


def test_half_inputs_are_upcast_exactly():
    """bf16 / fp16 inputs: the products of the rounded inputs, accumulated in fp32."""
    for dtype in (torch.bfloat16, torch.float16):
        x, g, shape, (s, p, d, grp) = _inputs(GEOMETRIES[0], dtype)
        expected = cf.conv2d_fisher_reference(x.double(), g.double(), shape, s, p, d, grp)
        for form in FORMS:
            acc = _acc(shape, dtype, "cpu")
            cf.conv2d_fisher_acc_(acc, x, g, s, p, d, grp, form=form)
            _check(acc, expected, torch.float32)


def test_non_contiguous_inputs():
    x, g, shape, (s, p, d, grp) = _inputs(GEOMETRIES[2], torch.float64)
    expected = cf.conv2d_fisher_reference(x, g, shape, s, p, d, grp)
    xc, gc = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    big = torch.randn(x.shape[0] * 2, *x.shape[1:], dtype=torch.float64)
    big[::2] = x  # every other sample of a larger batch
    for xi, gi in ((xc, gc), (big[::2], g)):
        for form in FORMS:
            acc = _acc(shape, torch.float64, "cpu")
            cf.conv2d_fisher_acc_(acc, xi, gi, s, p, d, grp, form=form)
            _check(acc, expected, torch.float64)


def test_cpu_kernel_takes_the_fused_form_for_few_positions_and_the_default_never(monkeypatch):
    """choose_form: fused up to FUSED_MAX_POSITIONS only when asked (the CPU kernel with the native
    form loaded); the op on CPU tensors runs the CPU kernel; the default kernel never runs the
    native form, even forced (it runs unfold, the same sums)."""
    assert cf.choose_form(cf.FUSED_MAX_POSITIONS, fused=True) == "fused"
    assert cf.choose_form(cf.FUSED_MAX_POSITIONS + 1, fused=True) == "unfold"
    assert cf.choose_form(cf.FUSED_MAX_POSITIONS) == "unfold"
    assert cf.choose_form(cf.GROUPED_MIN_POSITIONS, fused=True) == "grouped"
    assert library.has_kernel("conv2d_fisher_acc_", "CPU")
    used = []
    real = lf._fused_form
    monkeypatch.setattr(lf, "_fused_form", lambda *a: (used.append("native"), real(*a)))
    x, g, shape, (s, p, d, grp) = _inputs(GEOMETRIES[2], torch.float64)  # 2 x 2 = 4 positions
    expected = cf.conv2d_fisher_reference(x, g, shape, s, p, d, grp)
    acc = _acc(shape, torch.float64, "cpu")
    cf.conv2d_fisher_default_(acc, x, g, s, p, d, grp, form="fused")
    _check(acc, expected, torch.float64)
    assert used == []
    acc = _acc(shape, torch.float64, "cpu")
    cf.conv2d_fisher_acc_(acc, x, g, s, p, d, grp)  # auto, through the dispatcher
    _check(acc, expected, torch.float64)
    assert set(used) == ({"native"} if lf.fused_available() else set())  # once per group (2 here)


def test_auto_switches_form_at_the_crossover(monkeypatch):
    assert cf.choose_form(cf.GROUPED_MIN_POSITIONS) == "grouped"
    assert cf.choose_form(cf.GROUPED_MIN_POSITIONS - 1) == "unfold"
    used = []
    monkeypatch.setattr(cf, "_grouped_form", lambda *a: used.append("grouped"))
    monkeypatch.setattr(cf, "_unfold_form", lambda *a: used.append("unfold"))
    x, g, shape, (s, p, d, grp) = _inputs(GEOMETRIES[0], torch.float32)  # 7 x 9 = 63 positions
    positions = g.shape[2] * g.shape[3]
    for threshold, want in ((positions, "grouped"), (positions + 1, "unfold")):
        monkeypatch.setattr(cf, "GROUPED_MIN_POSITIONS", threshold)
        cf.conv2d_fisher_default_(_acc(shape, torch.float32, "cpu"), x, g, s, p, d, grp)
        assert used[-1] == want


def test_bad_inputs_get_the_ops_errors():
    x, g, shape, (s, p, d, grp) = _inputs(GEOMETRIES[0], torch.float32)
    acc = torch.zeros(shape)
    cases = [
        ((acc, x[0], g, s, p, d, grp), {}, "x must be a 4-D tensor"),
        ((acc, x, g[:, :, 1:], s, p, d, grp), {}, "g must have shape"),
        ((torch.zeros(shape[0], shape[1] + 1, *shape[2:]), x, g, s, p, d, grp), {}, "does not fit x"),
        ((acc, x, g, s, p, d, 5), {}, "does not fit x"),
        ((acc.double(), x, g, s, p, d, grp), {}, "acc must be float32"),
        ((acc, x.half(), g, s, p, d, grp), {}, "must share one dtype"),
        ((acc.transpose(2, 3), x, g, s, p, d, grp), {}, "must have shape|contiguous"),
        ((acc, x, g, 0, p, d, grp), {}, "stride and dilation must be >= 1"),
        ((acc, x, g, s, -1, d, grp), {}, "padding >= 0"),
        ((acc, x, g, s, p, d, grp), {"form": "fft"}, "form must be one of"),
        ((acc, x, g, s, p, d, grp), {"chunk_elems": 0}, "chunk_elems must be >= 1"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            cf.conv2d_fisher_acc_(*args, **kwargs)


class _Convs(nn.Module):
    """Conv1d and Conv2d layers with every padding mode, groups, dilation, stride, bias or not."""

    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c2r = nn.Conv2d(6, 4, (3, 2), padding="same", padding_mode="reflect", bias=False)
        self.c2g = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, padding_mode="circular")
        self.c1 = nn.Conv1d(4, 5, 3, stride=2, padding=1, padding_mode="replicate")
        self.c1d = nn.Conv1d(5, 5, 2, dilation=2, groups=5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.c2g(torch.tanh(self.c2r(torch.tanh(self.c2(x))))))
        h = h.mean(2)  # (B, 4, W)
        h = torch.tanh(self.c1d(torch.tanh(self.c1(h))))
        return self.head(h.mean(2))


@pytest.mark.parametrize("threshold", [0, 10**9])  # every layer grouped / every layer unfold
def test_conv_rules_match_the_loop_with_each_form(monkeypatch, threshold):
    monkeypatch.setattr(cf, "GROUPED_MIN_POSITIONS", threshold)
    torch.manual_seed(0)
    model = _Convs().double()
    x = torch.randn(7, 3, 11, 13, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    with _no_fallback_warning():
        batched = estimate_fisher(model, batches, 7, implementation="torch", self_check=False)
    loop = estimate_fisher(model, batches, 7, implementation="loop")
    assert batched.implementation == "torch" and not batched.generic_modules
    for name, ref in loop.scores.items():
        torch.testing.assert_close(batched.scores[name], ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


class _no_fallback_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        messages = [str(w.message) for w in self.records]
        assert not any("fall" in m.lower() or "generic" in m.lower() for m in messages), messages
