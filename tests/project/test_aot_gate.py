"""The ahead-of-time Triton compile gate's own logic (scripts/triton_aot_gate.py): kernel discovery,
coverage, the ptxas log parser and the triton-internals check need no compiler; one end-to-end run
drives fishkern's host code and binds every launch without compiling."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import requires_triton

REPO = Path(__file__).resolve().parents[2]


def _load_gate():
    spec = importlib.util.spec_from_file_location("triton_aot_gate", REPO / "scripts" / "triton_aot_gate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


gate = _load_gate()

KERNELS = {
    "fishkern.ops.adamw_triton:_masked_adamw_kernel",
    "fishkern.ops.sgd_triton:_masked_sgd_kernel",
    "fishkern.ops.linear_fisher_triton:_linear_fisher_kernel",
    "fishkern.ops.conv_fisher_triton:_conv_fisher_kernel",
    "fishkern.ops.sampled_matmul_triton:_sampled_matmul_kernel",
}


def test_loading_the_gate_does_not_import_triton():
    check = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('g', 'scripts/triton_aot_gate.py');"
             "m = importlib.util.module_from_spec(s); sys.modules['g'] = m; s.loader.exec_module(m);"
             "m.discover_kernels(m.REPO / 'fishkern'); assert 'triton' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_discovery_finds_every_jitted_function_in_fishkern():
    kernels, calls = gate.discover_kernels(REPO / "fishkern")
    assert kernels == KERNELS
    # an independent count: decorator lines and triton.jit(...) calls in the source
    text = "\n".join(p.read_text() for p in (REPO / "fishkern").rglob("*.py"))
    assert len(calls) == len(re.findall(r"^\s*@triton\.jit\b|triton\.jit\(\w+\)", text, re.M))
    helpers = {k.split(":")[1] for k in calls["fishkern.ops.adamw_triton:_masked_adamw_kernel"]}
    assert helpers == {"block_entries", "load_grad", "to_param_dtype", "ieee_div", "ieee_sqrt"}
    assert all(set(c) <= set(calls) for c in calls.values())


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, body in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))
    return root / "pkg"


SYNTHETIC = {
    "__init__.py": "",
    "common.py": """
        import triton

        @triton.jit
        def helper(x):
            return x
        """,
    "a.py": """
        import triton
        from .common import helper

        @triton.jit
        def k1(p):
            helper(p)
        """,
    "b.py": """
        from triton import jit as J

        @J(do_not_specialize=["p"])
        def k2(p):
            pass
        """,
    "sub/__init__.py": "",
    "sub/c.py": """
        from .. import common

        def _k3(p):
            common.helper(p)

        def make():
            import triton
            return triton.jit(_k3)
        """,
}


def test_discovery_of_decorated_called_and_helper_functions(tmp_path):
    kernels, calls = gate.discover_kernels(_package(tmp_path, SYNTHETIC))
    assert kernels == {"pkg.a:k1", "pkg.b:k2", "pkg.sub.c:_k3"}
    assert calls["pkg.a:k1"] == {"pkg.common:helper"}
    assert calls["pkg.sub.c:_k3"] == {"pkg.common:helper"}
    assert calls["pkg.common:helper"] == set()


def test_a_new_kernel_no_driver_launches_fails_coverage(tmp_path):
    pkg = _package(tmp_path, {**SYNTHETIC, "new.py": "import triton\n\n@triton.jit\ndef fresh(p):\n    pass\n"})
    kernels, calls = gate.discover_kernels(pkg)
    launched = {k: {90, 80} for k in ("pkg.a:k1", "pkg.b:k2", "pkg.sub.c:_k3")}
    failures = gate.coverage_failures(kernels, calls, launched, {"case": 3}, [90, 80])
    assert len(failures) == 1 and "pkg.new:fresh was never launched for sm_80, sm_90" in failures[0]
    assert gate.coverage_failures(kernels, calls, {**launched, "pkg.new:fresh": {90, 80}}, {"case": 3}, [90, 80]) == []


def test_coverage_failures_name_each_gap():
    kernels, calls = {"m:k"}, {"m:k": set()}
    failures = gate.coverage_failures(kernels, calls, {"m:k": {90}, "m:other": {90, 80}},
                                      {"adamw fp32": 2, "fisher odd": 0}, [90, 80])
    assert failures == [
        "driver case 'fisher odd' launched no Triton kernel",
        "kernel m:k was never launched for sm_80: add a driver that reaches it through fishkern's host code",
        "launched kernel m:other was not found by discover_kernels: extend the discovery",
    ]


@pytest.mark.parametrize("body", [
    "import triton\njit = triton.jit\n",
    "import triton\nk = triton.jit(lambda p: p)\n",
    "import triton as tt\nclass A:\n    def f(self, p):\n        pass\nk = tt.jit(A.f)\n",
])
def test_discovery_refuses_uses_of_jit_it_cannot_follow(tmp_path, body):
    pkg = _package(tmp_path, {"__init__.py": "", "odd.py": body})
    with pytest.raises(gate.GateError, match=r"odd\.py:\d+: a use of triton.jit the gate cannot follow"):
        gate.discover_kernels(pkg)


def test_parse_ptxas_log():
    log = textwrap.dedent("""\
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function 'k' for 'sm_90a'
        ptxas info    : Function properties for k
            8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 80 registers, used 0 barriers, 8 bytes cumulative stack size
        ptxas info    : Function properties for helper
            0 bytes stack frame, 2 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 96 registers
        """)
    assert gate.parse_ptxas_log(log) == {"regs": 96, "spill_stores": 6, "spill_loads": 12}
    with pytest.raises(gate.GateError, match="no 'Used N registers' line"):
        gate.parse_ptxas_log("ptxas fatal   : Unsupported .version 9.4")


@requires_triton
def test_internals_check_names_what_this_triton_lacks(monkeypatch):
    from triton.runtime import jit

    gate.check_triton_internals()  # the installed triton is one the gate works with
    monkeypatch.delattr(jit.JITFunction, "_pack_args")
    monkeypatch.setattr(jit, "create_function_from_signature", lambda sig, kparams: None)
    with pytest.raises(gate.GateError, match=r"lacks what the gate relies on: create_function_from_signature"
                                             r".*JITFunction\._pack_args"):
        gate.check_triton_internals()


@requires_triton
def test_gate_drives_every_kernel_without_compiling(tmp_path):
    """End to end, no ptxas: the quick drivers reach every kernel on both targets through fishkern's
    host code, and the odd-stride Fisher launch gets the low-register config."""
    out_json = tmp_path / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "scripts/triton_aot_gate.py", "--quick", "--no-compile", "--json",
                          str(out_json)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["failures"] == []
    assert {(v["kernel"], v["arch"]) for v in report["variants"]} == {(k, a) for k in KERNELS for a in (90, 80)}
    odd = [v for v in report["variants"] if "B=3 T=5 OUT=9 IN=100" in v["case"] and "float32" in v["case"]]
    assert odd and all((v["num_warps"], v["num_stages"]) == (8, 1) for v in odd)
    fisher = [v for v in report["variants"] if v["kernel"].endswith(":_linear_fisher_kernel")]
    assert {v["constexprs"]["SPLIT"] for v in fisher} == {True, False}  # the workspace path is compiled too
    conv = [v for v in report["variants"] if v["kernel"].endswith(":_conv_fisher_kernel")]
    assert {v["constexprs"]["SPLIT"] for v in conv} == {True, False}
    assert {(v["constexprs"]["BLOCK_O"], v["constexprs"]["BLOCK_I"]) for v in conv} >= {(16, 32), (64, 64)}


_FISHER_VARIANTS = """
import json, os, sys, importlib.util
os.environ.pop("TRITON_INTERPRET", None)
spec = importlib.util.spec_from_file_location("g", "scripts/triton_aot_gate.py")
g = importlib.util.module_from_spec(spec); sys.modules["g"] = g; spec.loader.exec_module(g)
sys.path.insert(0, str(g.REPO))
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
out = {}
for quick in (True, False):
    rec = g.Recorder([GPUTarget("cuda", 90, 32)])
    JITFunction.run = lambda self, *a, grid, warmup, **kw: rec(self, *a, grid=grid, warmup=warmup, **kw)
    g.drive_fisher(rec, quick)
    assert all(rec.launches.values()), rec.launches
    out["quick" if quick else "full"] = sorted({
        (v.constexprs[(v.fn.arg_names.index("BLOCK_O"),)], v.constexprs[(v.fn.arg_names.index("BLOCK_I"),)],
         v.constexprs[(v.fn.arg_names.index("BLOCK_T"),)], v.options.num_warps, v.options.num_stages,
         bool(v.constexprs[(v.fn.arg_names.index("SPLIT"),)])) for v in rec.variants.values()})
