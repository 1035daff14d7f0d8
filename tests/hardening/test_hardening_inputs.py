"""Issue 10, item 13: bad inputs get a clear error naming the argument, before any work, and never
crash the process.

- the registered native ops (torch.ops.fishkern.*) validate every argument, also the index values;
  calls that would crash are run in a subprocess, which must end normally;
- their fake (meta) implementations check shapes, dtypes, devices and segments;
- fisher_mask / estimate_fisher check their arguments before reading any data;
- the mask builders and global_topk refuse non-tensor inputs with a TypeError naming the entry;
- the runners replace report.md / results.json / plots atomically (temp file, fsync, os.replace).
"""
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from fishkern import FishMask, fisher_mask, global_topk
from fishkern._native import native_available
from fishkern.fisher import estimate_fisher

needs_native = pytest.mark.skipif(not native_available(), reason="fishkern's native extension is not built")


def run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (same environment: PYTHONPATH picks the fishkern under test)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout)


def assert_clean_exit(proc: subprocess.CompletedProcess) -> None:
    # a negative return code is a signal (e.g. -11: SIGSEGV)
    assert proc.returncode == 0, f"return code {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


# ------------------------------------------------------------------ native ops: would-be crashes
_OP_PRELUDE = """
    import torch
    from fishkern._native import require_native
    require_native("test")
    ops = torch.ops.fishkern
    def expect_error(what, call, *needles):
        try:
            call()
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
            assert all(n in msg for n in needles), (what, msg)
            print("refused", what, ":", msg, flush=True)
        else:
            raise AssertionError(what + ": no error")
"""


@needs_native
def test_gather_masked_refuses_out_of_range_indices_without_crashing():
    proc = run_python(_OP_PRELUDE + """
    srcs = [torch.randn(50), torch.randn(7, 3).bfloat16()]
    out = torch.zeros(5)
    for bad in (10**6, 2**40, -1, 50):
        idx = torch.tensor([0, 9, bad, 2, 20])
        expect_error(f"gather index {bad}", lambda: ops.gather_masked(srcs, idx, [0, 3], [3, 5], out),
                     f"index[2] = {bad}", "srcs[0]", "[0, 50)")
    # int32 index, the bad entry in the second tensor (21 entries)
    idx = torch.tensor([0, 9, 49, 2, 21], dtype=torch.int32)
    expect_error("gather int32 index", lambda: ops.gather_masked(srcs, idx, [0, 3], [3, 5], out), "index[4] = 21", "srcs[1]")
    # the written buffer aliasing the index would turn later indices into garbage
    idx = torch.tensor([0, 9, 49, 2, 20], dtype=torch.int32)
    expect_error("out aliasing index", lambda: ops.gather_masked(srcs, idx, [0, 3], [3, 5], idx.view(torch.float32)),
                 "out shares memory with index")
    print("done")
    """)
    assert_clean_exit(proc)
    assert proc.stdout.count("refused") == 6 and "done" in proc.stdout


@needs_native
def test_scatter_masked_refuses_out_of_range_indices_and_changes_nothing():
    proc = run_python(_OP_PRELUDE + """
    dsts = [torch.randn(50), torch.randn(7, 3).half()]
    before = [d.clone() for d in dsts]
    values = torch.randn(5)
    for bad in (2**40, 10**6, -3, 21):
        idx = torch.tensor([0, 9, 49, 2, bad])  # segment 0 is fine: nothing of it may be written either
        expect_error(f"scatter index {bad}", lambda: ops.scatter_masked_(dsts, idx, [0, 3], [3, 5], values),
                     f"index[4] = {bad}", "dsts[1]", "[0, 21)")
        assert all(torch.equal(a, b) for a, b in zip(dsts, before)), "a refused scatter wrote entries"
    idx = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    expect_error("dst aliasing index", lambda: ops.scatter_masked_([idx.view(torch.float32)], idx, [0], [5], values),
                 "dsts[0] shares memory with index")
    assert torch.equal(idx, torch.arange(5, dtype=torch.int32))
    print("done")
    """)
    assert_clean_exit(proc)
    assert proc.stdout.count("refused") == 5 and "done" in proc.stdout


