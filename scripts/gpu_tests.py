"""Run (or list) only the tests that touch CUDA or Triton: stage 02 of scripts/gpu_check.sh.

    python scripts/gpu_tests.py                 run them (pytest-xdist and pytest-timeout used when installed)
    python scripts/gpu_tests.py --list          collect only: print and write the selection
    python scripts/gpu_tests.py -- -k topk      extra pytest arguments after --

A test is selected when any of these holds, on the machine that runs it (the ids differ: the Triton
tests are parametrised over tests.conftest.triton_devices(), "cuda" on a GPU machine, "cpu" here):
  - it carries the marker `cuda` or `triton` (registered in pyproject.toml);
  - its id names cuda (a device parametrisation, e.g. tests/ops/test_topk.py's DEVICES);
  - its function's source mentions cuda or triton (e.g. `device = "cuda" if ...`, requires_triton).
A test that reaches the GPU only through a helper and says none of this is missed; marking it
`cuda` fixes that.

The selection is a pytest plugin (this module, loaded with `-p gpu_tests`), so pytest-xdist's
workers apply the same one. The list ("<node id>\\t<reasons>") goes to --out.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SELECT_ENV = "FISHKERN_GPU_TESTS_SELECT"
OUT_ENV = "FISHKERN_GPU_TESTS_OUT"
MARKERS = ("cuda", "triton")
SOURCE_RE = re.compile(r"cuda|triton", re.IGNORECASE)


def reasons_for(item) -> list[str]:
    """Why a collected test counts as touching CUDA / Triton (empty: it does not)."""
    why = [f"marker:{m}" for m in MARKERS if item.get_closest_marker(m) is not None]
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "cuda" in callspec.id.lower():
        why.append("param:cuda")
    fn = getattr(item, "function", None)
    if fn is not None:
        try:
            src = inspect.getsource(fn)
        except (OSError, TypeError):
            src = ""
        if SOURCE_RE.search(src):
            why.append("source")
    return why


# ---------------------------------------------------------------------------------- pytest plugin

def pytest_collection_modifyitems(session, config, items):
    if os.environ.get(SELECT_ENV) != "1":
        return
    keep, drop, lines = [], [], []
    for item in items:
        why = reasons_for(item)
        (keep if why else drop).append(item)
        if why:
            lines.append(f"{item.nodeid}\t{','.join(why)}")
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    out = os.environ.get(OUT_ENV)
    # one writer: the plain process, or xdist's first worker (all workers collect the same)
    if out and os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("".join(line + "\n" for line in lines))
        per_file = collections.Counter(line.split("::", 1)[0] for line in lines)
        print(f"\ngpu_tests: {len(keep)} of {len(keep) + len(drop)} tests selected "
              f"({', '.join(f'{Path(f).name}: {n}' for f, n in sorted(per_file.items()))})", flush=True)


# ------------------------------------------------------------------------------------------ driver

def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def build_command(list_only: bool, extra: list[str], workers: int, paths: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "gpu_tests", "-p", "no:cacheprovider"]
    if list_only:
        cmd += ["--collect-only", "-q"]
    else:
        cmd += ["-q", "-rfEs", "--durations=15"]
        if workers > 1 and has_module("xdist"):
            cmd += ["-n", str(workers)]
        if has_module("pytest_timeout"):
            cmd += ["--timeout", "90"]  # one hung test must not eat the whole stage
    return cmd + extra + paths


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="collect only: print and write the selection")
    ap.add_argument("--out", default=str(ROOT / "out" / "gpu" / "gpu_tests.txt"), help="where the selected ids go")
    ap.add_argument("--workers", type=int, default=min(4, max(1, (os.cpu_count() or 1) // 4)),
                    help="pytest-xdist workers when it is installed (default: cores/4, at most 4)")
    ap.add_argument("--paths", nargs="+", default=["tests"], help="what pytest collects (default: tests)")
    args = ap.parse_args(argv)
    # not inherited from a pytest-xdist worker that runs this script (tests/project/test_gpu_script.py):
    # the plugin would take the child for that worker and, unless it is gw0, write no list
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env[SELECT_ENV] = "1"
    env[OUT_ENV] = str(Path(args.out).resolve())
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "scripts"), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    Path(args.out).unlink(missing_ok=True)
    cmd = build_command(args.list, extra, args.workers, args.paths)
    print("gpu_tests:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    out = Path(args.out)
    n = len(out.read_text().splitlines()) if out.exists() else 0
    print(f"gpu_tests: {n} tests selected, listed in {out}; pytest exit status {rc}")
    if args.list:
        if rc == 0 and n == 0:
            print("gpu_tests: the selection is empty: the selection rules no longer match the tests")
            return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
