"""Loads the native extension ``fishkern._C`` (csrc/) on first use, never at import time.

Where the library comes from, in order:
1. the one built at install (``pip install --no-build-isolation ...``), next to this file — used
   only when it was built against the running torch (its ``_C.build.json`` says which; a library
   for another torch can crash rather than fail to load, so it is not even tried);
2. otherwise a just-in-time build of the shipped sources against the running torch, cached per
   torch / CUDA / Python / sources in ``$FISHKERN_CACHE_DIR`` (default ``~/.cache/fishkern``), with a
   message that says what is happening, and a file lock so that two processes never build at once
   (the second waits and loads the first one's library);
3. nothing, when ``FISHKERN_NO_NATIVE=1``, when ``FISHKERN_NO_JIT=1`` forbids the build, or when the
   build fails (no compiler): every op still exists (they are declared in Python, see
   fishkern/ops/library.py) and runs its plain-PyTorch default kernel; ``global_topk`` says so once.

The library only adds kernels to ops declared in Python. The op wrappers call ``ensure_loaded()``
before they dispatch, so the native kernels are registered before their first use without
``import fishkern`` loading (or building) anything. ``native_info()`` tells which of the three
happened, for ``fishkern env`` and bug reports.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import asdict

import torch

from . import _build_config as cfg
from ._version import __version__

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the fishkern source tree, or let fishkern "
    "build it on first use (needs a C++ compiler and ninja; unset FISHKERN_NO_NATIVE and FISHKERN_NO_JIT)"
)


class NativeExtensionMissing(RuntimeError):
    """The compiled extension fishkern._C is not available in this installation."""


class NativeInfo:
    """What was loaded (path, how) or why nothing was (reason)."""

    def __init__(self, path: str | None, how: str, reason: str = "", build: dict | None = None):
        self.path, self.how, self.reason, self.build = path, how, reason, build or {}

    @property
    def available(self) -> bool:
        return self.path is not None

    def as_dict(self) -> dict:
        return {"available": self.available, "path": self.path, "how": self.how, "reason": self.reason,
                "build": self.build}


def _say(msg: str) -> None:
    print(f"fishkern: {msg}", file=sys.stderr, flush=True)


def _disabled(name: str) -> bool:
    return cfg.env_flag(os.environ, name)


def csrc_dir() -> str | None:
    """The native sources: fishkern/_csrc in an installed package, csrc/ beside it in a checkout."""
    return cfg.find_csrc(HERE)


def _prebuilt() -> tuple[str | None, str]:
    """(path of an install-time library usable with this torch, why not when None)."""
    libs = sorted(glob.glob(os.path.join(HERE, "_C*.so")) + glob.glob(os.path.join(HERE, "_C*.pyd")))
    if not libs:
        return None, "no library was built at install"
    info = cfg.read_build_info(os.path.join(HERE, cfg.BUILD_INFO_FILE))
    if info is None:
        return libs[0], ""  # built before build info existed: try it, a failure to load falls through
    if info.get("torch") != torch.__version__:
        return None, f"the library at {libs[0]} was built against torch {info.get('torch')}, this is torch {torch.__version__}"
    src = csrc_dir()
    if src is not None and info.get("sources") and info["sources"] != cfg.sources_digest(src):
        return None, f"the library at {libs[0]} was built from other sources than those in {src} (rebuild it)"
    return libs[0], ""


def cache_root() -> str:
    root = os.environ.get("FISHKERN_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fishkern")
    return root


def _cuda_facts() -> tuple[str | None, tuple[int, int] | None, int]:
    cuda_home = None
    if torch.version.cuda is not None and not _disabled("FISHKERN_NO_CUDA"):
        cuda_home = cfg.resolve_cuda_home(os.environ, shutil.which("nvcc"))
    nvcc, _ = cfg.nvcc_version(cuda_home)
    # device_count() only asks the driver; it does not initialise a CUDA context
    visible = torch.cuda.device_count() if torch.version.cuda is not None else 0
    return cuda_home, nvcc, visible


def _visible_archs() -> list[str]:
    if torch.version.cuda is None:
        return []
    return sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def jit_build_dir(plan: cfg.BuildPlan, digest: str) -> str:
    """One cache entry per torch, Python, OS and CPU architecture (a shared home seen from x86-64 and
    aarch64 nodes), CUDA, build plan and archs (a build for the visible H100 is not one for an A100),
    and sources."""
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    cuda = f"cu{torch.version.cuda}" if plan.with_cuda else "cpu"
    archs = plan.arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or ",".join(_visible_archs())
    plan_key = hashlib.sha256(json.dumps([asdict(plan), archs if plan.with_cuda else ""], sort_keys=True).encode())
    machine = f"{sys.platform}-{platform.machine()}"
    tag = (f"fishkern-{__version__}-torch-{torch.__version__}-{py}-{machine}-{cuda}-{digest}-{plan_key.hexdigest()[:8]}"
           .replace("+", "_"))
    return os.path.join(cache_root(), "native", tag)


def _library_name(directory: str) -> str:
    return os.path.join(directory, "fishkern_C" + (".pyd" if sys.platform == "win32" else ".so"))


@contextlib.contextmanager
def _build_lock(directory: str):
    """An exclusive lock on `directory` held while building; freed by the OS if the process dies."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ".fishkern-build.lock")
    f = open(path, "a+")
    try:
        try:
            import fcntl
        except ImportError:  # Windows: cpp_extension's own baton is the only guard
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"another process is building the native extension in {directory}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (e.g. Lustre without -o flock)
            _say(f"cannot lock {directory} ({e}); building without a lock")
            yield
            return
        try:
            # cpp_extension's own 'lock' file is left behind by a killed build and then blocks forever;
            # holding our lock, nobody else is building here
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, "lock"))
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


