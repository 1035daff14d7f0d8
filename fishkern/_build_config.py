"""How fishkern's native extension is built: sources, flags, CUDA arch list, nvcc/torch checks.

One plan for both ways the extension gets built — at install time (setup.py loads this file by
path, before the package is importable) and just in time on first use (fishkern/_native.py) — so
the two never disagree. Standard library only, and the decisions are plain functions of their
inputs, so the tests check them without a compiler or a GPU.

Decisions:
- Sources: every ``*.cpp`` / ``*.cu`` in csrc/ is built (``list_sources``: ``*.cu`` and ``*cuda*.cpp``
  only with CUDA), so a new kernel file is picked up without an edit here, and the sources digest
  covers every file there (an added or removed file means another build).
- No ``-std=`` flag: torch's ``cpp_extension`` adds the standard its headers need (C++17 up to
  torch 2.13, C++20 from 2.14); a hard-coded one breaks the build on the other side of that line.
- CUDA arch list: ``TORCH_CUDA_ARCH_LIST`` when set; else, when a GPU is visible, torch's own choice
  (the visible GPUs); else (a Docker build, a login node, CI) the GPUs users train on — sm_80
  (A100; its code also runs on sm_86/sm_89), sm_90 (H100/H200), sm_100 (B200) when nvcc knows it,
  and sm_75 (T4), plus PTX of the newest for anything later. torch itself raises IndexError there
  (also for TORCH_CUDA_ARCH_LIST=native with no GPU, which is treated as unset).
- nvcc and torch's CUDA must have the same major version (torch refuses otherwise); on a mismatch
  the CUDA kernels are skipped with a message that says what to install, and the CPU part is built.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field

SOURCE_SUFFIXES = (".cpp", ".cu", ".h")  # what csrc/ holds; MANIFEST.in and setup.py's package_data ship the same


def find_csrc(package_dir: str) -> str | None:
    """The native sources: fishkern/_csrc in an installed package, csrc/ beside the package in a
    checkout (or an sdist being built)."""
    for d in (os.path.join(package_dir, "_csrc"), os.path.join(os.path.dirname(package_dir), "csrc")):
        if os.path.isdir(d) and any(n.endswith(".cpp") for n in os.listdir(d)):
            return d
    return None


def list_sources(csrc_dir: str | None) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(CPU sources, CUDA sources, headers) in `csrc_dir`, by file name, sorted.

    Every file is built, so a new kernel file needs no edit here: ``*.cu`` and ``*cuda*.cpp`` (the
    host bindings, which include CUDA headers) are built only with CUDA; every other ``*.cpp`` is
    part of the CPU build; ``*.h`` are headers (hashed into the sources digest, not compiled)."""
    if csrc_dir is None or not os.path.isdir(csrc_dir):
        return (), (), ()
    names = sorted(n for n in os.listdir(csrc_dir) if n.endswith(SOURCE_SUFFIXES)
                   and os.path.isfile(os.path.join(csrc_dir, n)))
    cuda = tuple(n for n in names if n.endswith(".cu") or (n.endswith(".cpp") and "cuda" in n))
    cpu = tuple(n for n in names if n.endswith(".cpp") and n not in cuda)
    headers = tuple(n for n in names if n.endswith(".h"))
    return cpu, cuda, headers


CSRC_DIR = find_csrc(os.path.dirname(os.path.abspath(__file__)))
CPU_SOURCES, CUDA_SOURCES, HEADERS = list_sources(CSRC_DIR)
EXTENSION_NAME = "fishkern._C"
BUILD_INFO_FILE = "_C.build.json"  # written next to a built library: what it was built against

ARCHS_WITHOUT_GPU = ("7.5", "8.0", "9.0")  # T4 (still on many clouds), A100 (+A10/L4/RTX), H100/H200
BLACKWELL_ARCH = "10.0"
BLACKWELL_MIN_NVCC = (12, 8)


def env_flag(env, name: str) -> bool:
    return env.get(name, "0") not in ("", "0")


def cxx_flags(platform: str = sys.platform) -> list[str]:
    # at::parallel_for is inlined from torch's headers and uses OpenMP pragmas (Apple's clang has
    # no -fopenmp; torch's parallel_for then runs on its own thread pool)
    return ["-O3"] if platform == "darwin" else ["-O3", "-fopenmp"]


def link_flags(platform: str = sys.platform) -> list[str]:
    return [] if platform == "darwin" else ["-fopenmp"]


def nvcc_flags() -> list[str]:
    return ["-O3"]


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from `nvcc --version` output ("... release 13.0, V13.0.88")."""
    m = re.search(r"release (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_cuda_version(text: str | None) -> tuple[int, int] | None:
    """(major, minor) of torch.version.cuda ("13.2"), None for a CPU build."""
    if not text:
        return None
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def nvcc_version(cuda_home: str | None) -> tuple[tuple[int, int] | None, str | None]:
    """(version, path) of the nvcc torch's cpp_extension would use, or (None, None)."""
    if not cuda_home:
        return None, None
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return None, None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None, nvcc
    return parse_nvcc_version(out), nvcc


