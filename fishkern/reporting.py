"""Small helpers for the runners' reports: numbers in words, atomic files, plot styles, and the
load of the machine while something was timed. Shared by the runners and the benchmarks."""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import subprocess
import tempfile
import time
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


def plural(n, word: str, words: str | None = None) -> str:
    """``plural(1, "epoch")`` -> "1 epoch", ``plural(2, "epoch")`` -> "2 epochs" (0.5 -> "0.5 epochs")."""
    number = f"{n:g}" if isinstance(n, float) else f"{n:,}"
    return f"{number} {word if n == 1 else (words or word + 's')}"


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
def _umask() -> int:
    """The process's current umask (read each time: a program may change it between reports)."""
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


# ------------------------------------------------------------------------ load of the machine
# Timings on a shared machine are inflated when other processes want the same cores (on a 2-core
# machine an op whose second thread is descheduled waits a whole time slice). Two snapshots of
# /proc tell how much CPU *other* processes used meanwhile (benchmarks/_common.py uses these too);
# a report warns above 10% of one core.
BUSY_FRACTION = 0.1  # of one core, on average over the timed stretch


def cpu_snapshot() -> tuple[float, float, float, float] | None:
    """(wall s, busy CPU s of the whole machine, CPU s of this process with its threads and its
    finished child processes, steal s). Linux only; None elsewhere."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
        steal = v[7] if len(v) > 7 else 0
        own = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime (spawned workers count as ours)
        return time.perf_counter(), busy / tick, own / tick, steal / tick
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def interference(before, after) -> dict[str, float] | None:
    """CPU seconds used by other processes (and stolen by a hypervisor) between two snapshots, and
    whether that exceeds BUSY_FRACTION of a core (``busy``). None when not measurable."""
    if before is None or after is None:
        return None
    wall = after[0] - before[0]
    other = max(0.0, (after[1] - before[1]) - (after[2] - before[2]))
    steal = max(0.0, after[3] - before[3])
    # CPU times come in 10 ms ticks: below 50 ms nothing can be told
    busy = other + steal > max(0.05, BUSY_FRACTION * wall)
    return {"wall_s": wall, "other_cpu_s": other, "steal_s": steal, "own_cpu_s": after[2] - before[2], "busy": busy}


class MachineLoad:
    """``with MachineLoad() as load: ...`` then ``load.result``: the `interference` dict (None
    where /proc is missing)."""

    def __enter__(self):
        self._before = cpu_snapshot()
        self.result = None
        return self

    def __exit__(self, *exc) -> None:
        self.result = interference(self._before, cpu_snapshot())


def load_warning(measured: dict[str, dict | None], what: str = "step times and total time") -> str | None:
    """A report's warning when other processes loaded the machine during any timed stretch
    (``measured``: name -> `interference` dict), else None."""
    busy = {k: v for k, v in measured.items() if v and v.get("busy")}
    if not busy:
        return None
    worst = max(busy.values(), key=lambda v: (v["other_cpu_s"] + v["steal_s"]) / max(v["wall_s"], 1e-9))
    cores = (worst["other_cpu_s"] + worst["steal_s"]) / max(worst["wall_s"], 1e-9)
    names = ", ".join(busy)
    return (f"**Warning: the machine was loaded while this was timed** — other processes used up to {cores:.2f} "
            f"of a core on average (during: {names}; {os.cpu_count()} cores here), so {what} are inflated; "
            f"accuracies and sizes are not affected. Re-run on a quiet machine for timings.")


# ------------------------------------------------------------------------------------ plots
# Reference lines (dense, BitFit, chance) each with its own colour and dash pattern, so that they
# stay apart in the plot and in the legend.
BASELINE_STYLES = {
    "dense": {"ls": "--", "color": "black"},
    "bitfit": {"ls": "-.", "color": "tab:green"},
    "standard": {"ls": ":", "color": "black"},
    "chance": {"ls": ":", "color": "tab:red"},
}


def draw_baseline(ax, kind: str, y: float, label: str) -> None:
    """A horizontal reference line at ``y`` in the style of ``kind`` (BASELINE_STYLES), labelled in the legend."""
    ax.axhline(y, lw=1.2, label=label, **BASELINE_STYLES[kind])


def percent_log_axis(axis, percents) -> None:
    """A log-scale axis whose ticks are exactly ``percents`` labelled "0.1%" — not matplotlib's
    default powers of ten ("10⁻¹"), which read as a fraction."""
    import matplotlib.ticker as mticker

    ticks = sorted({float(p) for p in percents})
    axis.set_major_locator(mticker.FixedLocator(ticks))
    axis.set_major_formatter(mticker.FixedFormatter([f"{t:g}%" for t in ticks]))
    axis.set_minor_formatter(mticker.NullFormatter())


def bytes_log_axis(axis) -> None:
    """Byte-count tick labels ("100 KB", "1.0 MB") on a log-scale axis instead of "10⁵"."""
    import matplotlib.ticker as mticker

    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _pos: fmt_bytes(v)))
    axis.set_minor_formatter(mticker.NullFormatter())
