"""Small helpers for the runners' reports."""
from __future__ import annotations

import contextlib
import functools
import glob
import json
import math
import os
import subprocess
import tempfile
from pathlib import Path


def fmt_bytes(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Reports are replaced atomically (a temporary file in the same directory, fsync-ed, then
# os.replace): a crash, a full disk or a second writer leaves the previous file or the new one,
# never a truncated mix. Own helper rather than fishkern.diff's writer: that one publishes
# checkpoint files and its temp-file naming and cleanup belong to it.
@functools.cache
def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)  # elsewhere it can only be read by setting it
        os.umask(mask)
        return mask


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False
    return False


def _remove_leftovers(path: Path) -> None:
    """Temporary files of ``path`` left by writers that were killed (their process is gone)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and _pid_gone(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def replace_atomically(path, write) -> None:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, fsync it, rename it to
    ``path`` and fsync the directory. On any error ``path`` is untouched and the temporary file removed."""
    path = Path(path)
    _remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp makes it private; a report is not
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible everywhere)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_text_atomic(path, text: str) -> None:
    replace_atomically(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def save_figure(fig, path) -> None:
    """Write a matplotlib figure atomically (format from the file name, PNG by default) and close it."""
    import matplotlib.pyplot as plt

    fmt = Path(path).suffix[1:] or "png"
    try:
        replace_atomically(path, lambda f: fig.savefig(f, dpi=120, format=fmt))
    finally:
        plt.close(fig)