def _is_toolkit(root: str) -> bool:
    return (os.path.exists(os.path.join(root, "bin", "nvcc"))
            and os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")))


def resolve_cuda_home(env, nvcc_on_path: str | None) -> str | None:
    """The CUDA toolkit to build with: CUDA_HOME / CUDA_PATH when set, else /usr/local/cuda, else the
    directory above `nvcc` on the PATH — the first that has both bin/nvcc and the CUDA headers.

    torch guesses the directory above `nvcc` on the PATH first; when that nvcc is a wrapper script
    (/usr/local/bin/nvcc) the guess (/usr/local) has no CUDA headers and the build fails late."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return env[var]  # the user's choice, even if broken: the build then says what is missing
    candidates = ["/usr/local/cuda"]
    if nvcc_on_path:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc_on_path))))
        candidates.append(os.path.dirname(os.path.dirname(nvcc_on_path)))
    for root in candidates:
        if _is_toolkit(root):
            return root
    return None


def default_arch_list(nvcc: tuple[int, int] | None) -> str:
    """TORCH_CUDA_ARCH_LIST for a build with no GPU visible: sm_75, sm_80, sm_90 (+ sm_100), PTX of the last."""
    archs = list(ARCHS_WITHOUT_GPU)
    if nvcc is not None and nvcc >= BLACKWELL_MIN_NVCC:
        archs.append(BLACKWELL_ARCH)
    archs[-1] += "+PTX"
    return ";".join(archs)


def choose_arch_list(env_value: str | None, visible_gpus: int, nvcc: tuple[int, int] | None) -> tuple[str | None, str]:
    """(TORCH_CUDA_ARCH_LIST to set, or None to leave torch's choice; why)."""
    if env_value and not (env_value == "native" and visible_gpus == 0):  # "native" needs a GPU to look at
        return None, f"TORCH_CUDA_ARCH_LIST={env_value} (from the environment)"
    if visible_gpus > 0:
        return None, f"the {visible_gpus} visible GPU(s) (torch's choice; set TORCH_CUDA_ARCH_LIST to build for others)"
    archs = default_arch_list(nvcc)
    return archs, f"TORCH_CUDA_ARCH_LIST={archs} (no GPU visible; set TORCH_CUDA_ARCH_LIST to choose others)"


def cuda_mismatch(torch_cuda: tuple[int, int] | None, nvcc: tuple[int, int] | None) -> str | None:
    """Why nvcc cannot build for this torch (None when it can)."""
    if torch_cuda is None or nvcc is None:
        return None
    if torch_cuda[0] != nvcc[0]:
        return (f"nvcc is CUDA {nvcc[0]}.{nvcc[1]} but torch was built with CUDA {torch_cuda[0]}.{torch_cuda[1]}; "
                f"the major versions must match (install CUDA {torch_cuda[0]}.x and point CUDA_HOME at it, or a torch "
                f"build for CUDA {nvcc[0]})")
    return None


@dataclass
class BuildPlan:
    with_cuda: bool
    sources: list[str]  # file names inside csrc/
    cxx: list[str]
    nvcc: list[str]
    ldflags: list[str]
    arch_list: str | None = None  # TORCH_CUDA_ARCH_LIST to set for the build (None: leave as is)
    notes: list[str] = field(default_factory=list)  # one line each, printed in the build log

    @property
    def kind(self) -> str:
        return "CPU + CUDA" if self.with_cuda else "CPU"


def plan_build(env, torch_cuda: str | None, cuda_home: str | None, nvcc: tuple[int, int] | None,
               visible_gpus: int, platform: str = sys.platform) -> BuildPlan:
    """What to build, from the facts: torch.version.cuda, CUDA_HOME, the nvcc version, visible GPUs."""
    plan = BuildPlan(with_cuda=False, sources=list(CPU_SOURCES), cxx=cxx_flags(platform), nvcc=nvcc_flags(),
                     ldflags=link_flags(platform))
    tc = parse_cuda_version(torch_cuda)
    if tc is None:
        plan.notes.append("torch is a CPU build: building the CPU kernels")
        return plan
    if env_flag(env, "FISHKERN_NO_CUDA"):
        plan.notes.append("FISHKERN_NO_CUDA is set: building the CPU kernels only")
        return plan
    if not cuda_home:
        plan.notes.append(f"torch has CUDA {torch_cuda} but no CUDA toolkit (nvcc) was found (set CUDA_HOME): "
                          "building the CPU kernels only; CUDA scores use the PyTorch top-k")
        return plan
    why = cuda_mismatch(tc, nvcc)
    if why:
        plan.notes.append(f"NOT building the CUDA kernels: {why}; building the CPU kernels only")
        return plan
    plan.with_cuda = True
    plan.sources += list(CUDA_SOURCES)
    plan.arch_list, reason = choose_arch_list(env.get("TORCH_CUDA_ARCH_LIST"), visible_gpus, nvcc)
    nv = f"nvcc {nvcc[0]}.{nvcc[1]}" if nvcc else "nvcc"
    plan.notes.append(f"building the CPU and CUDA kernels with {nv} for torch's CUDA {torch_cuda}; archs: {reason}")
    return plan


def sources_digest(csrc_dir: str) -> str:
    """A short hash of every native source file in `csrc_dir` (names and contents): a cached build is
    reused only for the same sources."""
    h = hashlib.sha256()
    cpu, cuda, headers = list_sources(csrc_dir)  # the files there now: an added or removed file counts
    for name in sorted(cpu + cuda + headers):
        h.update(name.encode() + b"\0")
        with open(os.path.join(csrc_dir, name), "rb") as f:
            data = f.read()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:12]


def build_info(plan: BuildPlan, torch_version: str, torch_cuda: str | None, how: str, digest: str) -> dict:
    """What a built library records about itself (BUILD_INFO_FILE)."""
    return {"torch": torch_version, "torch_cuda": torch_cuda, "with_cuda": plan.with_cuda,
            "arch_list": plan.arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST"), "how": how,
            "sources": digest, "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "plan": asdict(plan)}


def write_build_info(path: str, info: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_build_info(path: str) -> dict | None:
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None