@needs_native
def test_native_ops_fuzz_never_crash():
    """Random, mostly invalid arguments: every call either matches the reference or is refused
    with a RuntimeError, and a refused scatter leaves every tensor unchanged."""
    proc = run_python("""
    import random, torch
    from fishkern._native import require_native
    require_native("test")
    ops = torch.ops.fishkern
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    ok = refused = 0
    for trial in range(300):
        n = rng.randint(0, 3)
        sizes = [rng.randint(0, 40) for _ in range(n)]
        dtypes = [rng.choice([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32]) for _ in sizes]
        tensors = [torch.randn(s, generator=g).to(dt) for s, dt in zip(sizes, dtypes)]
        counts = [rng.randint(0, 6) for _ in sizes]
        ends = [sum(counts[: i + 1]) for i in range(n)]
        begins = [e - c for e, c in zip(ends, counts)]
        total = ends[-1] if ends else 0
        if rng.random() < 0.3 and n:  # disturb a segment
            i = rng.randrange(n)
            begins[i] += rng.choice([-2, -1, 1, 7])
        if rng.random() < 0.1:
            ends = ends[:-1]
        seg_of = [i for i, c in enumerate(counts) for _ in range(c)]
        idx = [rng.randint(0, max(0, sizes[i] - 1)) for i in seg_of]
        if idx and rng.random() < 0.4:
            idx[rng.randrange(len(idx))] = rng.choice([-1, -(2**40), 10**6, 2**40, 2**31 + 5])
        index = torch.tensor(idx, dtype=torch.int64).to(rng.choice([torch.int32, torch.int64])) if rng.random() < 0.9 \\
            else torch.tensor(idx, dtype=torch.float32)
        flat = torch.randn(total + rng.choice([0, 0, 0, 3, -1]) if total else rng.choice([0, 2]), generator=g)
        flat = flat.to(rng.choice([torch.float32, torch.float64, torch.float16]) if rng.random() < 0.15 else flat.dtype)
        before = [t.clone() for t in tensors]
        scatter = rng.random() < 0.5
        try:
            if scatter:
                ops.scatter_masked_(tensors, index, begins, ends, flat)
            else:
                ops.gather_masked(tensors, index, begins, ends, flat)
        except RuntimeError:
            refused += 1
            if scatter:
                assert all(torch.equal(a, b) for a, b in zip(tensors, before)), trial
            continue
        ok += 1
        for i, (t, b, e) in enumerate(zip(before, begins, ends)):  # accepted: exactly the reference result
            sel = index[b:e].long()
            if scatter:
                want = before[i].clone()
                want[sel] = flat[b:e].to(t.dtype)
                assert torch.equal(tensors[i], want), trial
            else:
                assert torch.equal(flat[b:e], t[sel].to(flat.dtype)), trial
    print("ok", ok, "refused", refused)
    assert ok > 30 and refused > 100
    """)
    assert_clean_exit(proc)
    assert proc.stdout.startswith("ok ")


