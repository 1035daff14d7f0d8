"""Where fishkern's native library comes from (fishkern/_native.py): an install-time build only for
the running torch, else a first-use build cached per torch and sources under a lock, else the
plain-PyTorch paths with a reason. The compiler is replaced here (the CI install checks in
scripts/ci_installs.sh do real first-use builds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fishkern import _build_config as cfg
from fishkern import _native


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """An empty package directory for _native to look in, and an empty cache."""
    here = tmp_path / "pkg"
    here.mkdir()
    sources = _native.csrc_dir()
    monkeypatch.setattr(_native, "HERE", str(here))
    monkeypatch.setattr(_native, "csrc_dir", lambda: sources)
    monkeypatch.setenv("FISHKERN_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("FISHKERN_NO_NATIVE", "FISHKERN_NO_JIT"):
        monkeypatch.delenv(var, raising=False)
    _native.native_info.cache_clear()
    yield here
    _native.native_info.cache_clear()


class FakeCompiler:
    """Stands in for cpp_extension.load and torch.ops.load_library: records, builds nothing."""

    def __init__(self, monkeypatch, fail: bool = False):
        self.builds, self.loads, self.fail = [], [], fail
        from torch.utils import cpp_extension

        monkeypatch.setattr(cpp_extension, "load", self.load)
        monkeypatch.setattr(torch.ops, "load_library", self.loads.append)

    def load(self, name, sources, build_directory, **kw):
        self.builds.append({"name": name, "sources": sources, "dir": build_directory, **kw})
        if self.fail:
            raise RuntimeError("Error building extension 'fishkern_C': c++: not found")
        open(os.path.join(build_directory, f"{name}.so"), "w").close()


def _write_info(here, torch_version):
    cfg.write_build_info(os.path.join(here, cfg.BUILD_INFO_FILE), {"torch": torch_version})


def test_a_library_for_this_torch_is_used(pkg, monkeypatch):
    fake = FakeCompiler(monkeypatch)
    (pkg / "_C.so").write_bytes(b"")
    _write_info(pkg, torch.__version__)
    info = _native.native_info()
    assert info.available and info.how == "built at install" and info.path == str(pkg / "_C.so")
    assert fake.loads == [str(pkg / "_C.so")] and fake.builds == []


def test_a_library_for_another_torch_is_never_loaded_and_is_rebuilt(pkg, monkeypatch, capsys):
    fake = FakeCompiler(monkeypatch)
    (pkg / "_C.so").write_bytes(b"")
    _write_info(pkg, "1.0.0+another")
    info = _native.native_info()
    assert str(pkg / "_C.so") not in fake.loads  # a mismatched ABI can crash: not even tried
    assert info.available and info.how == "first-use build" and len(fake.builds) == 1
    b = fake.builds[0]
    assert b["is_python_module"] is False and b["dir"].startswith(os.environ["FISHKERN_CACHE_DIR"])
    assert torch.__version__.replace("+", "_") in b["dir"]  # cached per torch version
    names = [os.path.basename(s) for s in b["sources"]]
    assert set(cfg.CPU_SOURCES) <= set(names)
    err = capsys.readouterr().err
    assert "compiling the native extension" in err and "first use only" in err and "cached in" in err
    assert "built in" in err
    recorded = cfg.read_build_info(os.path.join(b["dir"], cfg.BUILD_INFO_FILE))
    assert recorded["torch"] == torch.__version__ and recorded["how"] == "first use"


def test_the_first_use_build_is_cached(pkg, monkeypatch, capsys):
    fake = FakeCompiler(monkeypatch)
    assert _native.native_info().how == "first-use build"
    _native.native_info.cache_clear()  # a new process
    info = _native.native_info()
    assert info.available and info.how == "first-use build (cached)"
    assert len(fake.builds) == 1 and fake.loads == [info.path]


def test_a_library_without_build_info_is_tried_then_rebuilt_if_it_fails(pkg, monkeypatch):
    fake = FakeCompiler(monkeypatch)
    (pkg / "_C.so").write_bytes(b"")

    def load_library(path):
        if path == str(pkg / "_C.so"):
            raise OSError("undefined symbol: _ZN3c10...")
        fake.loads.append(path)

    monkeypatch.setattr(torch.ops, "load_library", load_library)
    info = _native.native_info()
    assert info.available and info.how == "first-use build" and len(fake.builds) == 1


def test_switches_and_failures_give_a_reason_not_a_crash(pkg, monkeypatch):
    FakeCompiler(monkeypatch)
    monkeypatch.setenv("FISHKERN_NO_NATIVE", "1")
    assert _native.native_info().reason == "FISHKERN_NO_NATIVE is set" and not _native.native_available()
    monkeypatch.delenv("FISHKERN_NO_NATIVE")
    _native.native_info.cache_clear()
    monkeypatch.setenv("FISHKERN_NO_JIT", "1")
    info = _native.native_info()
    assert not info.available and "FISHKERN_NO_JIT" in info.reason and "no library was built" in info.reason
    with pytest.raises(_native.NativeExtensionMissing, match="FISHKERN_NO_JIT"):
        _native.require_native("the masked gather/scatter")
    monkeypatch.delenv("FISHKERN_NO_JIT")
    _native.native_info.cache_clear()
    FakeCompiler(monkeypatch, fail=True)
    info = _native.native_info()
    assert not info.available and "first-use build failed" in info.reason and "c++: not found" in info.reason


def test_no_sources_means_no_build(pkg, monkeypatch):
    FakeCompiler(monkeypatch)
    monkeypatch.setattr(_native, "csrc_dir", lambda: None)
    info = _native.native_info()
    assert not info.available and "sources" in info.reason


def test_a_library_built_from_other_sources_is_rebuilt(pkg, monkeypatch):
    fake = FakeCompiler(monkeypatch)
    (pkg / "_C.so").write_bytes(b"")
    cfg.write_build_info(os.path.join(pkg, cfg.BUILD_INFO_FILE), {"torch": torch.__version__, "sources": "0123456789ab"})
    info = _native.native_info()
    assert str(pkg / "_C.so") not in fake.loads and info.how == "first-use build"


def test_cache_problems_fall_back_instead_of_crashing(pkg, monkeypatch, tmp_path):
    from fishkern.topk import global_topk, global_topk_reference

    FakeCompiler(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FISHKERN_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    monkeypatch.setattr(_native, "_WARNED", set())
    info = _native.native_info()
    assert not info.available and "could not run" in info.reason
    scores = [torch.randn(30), torch.randn(4, 4)]
    with pytest.warns(RuntimeWarning, match="plain-PyTorch path"):
        got = global_topk(scores, 7)
    assert all(torch.equal(a, b) for a, b in zip(got, global_topk_reference(scores, 7)))


def test_a_damaged_cached_library_is_forgotten(pkg, monkeypatch):
    fake = FakeCompiler(monkeypatch)
    assert _native.native_info().how == "first-use build"
    directory = os.path.dirname(fake.builds[0]["dir"] + "/")
    _native.native_info.cache_clear()

    def broken(path):
        raise OSError("file too short")

    monkeypatch.setattr(torch.ops, "load_library", broken)
    info = _native.native_info()
    assert not info.available and "failed to load" in info.reason
    assert not os.path.exists(os.path.join(directory, cfg.BUILD_INFO_FILE))  # the next process rebuilds
    _native.native_info.cache_clear()
    monkeypatch.setattr(torch.ops, "load_library", fake.loads.append)
    assert _native.native_info().how == "first-use build" and len(fake.builds) == 2


def test_the_cache_key_separates_machines_and_plans(monkeypatch):
    plan = cfg.plan_build({}, None, None, None, 0)
    a = _native.jit_build_dir(plan, "abc")
    monkeypatch.setattr(_native.platform, "machine", lambda: "aarch64")
    b = _native.jit_build_dir(plan, "abc")
    plan2 = cfg.plan_build({}, None, None, None, 0)
    plan2.cxx = plan2.cxx + ["-g"]
    c = _native.jit_build_dir(plan2, "abc")
    assert len({a, b, c}) == 3 and "aarch64" in b


def test_the_sources_ship_with_the_package():
    # in a checkout csrc/ sits beside the package; an installed wheel has them as fishkern/_csrc
    src = _native.csrc_dir()
    assert src is not None
    assert all(os.path.exists(os.path.join(src, n)) for n in cfg.CPU_SOURCES + cfg.CUDA_SOURCES + cfg.HEADERS)


def test_global_topk_falls_back_to_the_exact_torch_selection(pkg, monkeypatch):
    from fishkern.topk import global_topk, global_topk_reference
    from fishkern.topk import ops

    monkeypatch.setenv("FISHKERN_NO_NATIVE", "1")
    monkeypatch.setattr(_native, "_WARNED", set())
    scores = [torch.randn(40), torch.tensor([1.0, 1.0, 1.0]), torch.randn(3, 7)]
    with pytest.warns(RuntimeWarning, match="global_topk runs its plain-PyTorch path.*FISHKERN_NO_NATIVE"):
        got = global_topk(scores, 9)
    assert all(torch.equal(a, b) for a, b in zip(got, global_topk_reference(scores, 9)))
    with pytest.raises(_native.NativeExtensionMissing, match="no native kernel"):
        global_topk(scores, 9, backend="native")
    with pytest.raises(ValueError, match="backend must be one of"):
        global_topk(scores, 9, backend="cuda")
    assert ops.BACKENDS == ("auto", "native", "torch")


_LOCK_WORKER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    from fishkern import _native
    with _native._build_lock({directory!r}):
        start = time.time()
    print(json.dumps(start))
""")