def _jit_build() -> NativeInfo:
    src = csrc_dir()
    if src is None:
        return NativeInfo(None, "none", "the native sources (csrc/) are not in this installation")
    cuda_home, nvcc, visible = _cuda_facts()
    plan = cfg.plan_build(os.environ, torch.version.cuda, cuda_home, nvcc, visible)
    digest = cfg.sources_digest(src)
    directory = jit_build_dir(plan, digest)
    lib = _library_name(directory)
    info_path = os.path.join(directory, cfg.BUILD_INFO_FILE)
    with _build_lock(directory):
        info = cfg.read_build_info(info_path)
        if not (os.path.exists(lib) and info is not None):
            expect = "a few minutes" if plan.with_cuda else "about a minute"
            _say(f"compiling the native extension ({plan.kind}) for torch {torch.__version__} — first use only, "
                 f"{expect}; cached in {directory}")
            for note in plan.notes:
                _say(note)
            from torch.utils import cpp_extension

            if cuda_home:
                cpp_extension.CUDA_HOME = cuda_home
            old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
            if plan.arch_list:
                os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list
            t0 = time.perf_counter()
            try:
                cpp_extension.load(
                    name="fishkern_C", sources=[os.path.join(src, s) for s in plan.sources],
                    extra_cflags=plan.cxx, extra_cuda_cflags=plan.nvcc if plan.with_cuda else None,
                    extra_ldflags=plan.ldflags, build_directory=directory, with_cuda=plan.with_cuda,
                    is_python_module=False, verbose=_disabled("FISHKERN_VERBOSE_BUILD"),
                )
            except Exception as e:  # noqa: BLE001 - a compiler error, a missing ninja: report, fall back
                return NativeInfo(None, "none", f"the first-use build failed: {type(e).__name__}: {str(e)[-1500:]}")
            finally:
                if plan.arch_list:
                    if old_arch is None:
                        os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
                    else:
                        os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
            info = cfg.build_info(plan, torch.__version__, torch.version.cuda, "first use", digest)
            cfg.write_build_info(info_path, info)
            _say(f"native extension built in {time.perf_counter() - t0:.0f} s")
            return NativeInfo(lib, "first-use build", build=info)
    try:
        torch.ops.load_library(lib)
    except (OSError, RuntimeError) as e:  # a damaged cache entry: forget it, so that the next process rebuilds it
        with contextlib.suppress(OSError):
            os.remove(info_path)
        return NativeInfo(None, "none", f"the cached library {lib} failed to load ({e}); it is rebuilt next time")
    return NativeInfo(lib, "first-use build (cached)", build=info)


# The modules that declare the ops the library has kernels for (fishkern/ops/library.py's define).
_OP_MODULES = ("fishkern.topk.ops", "fishkern.ops.masked_copy")


@functools.cache
def native_info() -> NativeInfo:
    """Load the extension once per process (see the module docstring) and say how. Afterwards every
    op it implements is declared too (``torch.ops.fishkern.<op>`` exists), loaded or not."""
    info = _load()
    import importlib

    for name in _OP_MODULES:
        importlib.import_module(name)
    return info


def _load() -> NativeInfo:
    if _disabled("FISHKERN_NO_NATIVE"):
        return NativeInfo(None, "none", "FISHKERN_NO_NATIVE is set")
    path, why = _prebuilt()
    if path is not None:
        try:
            torch.ops.load_library(path)
            return NativeInfo(path, "built at install", build=cfg.read_build_info(os.path.join(HERE, cfg.BUILD_INFO_FILE)))
        except (OSError, RuntimeError) as e:  # built against another torch before build info existed; a
            why = f"the library at {path} failed to load ({e})"  # registration the dispatcher refused
    if _disabled("FISHKERN_NO_JIT"):
        return NativeInfo(None, "none", f"{why}; FISHKERN_NO_JIT forbids building it on first use")
    try:
        result = _jit_build()
    except Exception as e:  # noqa: BLE001 - an unwritable cache, ...: the plain-PyTorch paths still work
        result = NativeInfo(None, "none", f"the first-use build could not run: {type(e).__name__}: {e}")
    if not result.available:
        result.reason = f"{why}; {result.reason}"
    return result


def native_available() -> bool:
    return native_info().available


def ensure_loaded() -> bool:
    """Register the native kernels with the dispatcher if this installation has them; whether it
    does. Cheap after the first call (the attempt is made once per process: loading, or a first-use
    build); never raises — without the library every op runs its default kernel. Call it before
    dispatching a fishkern op (the wrappers in fishkern.topk and fishkern.ops do)."""
    global _LOAD_ERROR
    if _LOAD_ERROR is not None:
        return False
    try:
        return native_info().available
    except Exception as e:  # noqa: BLE001 - an unexpected failure still leaves the default kernels working
        _LOAD_ERROR = f"{type(e).__name__}: {e}"  # not retried: once per process
        return False


_LOAD_ERROR: str | None = None


_WARNED: set[str] = set()


def warn_fallback(op: str, detail: str) -> None:
    """Say once per op that a plain-PyTorch path replaces the native one, and why."""
    if op in _WARNED:
        return
    _WARNED.add(op)
    warnings.warn(f"fishkern: {op} runs its plain-PyTorch path (exact, slower): {detail}", RuntimeWarning, stacklevel=3)


def require_native(op: str) -> None:
    info = native_info()
    if not info.available:
        raise NativeExtensionMissing(f"{op} needs fishkern's native extension, which is not available: {info.reason}; "
                                     f"{BUILD_HINT}")
