"""The build decisions of fishkern/_build_config.py (shared by setup.py and the first-use build):
arch list, flags, nvcc/torch CUDA checks, toolkit discovery. No compiler or GPU needed."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from fishkern import _build_config as cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_no_hard_coded_language_standard():
    # torch's cpp_extension adds -std=c++17 (torch <= 2.13) or -std=c++20 (2.14+) when none is given
    for flags in (cfg.cxx_flags("linux"), cfg.cxx_flags("darwin"), cfg.nvcc_flags()):
        assert not [f for f in flags if f.startswith("-std")]
    plan = cfg.plan_build({}, "13.0", "/cuda", (13, 0), 0)
    assert not [f for f in plan.cxx + plan.nvcc if f.startswith("-std")]
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert "-std=" not in f.read()


def test_openmp_only_where_the_compiler_has_it():
    assert "-fopenmp" in cfg.cxx_flags("linux") and "-fopenmp" in cfg.link_flags("linux")
    assert "-fopenmp" not in cfg.cxx_flags("darwin") and not cfg.link_flags("darwin")


@pytest.mark.parametrize("text,expected", [
    ("Cuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0.r13.0/compiler", (13, 0)),
    ("nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131", (12, 4)),
    ("no version here", None),
])
def test_parse_nvcc_version(text, expected):
    assert cfg.parse_nvcc_version(text) == expected


def test_parse_torch_cuda_version():
    assert cfg.parse_cuda_version("13.2") == (13, 2)
    assert cfg.parse_cuda_version("12.1") == (12, 1)
    assert cfg.parse_cuda_version(None) is None
    assert cfg.parse_cuda_version("") is None


@pytest.mark.parametrize("nvcc,expected", [
    ((13, 0), "7.5;8.0;9.0;10.0+PTX"),
    ((12, 8), "7.5;8.0;9.0;10.0+PTX"),
    ((12, 4), "7.5;8.0;9.0+PTX"),
    (None, "7.5;8.0;9.0+PTX"),
])
def test_default_arch_list_without_a_gpu(nvcc, expected):
    archs = cfg.default_arch_list(nvcc)
    assert archs == expected
    assert archs.startswith("7.5;8.0;9.0") and archs.endswith("+PTX")


def test_arch_list_choice():
    # the user's list wins and is left for torch to read
    archs, why = cfg.choose_arch_list("8.6", visible_gpus=0, nvcc=(13, 0))
    assert archs is None and "8.6" in why and "environment" in why
    # visible GPUs: torch picks their archs
    archs, why = cfg.choose_arch_list(None, visible_gpus=2, nvcc=(13, 0))
    assert archs is None and "2 visible GPU" in why
    # none visible, none asked for: the default list, said in the build log
    archs, why = cfg.choose_arch_list(None, visible_gpus=0, nvcc=(12, 4))
    assert archs == "7.5;8.0;9.0+PTX" and "no GPU visible" in why and "7.5;8.0;9.0+PTX" in why
    archs, _ = cfg.choose_arch_list("", visible_gpus=0, nvcc=(12, 4))  # empty counts as unset
    assert archs == "7.5;8.0;9.0+PTX"
    # "native" with no GPU to look at would make torch raise IndexError: treated as unset
    archs, why = cfg.choose_arch_list("native", visible_gpus=0, nvcc=(12, 4))
    assert archs == "7.5;8.0;9.0+PTX" and "no GPU visible" in why
    assert cfg.choose_arch_list("native", visible_gpus=1, nvcc=(12, 4))[0] is None


def test_cuda_version_mismatch_message():
    assert cfg.cuda_mismatch((13, 2), (13, 0)) is None  # minor differences build (torch warns)
    assert cfg.cuda_mismatch(None, (13, 0)) is None
    assert cfg.cuda_mismatch((12, 1), None) is None
    why = cfg.cuda_mismatch((12, 1), (13, 0))
    assert "nvcc is CUDA 13.0" in why and "torch was built with CUDA 12.1" in why and "CUDA_HOME" in why


def test_plan_cpu_torch():
    plan = cfg.plan_build({}, None, "/usr/local/cuda", (13, 0), 0)
    assert not plan.with_cuda and plan.sources == list(cfg.CPU_SOURCES) and plan.arch_list is None
    assert plan.kind == "CPU" and "CPU build" in plan.notes[0]


def test_plan_cuda_torch_without_a_gpu_sets_the_default_archs():
    plan = cfg.plan_build({}, "13.2", "/usr/local/cuda", (13, 0), 0)
    assert plan.with_cuda and plan.kind == "CPU + CUDA"
    assert set(cfg.CUDA_SOURCES) <= set(plan.sources) and set(cfg.CPU_SOURCES) <= set(plan.sources)
    assert plan.arch_list == "7.5;8.0;9.0;10.0+PTX"
    assert "no GPU visible" in plan.notes[0] and "nvcc 13.0" in plan.notes[0]


def test_plan_cuda_torch_with_gpus_or_a_user_list_leaves_archs_alone():
    assert cfg.plan_build({}, "13.2", "/cuda", (13, 0), 1).arch_list is None
    plan = cfg.plan_build({"TORCH_CUDA_ARCH_LIST": "9.0"}, "13.2", "/cuda", (13, 0), 0)
    assert plan.with_cuda and plan.arch_list is None and "TORCH_CUDA_ARCH_LIST=9.0" in plan.notes[0]


def test_plan_mismatch_builds_the_cpu_part_and_says_why():
    plan = cfg.plan_build({}, "12.1", "/usr/local/cuda", (13, 0), 0)
    assert not plan.with_cuda and plan.sources == list(cfg.CPU_SOURCES)
    assert "NOT building the CUDA kernels" in plan.notes[0] and "12.1" in plan.notes[0]


def test_plan_switches():
    plan = cfg.plan_build({"FISHKERN_NO_CUDA": "1"}, "13.0", "/cuda", (13, 0), 0)
    assert not plan.with_cuda and "FISHKERN_NO_CUDA" in plan.notes[0]
    plan = cfg.plan_build({"FISHKERN_NO_CUDA": "0"}, "13.0", "/cuda", (13, 0), 0)
    assert plan.with_cuda
    plan = cfg.plan_build({}, "13.0", None, None, 0)
    assert not plan.with_cuda and "no CUDA toolkit" in plan.notes[0]


def _toolkit(root, headers=True):
    os.makedirs(os.path.join(root, "bin"))
    open(os.path.join(root, "bin", "nvcc"), "w").close()
    if headers:
        os.makedirs(os.path.join(root, "include"))
        open(os.path.join(root, "include", "cuda_runtime_api.h"), "w").close()


def test_resolve_cuda_home(tmp_path, monkeypatch):
    real = str(tmp_path / "cuda-13.0")
    _toolkit(real)
    wrapper_dir = tmp_path / "local"
    _toolkit(str(wrapper_dir), headers=False)  # /usr/local/bin/nvcc is a wrapper script: no headers above it
    assert cfg.resolve_cuda_home({"CUDA_HOME": "/my/cuda"}, None) == "/my/cuda"  # the user's choice
    assert cfg.resolve_cuda_home({"CUDA_PATH": "/p"}, None) == "/p"
    monkeypatch.setattr(cfg, "_is_toolkit", lambda root, _orig=cfg._is_toolkit: root != "/usr/local/cuda" and _orig(root))
    # a wrapper on the PATH whose directory has no headers is skipped; a symlink is followed
    link = tmp_path / "bin-link"
    os.makedirs(link)
    os.symlink(os.path.join(real, "bin", "nvcc"), link / "nvcc")
    assert cfg.resolve_cuda_home({}, str(wrapper_dir / "bin" / "nvcc")) is None
    assert cfg.resolve_cuda_home({}, str(link / "nvcc")) == real
    assert cfg.resolve_cuda_home({}, None) is None


def test_build_info_round_trip_and_sources_digest(tmp_path):
    plan = cfg.plan_build({}, None, None, None, 0)
    src = tmp_path / "csrc"
    src.mkdir()
    for name in cfg.CPU_SOURCES:
        (src / name).write_text(f"// {name}\n")
    d1 = cfg.sources_digest(str(src))
    info = cfg.build_info(plan, "2.13.0+cpu", None, "install", d1)
    path = str(tmp_path / cfg.BUILD_INFO_FILE)
    cfg.write_build_info(path, info)
    assert cfg.read_build_info(path) == info
    (src / "ops.cpp").write_text("// changed\n")
    assert cfg.sources_digest(str(src)) != d1  # a changed source is a different cached build
    (tmp_path / "bad.json").write_text("[1, 2")
    assert cfg.read_build_info(str(tmp_path / "bad.json")) is None
    assert cfg.read_build_info(str(tmp_path / "missing.json")) is None


def test_setup_py_loads_the_config_without_the_package(tmp_path):
    # setup.py must not import fishkern (or torch) to read its build plan: it loads the file by path
    with open(os.path.join(ROOT, "setup.py")) as f:
        text = f.read()
    assert "spec_from_file_location" in text and "import fishkern" not in text
    spec = importlib.util.spec_from_file_location("_cfg_copy", os.path.join(ROOT, "fishkern", "_build_config.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        assert "torch" not in mod.__dict__  # standard library only
        assert mod.default_arch_list((13, 0)) == "7.5;8.0;9.0;10.0+PTX"
    finally:
        del sys.modules[spec.name]


def test_the_shipped_sources_are_the_ones_the_plan_names():
    csrc = os.path.join(ROOT, "csrc")
    on_disk = {n for n in os.listdir(csrc) if n.endswith((".cpp", ".cu", ".h"))}
    assert on_disk == set(cfg.CPU_SOURCES + cfg.CUDA_SOURCES + cfg.HEADERS)
    with open(os.path.join(ROOT, "MANIFEST.in")) as f:
        manifest = f.read()
    assert "recursive-include csrc *.cpp *.cu *.h" in manifest
