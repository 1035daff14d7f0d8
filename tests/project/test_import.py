"""`import fishkern` must not need a GPU, call torch.cuda, import triton or load the native library."""
import subprocess
import sys

CHECK = r"""
import sys, torch
def boom(*a, **k):
    raise AssertionError("torch.cuda was called at import time")
for name in ("is_available", "device_count", "get_device_capability", "get_device_properties", "current_device", "init"):
    setattr(torch.cuda, name, boom)
import fishkern, fishkern.optim, fishkern.mask, fishkern.topk, fishkern.ops
assert "triton" not in sys.modules, "triton was imported at import time"
from fishkern import _native
assert _native.native_info.cache_info().currsize == 0, "the native library was loaded at import time"
print("ok")
"""


def test_import_is_cheap_and_gpu_free():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env={"TRITON_INTERPRET": "0", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_optimizer_works_without_the_native_extension():
    """FISHKERN_NO_NATIVE installs: the ops run their default kernels (gather/scatter per tensor) and
    the parameter table checks in Python; the optimizer updates exactly the masked entries."""
    import subprocess
    import sys

    code = """
import torch, fishkern
from fishkern._native import native_available
from fishkern.ops import library
assert not native_available()
assert not hasattr(torch.ops.fishkern, "param_table_new")
p = torch.nn.Parameter(torch.randn(6, 5))
opt = fishkern.MaskedSGD([p], [torch.tensor([1, 7, 29])], lr=0.5)
assert opt._runtime[0].table._ops is None  # the Python checks
before = p.detach().clone()
for _ in range(2):
    p.grad = torch.ones_like(p)
    opt.step()
changed = (p.detach() != before).reshape(-1).nonzero().squeeze(1)
assert changed.tolist() == [1, 7, 29], changed
assert torch.allclose(p.detach().reshape(-1)[changed], before.reshape(-1)[changed] - 1.0)
print("ok")
"""
    import os

    env = dict(os.environ, FISHKERN_NO_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_native_op_without_extension_says_how_to_build(monkeypatch):
    import pytest
    import torch

    from fishkern import _native
    from fishkern.topk import ops

    monkeypatch.setattr(_native, "native_info", lambda: _native.NativeInfo(None, "none", "not built (a test)"))
    with pytest.raises(_native.NativeExtensionMissing, match="not built"):
        ops.global_topk([torch.rand(4)], 1, backend="native")


LIGHT = r"""
import sys
import fishkern
heavy = [m for m in ("torch", "transformers", "triton", "datasets", "numpy") if m in sys.modules]
assert not heavy, f"import fishkern imported {heavy}"
print("ok")
"""


def test_import_fishkern_imports_no_heavy_library():
    out = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_submodules_and_names_are_reachable_after_a_plain_import():
    """`import fishkern` then `fishkern.integrations.fish_mask_for(...)` (issue 17, item 10)."""
    code = (
        "import sys, fishkern\n"
        "assert callable(fishkern.integrations.fish_mask_for)\n"
        "assert 'transformers' not in sys.modules  # fishkern.integrations stays light too\n"
        "assert fishkern.distributed.SparseAverager.__name__ == 'SparseAverager'\n"
        "assert fishkern.FishMask is fishkern.mask.FishMask and fishkern.MaskedAdamW is fishkern.optim.MaskedAdamW\n"
        "assert fishkern.runners.demo.DemoConfig().out_dir == 'fishkern-demo'\n"
        "assert {'integrations', 'FishMask', 'metrics'} <= set(dir(fishkern))\n"
        "ns = {}\n"
        "exec('from fishkern import *', ns)\n"
        "assert set(fishkern.__all__) <= set(ns)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_unknown_attribute_is_an_attribute_error():
    import pytest

    import fishkern

    with pytest.raises(AttributeError, match="no attribute 'integration'"):
        fishkern.integration  # noqa: B018 - a typo of integrations
    assert not hasattr(fishkern, "__wrapped__")