# ------------------------------------------------------------------ native ops: argument checks
@needs_native
@pytest.mark.parametrize("op", ["gather_masked", "scatter_masked_"])
def test_native_ops_name_the_bad_argument(op):
    """Arguments the kernels cannot use are refused with a message naming the argument (none of
    these crash the original code; most got no error or an unspecific one)."""
    from fishkern.ops.masked_copy import _ops

    ops = _ops()
    tl, flat = ("srcs", "out") if op.startswith("gather") else ("dsts", "values")
    call = getattr(ops, op)
    t = [torch.randn(10), torch.randn(3, 4)]
    idx = torch.tensor([1, 2, 0, 5], dtype=torch.int32)
    buf = torch.zeros(4)
    cases = [
        (([t[0].int(), t[1]], idx, [0, 2], [2, 4], buf), rf"{tl}\[0\] has dtype Int; expected float32"),
        (([t[0], torch.randn(1, 4).expand(3, 4)], idx, [0, 2], [2, 4], buf), rf"{tl}\[1\] must be non-overlapping and dense"),
        ((t, idx, [0, 1], [2, 4], buf), r"segment 1 starts at 1 before segment 0 ends \(2\)"),
        ((t, idx, [2, 0], [4, 2], buf), r"segment 1 starts at 0 before segment 0 ends \(4\)"),
        ((t, idx, [0, 2], [2, 5], buf), r"segment 1 .* is outside the index"),
        ((t, idx, [0, 3], [2, 2], buf), r"segment 1 .*\[3, 2\) is outside .* or reversed"),
        ((t, idx.float(), [0, 2], [2, 4], buf), r"index has dtype Float; expected int32 or int64"),
        ((t, idx[::2], [0, 1], [1, 2], buf), r"index must be a contiguous 1-D tensor"),
        ((t, idx, [0, 2], [2, 4], buf.half()), rf"{flat} has dtype Half; expected float32 or float64"),
        ((t, idx, [0, 2], [2, 4], torch.zeros(8)[::2]), rf"{flat} must be a contiguous 1-D tensor"),
        ((t, idx, [0], [2], buf), rf"{tl} has 2 tensors but begins has 1 and ends 1 entries"),
    ]
    for args, pattern in cases:
        before = [x.clone() for x in args[0]]
        with pytest.raises(RuntimeError, match=pattern):
            call(*args)
        assert all(torch.equal(a, b) for a, b in zip(args[0], before))


@needs_native
def test_fake_implementations_check_shapes():
    """The fake (meta) kernels refuse what the real ones refuse without reading data (originally
    they accepted anything, and topk's accepted any k >= 0)."""
    from fishkern.ops.masked_copy import _ops
    from fishkern.topk.ops import _ensure_op

    ops = _ops()
    topk = _ensure_op()
    m = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    srcs, idx = [m(10), m(3, 4)], m(4, dtype=torch.int32)
    ops.gather_masked(srcs, idx, [0, 2], [2, 4], m(4))  # valid: no error
    with pytest.raises(RuntimeError, match="begins and ends must have one entry per tensor"):
        ops.gather_masked(srcs, idx, [0], [2], m(4))
    with pytest.raises(RuntimeError, match=r"segment 1 .* is outside the index / values"):
        ops.scatter_masked_(srcs, idx, [0, 2], [2, 6], m(6))
    with pytest.raises(RuntimeError, match=r"segment 1 starts at 1 before segment 0 ends"):
        ops.scatter_masked_(srcs, idx, [0, 1], [2, 4], m(4))
    with pytest.raises(RuntimeError, match=r"index has dtype torch.float32"):
        ops.gather_masked(srcs, m(4), [0, 2], [2, 4], m(4))
    with pytest.raises(RuntimeError, match=r"srcs\[1\] has dtype torch.int64"):
        ops.gather_masked([m(10), m(3, 4, dtype=torch.int64)], idx, [0, 2], [2, 4], m(4))
    with pytest.raises(RuntimeError, match=r"out has dtype torch.float16"):
        ops.gather_masked(srcs, idx, [0, 2], [2, 4], m(4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"dsts\[0\] is on cpu but index on meta"):
        ops.scatter_masked_([torch.zeros(10), m(3, 4)], idx, [0, 2], [2, 4], m(4))
    with pytest.raises(RuntimeError, match=r"k = 12 must lie in \[0, 11\]"):
        topk([m(5), m(2, 3)], 12)
    with pytest.raises(RuntimeError, match="score tensor 1 has dtype torch.float64"):
        topk([m(5), m(3, dtype=torch.float64)], 1)


@needs_native
def test_opcheck_more_layouts():
    """opcheck (schema, fake, autograd registration, AOT dispatch) on cases the op tests do not
    cover: int64 index, float64 flat buffers, a permuted (channels_last) tensor, empty segments;
    topk with an empty tensor and k = total."""
    from fishkern.ops.masked_copy import _ops
    from fishkern.topk.ops import _ensure_op

    ops = _ops()
    g = torch.Generator().manual_seed(1)
    cl = torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)
    tensors = [torch.randn(30, generator=g, dtype=torch.float64), cl, torch.randn(0), torch.randn(6, generator=g).half()]
    idx = torch.tensor([3, 29, 0, 7, 119, 5], dtype=torch.int64)
    begins, ends = [0, 2, 5, 5], [2, 5, 5, 6]
    torch.library.opcheck(ops.gather_masked.default, (tensors, idx, begins, ends, torch.zeros(6, dtype=torch.float64)))
    torch.library.opcheck(
        ops.scatter_masked_.default,
        ([t.clone() for t in tensors], idx, begins, ends, torch.randn(6, generator=g, dtype=torch.float64)),
    )
    scores = [torch.randn(4, 5, generator=g), torch.randn(0), torch.randn(3, generator=g)]
    torch.library.opcheck(_ensure_op(), (scores, 23))


