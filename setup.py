"""Build script: the pure-Python package, the native sources (shipped as fishkern/_csrc so the
extension can be compiled on first use), and — when torch is importable at build time — the native
extension ``fishkern._C`` itself.

Which kernels get built, with which flags and CUDA archs, is decided in fishkern/_build_config.py
(shared with the just-in-time build of fishkern/_native.py) and printed in the build log:
- torch without CUDA, or no CUDA toolkit: the CPU kernels.
- torch with CUDA and a matching nvcc: the CUDA kernels too (archs of the visible GPUs, or sm_80 and
  sm_90 (+ sm_100) with PTX when none is visible; TORCH_CUDA_ARCH_LIST overrides).
- torch not importable (pip's build isolation): no extension now; fishkern compiles it on first use
  against the torch it runs with, and caches it. Build it now with
  ``pip install --no-build-isolation .`` (or ``-e .``) after installing torch.
- FISHKERN_NO_NATIVE=1: no extension, now or later (plain-PyTorch paths). FISHKERN_NO_CUDA=1: CPU part only.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    # by path: the package itself (and torch) may not be importable in the build environment
    spec = importlib.util.spec_from_file_location("_fishkern_build_config", os.path.join(HERE, "fishkern", "_build_config.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


cfg = _load_build_config()


def say(msg: str) -> None:
    # pip shows a build's output only with -v; stderr of a failing build is always shown
    print(f"fishkern: {msg}", flush=True)


def native_build():
    if cfg.env_flag(os.environ, "FISHKERN_NO_NATIVE"):
        say("FISHKERN_NO_NATIVE is set: no native extension (plain-PyTorch paths only)")
        return [], {}
    try:
        import torch
    except ImportError:
        say("torch is not importable in this build environment (pip's build isolation, or torch not installed "
            "yet): the native extension is not built now; fishkern compiles it on first use against the torch "
            "it runs with (about a minute, cached). To build it at install: install torch, then "
            "`pip install --no-build-isolation .`")
        return [], {}
    cuda_home = None
    if torch.version.cuda is not None and not cfg.env_flag(os.environ, "FISHKERN_NO_CUDA"):
        cuda_home = cfg.resolve_cuda_home(os.environ, shutil.which("nvcc"))
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it (its own guess may lack headers)
    from torch.utils import cpp_extension

    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home
    nvcc, _ = cfg.nvcc_version(cuda_home)
    visible = torch.cuda.device_count() if torch.version.cuda is not None else 0
    plan = cfg.plan_build(os.environ, torch.version.cuda, cuda_home, nvcc, visible)
    for note in plan.notes:
        say(note)
    if plan.arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list
    sources = [os.path.join("csrc", s) for s in plan.sources]
    if plan.with_cuda:
        ext = cpp_extension.CUDAExtension(cfg.EXTENSION_NAME, sources,
                                          extra_compile_args={"cxx": plan.cxx, "nvcc": plan.nvcc},
                                          extra_link_args=plan.ldflags)
    else:
        ext = cpp_extension.CppExtension(cfg.EXTENSION_NAME, sources, extra_compile_args={"cxx": plan.cxx},
                                         extra_link_args=plan.ldflags)
    say(f"building the native extension ({plan.kind}) against torch {torch.__version__}")
    base = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)

    class BuildWithInfo(base):
        """Writes what the library was built against next to it, so that a later torch is noticed
        before the library is loaded (a mismatched ABI can crash instead of failing to load)."""

        def run(self):
            super().run()
            info = cfg.build_info(plan, torch.__version__, torch.version.cuda, "install",
                                  cfg.sources_digest(os.path.join(HERE, "csrc")))
            lib = self.get_ext_fullpath(cfg.EXTENSION_NAME)
            cfg.write_build_info(os.path.join(os.path.dirname(lib), cfg.BUILD_INFO_FILE), info)
            if self.inplace:
                return
            # the wheel's copy: build_py may have run before this file existed
            build_lib_pkg = os.path.join(self.build_lib, "fishkern")
            if os.path.isdir(build_lib_pkg):
                cfg.write_build_info(os.path.join(build_lib_pkg, cfg.BUILD_INFO_FILE), info)

    return [ext], {"build_ext": BuildWithInfo}


ext_modules, cmdclass = native_build()
setup(
    packages=find_packages(include=["fishkern", "fishkern.*"]) + ["fishkern._csrc"],
    # csrc/ travels inside the package as fishkern/_csrc, for the first-use build of installs without one
    package_dir={"fishkern._csrc": "csrc"},
    package_data={"fishkern._csrc": ["*.cpp", "*.cu", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