print(json.dumps(out))
"""


@requires_triton
def test_fisher_drivers_reach_every_tile_config():
    """Every tile config fishkern.ops.linear_fisher_triton.tile_config can choose (BLOCK_O, BLOCK_I in
    16 / 32 / 64, BLOCK_T in 16 / 32, aligned rows or not), with and without sample splits, is
    launched by the full Fisher driver, so the full gate compiles it; --quick keeps 16- and 64-wide
    tiles. Binding only, no ptxas."""
    import torch

    from fishkern.ops import linear_fisher_triton as lft

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _FISHER_VARIANTS], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    reached = {k: {tuple(v) for v in vs} for k, vs in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    default_stages = {c[4] for c in reached["full"] if c[:2] == (64, 64) and c[3] == 4}
    assert len(default_stages) == 1  # Triton's default num_stages, as the binder fills it in
    (stages,) = default_stages
    for bo in (16, 32, 64):
        for bi in (16, 32, 64):
            for t in (13, 37):
                for aligned in (True, False):
                    # shapes with these tiles: OUT / IN of bo / bi (aligned rows) or 3 less (odd rows)
                    x = torch.zeros(3, t, bi if aligned else bi - 3)
                    g = torch.zeros(3, t, bo if aligned else bo - 3)
                    c = lft.tile_config(x, g)
                    assert (c.block_o, c.block_i) == (bo, bi)
                    for split in (False, True):
                        key = (c.block_o, c.block_i, c.block_t, c.num_warps,
                               stages if c.num_stages is None else c.num_stages, split)
                        assert key in reached["full"], key
                        if bo != 32 and bi != 32:
                            assert key in reached["quick"], key


PTXAS_LOG = """\
ptxas info    : 40 bytes gmem
ptxas info    : Compiling entry function '_ZN13fishkern_topk45_GLOBAL__N__cf2460ed_12_topk_cuda_cu_c0aad0aa13choose_kernelILi2EEEvNS0_4ArgsE' for 'sm_90'
ptxas info    : Function properties for _ZN13fishkern_topk45_GLOBAL__N__cf2460ed_12_topk_cuda_cu_c0aad0aa13choose_kernelILi2EEEvNS0_4ArgsE
    88 bytes stack frame, {spill} bytes spill stores, {spill} bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 88 bytes cumulative stack size, 8480 bytes smem