# ------------------------------------------------------------------ fisher_mask / estimate_fisher
class _Untouchable:
    """Data that must not be read: any iteration is recorded."""

    def __init__(self):
        self.read = False

    def __iter__(self):
        self.read = True
        x = torch.randint(0, 20, (4, 3))
        return iter([(x, torch.randint(0, 3, (4,)))])


def _fisher_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Flatten(), torch.nn.Linear(24, 3))
    model[0].weight.requires_grad_(False)  # frozen: counts in "all parameters", never selected
    return model


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"density": 1.5}, ValueError, "density must be a fraction"),
        ({"density": float("nan")}, ValueError, "density must be a fraction"),
        ({"density": None}, ValueError, "exactly one of density"),
        ({"density": 0.1, "k": 5}, ValueError, "exactly one of density"),
        ({"density": None, "k": -1}, ValueError, r"k must be an integer in \[0, 235\]"),
        ({"density": None, "k": 1000}, ValueError, r"k must be an integer in \[0, 235\]"),
        ({"density": 0.1, "force": 5}, TypeError, "force must be a string or a list of strings"),
        ({"density": 0.1, "exclude": ["2", 3]}, TypeError, r"exclude\[1\] must be a string"),
        ({"density": 0.1, "force": "2", "exclude": "2.bias"}, ValueError, "both forced in and excluded"),
        ({"density": 0.1, "force": "0"}, ValueError, "both forced in and excluded"),  # "0" is frozen
        ({"density": 0.05, "force": "2"}, ValueError, "more than the whole budget"),
        ({"density": 0.1, "num_samples": 0}, ValueError, "num_samples must be a positive integer"),
        ({"density": 0.1, "kind": "fancy"}, ValueError, "kind must be one of"),
        ({"density": 0.1, "loss_fn": "mse"}, TypeError, "loss_fn must be callable"),
        ({"density": 0.1, "seed": "0"}, TypeError, "seed must be an int or None"),
        ({"density": 0.1, "chunk_elems": 0}, ValueError, "chunk_elems must be a positive integer"),
        ({"density": 0.1, "implementation": "cuda"}, ValueError, "implementation must be one of"),
    ],
)
def test_fisher_mask_checks_arguments_before_reading_data(kwargs, error, pattern):
    model = _fisher_model()
    data = _Untouchable()
    kwargs = {"num_samples": 4, "progress": False, **kwargs}
    density = kwargs.pop("density")
    with pytest.raises(error, match=pattern):
        fisher_mask(model, data, density, **kwargs)
    assert not data.read, "the data was read (the Fisher pass ran) before the arguments were checked"


