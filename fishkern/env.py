"""``python -m fishkern.env`` / ``fishkern env``: what a bug report needs.

Versions (fishkern, Python, torch and its CUDA, triton, transformers, ...), the GPUs torch sees, the
CUDA toolkit a build would use, and which native ops and backends this installation has — where
the extension came from (built at install, built on first use, cached) or why there is none.

By default nothing is built: a missing extension is reported with what first use would do.
``--build`` builds (or loads) it now. ``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import sys

ENV_VARS = ("FISHKERN_NO_NATIVE", "FISHKERN_NO_CUDA", "FISHKERN_NO_JIT", "FISHKERN_CACHE_DIR", "TORCH_CUDA_ARCH_LIST",
            "CUDA_HOME", "CUDA_PATH", "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")
PACKAGES = ("torch", "triton", "numpy", "safetensors", "transformers", "datasets", "accelerate", "tqdm")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(build: bool = False) -> dict:
    import torch

    from . import _build_config as cfg
    from . import _native
    from ._version import __version__

    report: dict = {
        "fishkern": {"version": __version__, "location": os.path.dirname(os.path.abspath(__file__))},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": {"model": cpu_model(), "threads": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "packages": {p: _version(p) for p in PACKAGES},
        "env": {v: os.environ[v] for v in ENV_VARS if v in os.environ},
    }
    report["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                       "hip": getattr(torch.version, "hip", None), "debug": torch.version.debug}
    gpus = []
    if torch.version.cuda is not None:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2**30, 1)})
    report["gpus"] = gpus
    cuda_home = cfg.resolve_cuda_home(os.environ, shutil.which("nvcc"))
    nvcc, nvcc_path = cfg.nvcc_version(cuda_home)
    tc = cfg.parse_cuda_version(torch.version.cuda)
    report["cuda_toolkit"] = {"cuda_home": cuda_home, "nvcc": nvcc_path, "nvcc_version": ".".join(map(str, nvcc)) if nvcc else None,
                              "mismatch": cfg.cuda_mismatch(tc, nvcc)}
    plan = cfg.plan_build(os.environ, torch.version.cuda, cuda_home, nvcc, len(gpus))
    report["build_plan"] = {"kind": plan.kind, "arch_list": plan.arch_list, "notes": plan.notes}

    native: dict
    if build or _native.native_info.cache_info().currsize:
        native = _native.native_info().as_dict()
    else:
        path, why = _native._prebuilt()
        if cfg.env_flag(os.environ, "FISHKERN_NO_NATIVE"):
            native = {"available": False, "how": "none", "reason": "FISHKERN_NO_NATIVE is set"}
        elif path is not None:
            native = _native.native_info().as_dict()  # a library built at install: loading it builds nothing
        else:
            src = _native.csrc_dir()
            directory = _native.jit_build_dir(plan, cfg.sources_digest(src)) if src else None
            cached = bool(directory and os.path.exists(_native._library_name(directory))
                          and os.path.exists(os.path.join(directory, cfg.BUILD_INFO_FILE)))
            if cfg.env_flag(os.environ, "FISHKERN_NO_JIT"):
                first_use = "builds nothing (FISHKERN_NO_JIT is set): the plain-PyTorch paths run"
            elif not directory:
                first_use = "cannot build: the native sources are not in this installation"
            else:
                first_use = ("loads the cached build in " if cached else "builds into ") + directory
            native = {"available": None, "how": "not loaded", "reason": why, "first_use": first_use}
    report["native"] = native
    ops = {}
    if native.get("available"):
        for key in ("CPU", "CUDA"):
            ops[f"topk_select[{key}]"] = torch._C._dispatch_has_kernel_for_dispatch_key("fishkern::topk_select", key)
        ops["gather_masked[CPU]"] = torch._C._dispatch_has_kernel_for_dispatch_key("fishkern::gather_masked", "CPU")
    report["native_ops"] = ops
    cuda_ok = bool(gpus)
    if native.get("available") is None:  # not loaded yet: what the first-use build would give
        ops_then = {"topk_select[CPU]": True, "topk_select[CUDA]": plan.with_cuda, "gather_masked[CPU]": True}
        later = " (after the first-use build)"
    else:
        ops_then, later = ops, ""
    from .ops.triton_support import triton_status, triton_supported

    triton = "triton" if triton_supported() else f"torch ({triton_status()})"
    report["backends"] = {
        "global_topk": {"cpu": "native" + later if ops_then.get("topk_select[CPU]") else "torch (exact, slower)",
                        "cuda": ("native" + later if ops_then.get("topk_select[CUDA]") else "torch (exact, slower)")
                        if cuda_ok else "no GPU"},
        "masked optimizer step": {"cpu": "native gather/scatter" + later if ops_then.get("gather_masked[CPU]") else "torch indexing",
                                  "cuda": triton if cuda_ok else "no GPU"},
        "Fisher sequence-Linear kernel": triton if cuda_ok else "torch (CPU)",
    }
    return report


def render(r: dict) -> str:
    lines = [f"fishkern {r['fishkern']['version']} at {r['fishkern']['location']}",
             f"python {r['python']} on {r['platform']}",
             f"cpu: {r['cpu']['model']}, {r['cpu']['threads']} threads (torch uses {r['cpu']['torch_threads']})",
             f"torch {r['torch']['version']} (CUDA {r['torch']['cuda'] or 'none: a CPU build'})"]
    lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in r["packages"].items() if v and k != "torch")
                 + ("; not installed: " + ", ".join(k for k, v in r["packages"].items() if not v)
                    if any(not v for v in r["packages"].values()) else ""))
    lines.append("gpus: " + ("; ".join(f"{g['index']}: {g['name']} (sm_{g['capability'].replace('.', '')}, {g['memory_gib']} GiB)"
                                       for g in r["gpus"]) or "none visible"))
    ct = r["cuda_toolkit"]
    lines.append(f"CUDA toolkit: {ct['nvcc'] + ' (' + str(ct['nvcc_version']) + ')' if ct['nvcc'] else 'none found'}"
                 + (f" — {ct['mismatch']}" if ct["mismatch"] else ""))
    lines.append(f"a build now would be: {r['build_plan']['kind']}" + (f", archs {r['build_plan']['arch_list']}" if r["build_plan"]["arch_list"] else ""))
    for note in r["build_plan"]["notes"]:
        lines.append(f"  {note}")
    n = r["native"]
    if n.get("available"):
        lines.append(f"native extension: {n['how']}: {n['path']}")
        b = n.get("build") or {}
        if b:
            lines.append(f"  built against torch {b.get('torch')} ({'CPU + CUDA ' + str(b.get('arch_list') or '') if b.get('with_cuda') else 'CPU'})")
    elif n.get("available") is None:
        lines.append(f"native extension: not loaded ({n['reason']}); first use {n['first_use']}")
    else:
        lines.append(f"native extension: none ({n['reason']})")
    if r["native_ops"]:
        lines.append("native ops: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["native_ops"].items()))
    lines.append("backends:")
    for k, v in r["backends"].items():
        lines.append(f"  {k}: " + (", ".join(f"{d}: {b}" for d, b in v.items()) if isinstance(v, dict) else v))
    if r["env"]:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in r["env"].items()))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--build", action="store_true", help="build (or load) the native extension now if it is missing")


def run(args: argparse.Namespace) -> int:
    r = collect(build=args.build)
    print(json.dumps(r, indent=1, default=str) if args.json else render(r))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fishkern.env", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