ptxas info    : Compile time = 112.323 ms
ptxas info    : Function properties for write_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 32 bytes smem
csrc/x.cu(3): warning: a compiler warning stays visible
"""


@pytest.mark.parametrize("spill", [0, 110])
def test_check_cuda_compile_reports_registers_and_fails_on_spills(tmp_path, spill):
    """scripts/check_cuda_compile.sh with a stand-in nvcc that prints a ptxas -v log."""
    log = tmp_path / "ptxas.log"
    log.write_text(PTXAS_LOG.format(spill=spill))
    nvcc = tmp_path / "nvcc"
    nvcc.write_text('#!/usr/bin/env bash\n[ "$1" = --version ] && { echo "fake nvcc"; exit 0; }\ncat "$FAKE_LOG" >&2\n')
    nvcc.chmod(0o755)
    out = subprocess.run(["bash", "scripts/check_cuda_compile.sh"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "NVCC": str(nvcc), "FAKE_LOG": str(log)}, timeout=60)
    lines = out.stdout.splitlines()
    sources = sorted(REPO.glob("csrc/*.cu"))
    assert len([x for x in lines if "write_kernel" in x and "regs 128  spills 0/0 B" in x]) == 2 * len(sources)
    assert sum("a compiler warning stays visible" in x for x in lines) == 2 * len(sources)
    choose = [x for x in lines if "choose_kernel<2>" in x]
    assert len(choose) == 2 * len(sources)
    if spill:
        assert out.returncode == 1
        assert all("SPILL" in x and "regs  64  spills 110/110 B" in x for x in choose)
        assert sum("a kernel spills registers" in x for x in lines) == 2 * len(sources)
    else:
        assert out.returncode == 0, out.stdout
        assert not any("SPILL" in x or "FAIL" in x for x in lines)