def test_estimate_fisher_checks_arguments_before_reading_data():
    model = _fisher_model()
    for kwargs, error, pattern in [
        ({"chunk_elems": -5}, ValueError, "chunk_elems"),
        ({"loss_fn": 3}, TypeError, "loss_fn must be callable"),
        ({"seed": 1.5}, TypeError, "seed must be an int or None"),
    ]:
        data = _Untouchable()
        with pytest.raises(error, match=pattern):
            estimate_fisher(model, data, 4, progress=False, **kwargs)
        assert not data.read, kwargs
    with pytest.raises(TypeError, match="data must be an iterable of batches"):
        estimate_fisher(model, 42, 4, progress=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fisher_mask(lambda x: x, _Untouchable(), 0.1)
    mask = fisher_mask(model, _Untouchable(), 0.1, num_samples=4, progress=False)  # valid: still works
    assert mask.k == 23 and "0.weight" not in mask.indices


# ------------------------------------------------------------------ builders: non-tensor inputs
def test_from_scores_refuses_non_tensor_scores():
    with pytest.raises(TypeError, match=r"scores\['w'\] is a list, not a tensor"):
        FishMask.from_scores({"w": [1.0, 2.0]}, 0.5)
    with pytest.raises(TypeError, match=r"scores\['w'\] is a ndarray, not a tensor"):
        FishMask.from_scores({"w": np.ones(3, dtype=np.float32)}, 0.5)
    with pytest.raises(TypeError, match="scores must be a mapping"):
        FishMask.from_scores([torch.rand(3)], 0.5)
    with pytest.raises(TypeError, match="parameter names must be strings"):
        FishMask.from_scores({0: torch.rand(3)}, 0.5)
    with pytest.raises(TypeError, match=r"scores\['b'\] has dtype torch.int64; scores must be float32"):
        FishMask.from_scores({"a": torch.rand(3), "b": torch.arange(4)}, 0.5)
    with pytest.raises(TypeError, match=r"scores\['a'\] has dtype torch.float64"):
        FishMask.from_scores({"a": torch.rand(3, dtype=torch.float64)}, 0.5)
    with pytest.raises(ValueError, match=r"NaN Fisher scores in \['b'\]"):
        FishMask.from_scores({"a": torch.rand(3), "b": torch.tensor([1.0, float("nan")])}, 0.5)
    # excluded parameters are never ranked, so their scores' dtype does not matter (as before)
    mask = FishMask.from_scores({"a": torch.rand(3), "b": torch.arange(4)}, k=2, exclude="b")
    assert mask.k == 2 and set(mask.indices) == {"a"}


def test_random_and_bitfit_refuse_what_is_neither_tensor_nor_shape():
    # a list of floats used to be read as the shape (1, 2)
    with pytest.raises(TypeError, match=r"params\['w'\] is list \[1.0, 2.0\]; expected a tensor or a shape"):
        FishMask.random({"w": [1.0, 2.0]}, 0.5)
    with pytest.raises(TypeError, match=r"params\['w'\] is ndarray"):
        FishMask.random({"w": np.zeros((2, 3))}, 0.5)
    with pytest.raises(TypeError, match=r"params\['w'\] is tuple \(3, -1\)"):
        FishMask.random({"w": (3, -1)}, 0.5)
    with pytest.raises(TypeError, match=r"params: entry 0 is Tensor, not a \(name, tensor\) pair"):
        FishMask.bitfit([torch.zeros(3)])
    with pytest.raises(TypeError, match="params must be a model"):
        FishMask.random(torch.zeros(3), 0.5)
    with pytest.raises(TypeError, match="force must be a string or a list of strings"):
        FishMask.random({"w": (4, 4)}, 0.5, force=0)
    with pytest.raises(TypeError, match="head must be a string or a list of strings"):
        FishMask.bitfit({"w": (4,), "b.bias": (2,)}, head=7)
    with pytest.raises(TypeError, match="seed must be an int"):
        FishMask.random({"w": (4, 4)}, 0.5, seed="1")
    # shapes given as tuples, lists, torch.Size and numpy integers still work
    a = FishMask.random({"w": (4, 4), "v": [np.int64(3)], "u": torch.Size([2])}, k=5, seed=1)
    b = FishMask.random({"w": torch.zeros(4, 4), "v": torch.zeros(3), "u": torch.zeros(2)}, k=5, seed=1)
    assert a == b and a.k == 5


def test_from_boolean_refuses_non_tensors():
    with pytest.raises(TypeError, match="masks must be a mapping"):  # was AttributeError: 'list' ... 'items'
        FishMask.from_boolean([torch.ones(3, dtype=torch.bool)])
    with pytest.raises(TypeError, match=r"mask of 'w' must be a boolean tensor, got a list"):
        FishMask.from_boolean({"w": [True, False]})
    with pytest.raises(TypeError, match="mask of 'w' must be a boolean tensor, got torch.float32"):
        FishMask.from_boolean({"w": torch.zeros(3)})
    mask = FishMask.from_boolean({"w": torch.tensor([True, False, True])}, forced="w")
    assert mask.forced == ("w",) and mask.k == 2


@needs_native
def test_global_topk_refuses_non_tensors():
    with pytest.raises(TypeError, match=r"scores\[0\] is a list, not a tensor"):
        global_topk([[1.0, 2.0]], 1)
    with pytest.raises(TypeError, match=r"scores\[1\] is a ndarray, not a tensor"):
        global_topk([torch.rand(2), np.ones(2)], 1)
    with pytest.raises(TypeError, match=r"scores\[0\] has dtype torch.int64"):
        global_topk([torch.arange(3)], 1)
    with pytest.raises(TypeError, match="k must be an int"):
        global_topk([torch.rand(3)], 1.0)
    with pytest.raises(RuntimeError, match="score tensor 1 contains NaN"):
        global_topk([torch.rand(3), torch.tensor([float("nan")])], 1)


# ------------------------------------------------------------------ runners: atomic reports
def _record_io(monkeypatch):
    """Log fsync (by file path) and os.replace calls, in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        try:
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            events.append(("fsync", None))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _assert_published_atomically(events, path):
    path = os.path.abspath(path)
    replaces = [e for e in events if e[0] == "replace" and e[2] == path]
    assert len(replaces) == 1, events
    tmp = replaces[0][1]
    assert os.path.dirname(tmp) == os.path.dirname(path) and tmp != path
    synced_before = [e[1] for e in events[: events.index(replaces[0])] if e[0] == "fsync"]
    assert tmp in synced_before, f"the temporary file was not fsync-ed before the rename: {events}"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fsync-ed files")
def test_report_helpers_fsync_then_replace(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fishkern.reporting import save_figure, write_json_atomic

    events = _record_io(monkeypatch)
    write_json_atomic(tmp_path / "results.json", {"a": 1})
    fig = plt.figure()
    save_figure(fig, tmp_path / "plot.png")
    _assert_published_atomically(events, tmp_path / "results.json")
    _assert_published_atomically(events, tmp_path / "plot.png")
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "results.json"]


def test_demo_report_md_failed_write_keeps_previous(tmp_path, monkeypatch):
    """A write of report.md that fails midway (disk full at fsync) leaves the previous report and
    no temporary file (originally report.md was written in place with Path.write_text)."""
    from fishkern.runners import demo

    monkeypatch.setattr(demo, "plot_sweep", lambda report, path: None)
    monkeypatch.setattr(demo, "render_report", lambda report: "# new report\n" * 1000)
    (tmp_path / "report.md").write_text("# old report\n")
    real_fsync = os.fsync

    def full_disk_on_report(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".report.md"):
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_on_report)
    with pytest.raises(OSError, match="No space left"):
        demo.write_outputs(tmp_path, {"x": 1})
    assert (tmp_path / "report.md").read_text() == "# old report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    demo.write_outputs(tmp_path, {"x": 2})
    assert (tmp_path / "report.md").read_text() == "# new report\n" * 1000
    assert json.loads((tmp_path / "results.json").read_text()) == {"x": 2}


def test_two_writers_of_one_report_never_collide(tmp_path):
    """Each writer has its own temporary file (originally both used `results.json.tmp`: one
    writer's rename then failed, or published the other's half-written file)."""
    from fishkern.reporting import write_json_atomic

    path = tmp_path / "results.json"
    errors = []
    payloads = [{"writer": w, "pad": "x" * 20_000} for w in range(2)]

    def writer(w):
        try:
            for _ in range(150):
                write_json_atomic(path, payloads[w])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(path.read_text()) in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_mask_matching_refuses_what_is_neither_tensor_nor_shape():
    """check_matches / mask_indices read a list of floats as a shape before (same kind as item 13)."""
    import fishkern

    mask = fishkern.FishMask.random({"w": (4,)}, 0.5, seed=0)
    with pytest.raises(TypeError, match="'w': expected a tensor or a shape"):
        mask.check_matches({"w": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(TypeError, match="expected a tensor or a shape"):
        mask.mask_indices({"w": [4.5]})
    assert mask.check_matches({"w": (4,)}) == {"w": (4,)}
