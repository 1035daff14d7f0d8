"""Build script: the pure-Python package plus the native extension ``fishkern._C`` (csrc/).

- torch without CUDA (or no nvcc): a C++ extension with the CPU kernels.
- torch with CUDA and nvcc (CUDA_HOME): also the .cu kernels and their torch binding.
- FISHKERN_NO_NATIVE=1 skips the native build; fishkern then imports and works, and a native op
  fails with a message that says how to build it. FISHKERN_NO_CUDA=1 builds the CPU part only.

Build with the torch you run (no build isolation): ``pip install --no-build-isolation -e .``.
"""
import glob
import os

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def native_build():
    if _flag("FISHKERN_NO_NATIVE"):
        print("fishkern: FISHKERN_NO_NATIVE is set, skipping the native extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fishkern: torch is not importable at build time, skipping the native extension "
              "(install torch first, then `pip install --no-build-isolation -e .`)")
        return [], {}
    sources = ["csrc/ops.cpp", "csrc/topk_cpu.cpp", "csrc/masked_copy_cpu.cpp"]
    # at::parallel_for is inlined from torch's headers and uses OpenMP pragmas
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _flag("FISHKERN_NO_CUDA")
    if with_cuda:
        sources += sorted(glob.glob("csrc/*.cu")) + ["csrc/topk_cuda_binding.cpp"]
        ext = CUDAExtension("fishkern._C", sources, extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("fishkern._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    print(f"fishkern: building the native extension ({'CPU + CUDA' if with_cuda else 'CPU'})")
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = native_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