def test_a_second_process_waits_for_the_build_and_says_why(tmp_path):
    # this process holds the lock (it is "building"); a second one must block, say so on stderr, and
    # get the lock only after we let go. Deterministic: no race on how long the imports take.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    directory = str(tmp_path / "build")
    code = _LOCK_WORKER.format(root=root, directory=directory)
    with _native._build_lock(directory):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        said = []
        for line in proc.stderr:  # EOF (the worker exited without waiting) ends the loop
            said.append(line)
            if "waiting for it" in line:
                break
        assert said and "waiting for it" in said[-1], said
        time.sleep(0.2)
        released = time.time()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err)
    assert json.loads(out.strip().splitlines()[-1]) >= released, "the second process built while the lock was held"


def test_a_stale_torch_baton_is_cleared_under_the_lock(tmp_path):
    # cpp_extension's own 'lock' file, left by a killed build, would make the next build wait forever
    directory = tmp_path / "build"
    directory.mkdir()
    (directory / "lock").write_text("")
    with _native._build_lock(str(directory)):
        assert not (directory / "lock").exists()
    t0 = time.time()
    with _native._build_lock(str(directory)):  # released: taken again at once
        pass
    assert time.time() - t0 < 30


def test_env_report_says_what_a_bug_report_needs():
    out = subprocess.run([sys.executable, "-m", "fishkern.env", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["torch"]["version"] == torch.__version__ and r["torch"]["cuda"] == torch.version.cuda
    assert set(r["packages"]) >= {"torch", "triton", "numpy", "safetensors", "transformers"}
    assert r["build_plan"]["kind"] in ("CPU", "CPU + CUDA") and r["build_plan"]["notes"]
    assert {"global_topk", "masked optimizer step", "Fisher sequence-Linear kernel"} <= set(r["backends"])
    assert r["native"]["how"] in ("built at install", "first-use build", "first-use build (cached)", "not loaded", "none")
    if r["native"].get("available"):
        assert r["native_ops"]["topk_select[CPU]"] and r["native_ops"]["gather_masked[CPU]"]


def test_env_subcommand_of_the_cli(capsys):
    from fishkern.cli import main

    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text and "native extension:" in text and "backends:" in text


def test_every_source_file_in_csrc_is_built(tmp_path):
    """A new csrc/*.cpp is part of the build without an edit of the build config; CUDA files
    (*.cu, *cuda*.cpp) only with CUDA; an added or removed file changes the sources digest."""
    src = tmp_path / "csrc"
    src.mkdir()
    for name in ("a_cpu.cpp", "new_op.cpp", "x_cuda_binding.cpp", "x_cuda.cu", "x_cuda.h", "notes.md"):
        (src / name).write_text(f"// {name}\n")
    cpu, cuda, headers = cfg.list_sources(str(src))
    assert cpu == ("a_cpu.cpp", "new_op.cpp") and cuda == ("x_cuda.cu", "x_cuda_binding.cpp") and headers == ("x_cuda.h",)
    d1 = cfg.sources_digest(str(src))
    (src / "another.cpp").write_text("")
    d2 = cfg.sources_digest(str(src))
    (src / "new_op.cpp").unlink()
    assert len({d1, d2, cfg.sources_digest(str(src))}) == 3
    # the checkout's own csrc/: every C++ file is in one of the lists
    here = _native.csrc_dir()
    on_disk = {n for n in os.listdir(here) if n.endswith((".cpp", ".cu"))}
    assert on_disk == set(cfg.CPU_SOURCES + cfg.CUDA_SOURCES) and set(cfg.CPU_SOURCES) & set(cfg.CUDA_SOURCES) == set()
    assert cfg.plan_build({}, None, None, None, 0).sources == list(cfg.CPU_SOURCES)


_DECLARED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import torch
    from fishkern import _native
    _native.native_info()  # what require_native() does: afterwards the library's ops exist
    for name in ("topk_select", "gather_masked", "scatter_masked_"):
        assert hasattr(torch.ops.fishkern, name), name
    print("ok")
""")


@pytest.mark.parametrize("no_native", ["0", "1"])
def test_loading_declares_every_op_the_library_implements(no_native):
    env = {**os.environ, "FISHKERN_NO_NATIVE": no_native}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _DECLARED.format(root=root)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
