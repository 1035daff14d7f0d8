"""Progress output that stays readable in a log file.

On a terminal, a tqdm bar. When stderr is not a terminal (redirected to a file, a CI log, a pipe),
tqdm's carriage-return redraws pile up (hundreds of KB for one demo), so there a bar prints plain
lines instead: one when it starts, one every `every_s` seconds or 25% of the work, one at the end.
``silence_library_progress()`` turns off the bars of transformers and datasets (``--no-progress``).
"""
from __future__ import annotations

import os
import sys
import time

__all__ = ["progress_bar", "silence_library_progress", "stderr_is_terminal"]


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class PlainProgress:
    """The part of tqdm's interface fishkern uses, printing whole lines to stderr."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", disable: bool = False,
                 every_s: float = 30.0, stream=None):
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.n = 0
        self.every_s = every_s
        self._stream = stream
        self._postfix = ""
        self._t0 = self._last = time.monotonic()
        self._next_fraction = 0.25
        self._closed = False
        self._line("started")

    def _line(self, what: str) -> None:
        if self.disable:
            return
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        elapsed = time.monotonic() - self._t0
        post = f" ({self._postfix})" if self._postfix else ""
        stream = self._stream or sys.stderr
        print(f"{self.desc or 'progress'}: {what} {done} {self.unit}, {elapsed:.1f} s{post}", file=stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        fraction = self.n / self.total if self.total else 0.0
        if self.total and self.n >= self.total:
            return  # the end line is printed by close()
        if now - self._last >= self.every_s or (self.total and fraction >= self._next_fraction):
            while self.total and fraction >= self._next_fraction:
                self._next_fraction += 0.25
            self._last = now
            self._line("at")

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._line("done")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
                 leave: bool = False):
    """A tqdm bar on a terminal, plain progress lines otherwise, nothing when not `enabled`."""
    if stderr_is_terminal() and not os.environ.get("FISHKERN_PLAIN_PROGRESS"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave)
    return PlainProgress(total, desc=desc, unit=unit, disable=not enabled)


def silence_library_progress() -> None:
    """Turn off the progress bars of transformers, datasets and huggingface_hub (``--no-progress``).

    Imports none of them (``fishkern cifar --no-progress`` must not pay for transformers): the
    environment switches cover libraries imported later (and child processes); libraries already
    imported are switched off directly. Call it again after importing transformers when its version
    may predate reading ``HF_HUB_DISABLE_PROGRESS_BARS`` at import.
    """
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # recent transformers start from the hub's switch
    import importlib

    switches = (  # (imported package, module with the switch, the switch)
        ("datasets", "datasets", "disable_progress_bars"),
        ("transformers", "transformers.utils.logging", "disable_progress_bar"),
        ("huggingface_hub", "huggingface_hub.utils", "disable_progress_bars"),
    )
    for package, module, switch in switches:
        if package in sys.modules:
            try:
                getattr(importlib.import_module(module), switch)()
            except Exception:  # noqa: BLE001 - an old version without the switch: its bars stay
                pass
