"""Parameter-name patterns (force=, exclude=, head=): parsing, matching, and the error for a pattern
that matches nothing (a typo would otherwise force or exclude nothing without a word)."""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Mapping, Sequence


def as_patterns(value, arg: str) -> list[str]:
    """A pattern (or name) argument as a list: one string or a sequence of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{arg} must be a string or a list of strings, got {type(value).__name__}")
    out = list(value)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise TypeError(f"{arg}[{i}] must be a string, got {type(v).__name__}")
    return out


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or (
        not any(c in pattern for c in "*?[") and name.startswith(pattern + ".")
    )


def match_names(names: Sequence[str], patterns: Sequence[str] | str) -> list[str]:
    """Names matching any pattern. A pattern is an fnmatch glob over the full name; a pattern without
    wildcards also matches a module prefix ("classifier" matches "classifier.weight")."""
    if isinstance(patterns, str):
        patterns = [patterns]
    return [n for n in names if any(_matches(n, p) for p in patterns)]


def close_names(pattern: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Parameter or module names that look like ``pattern`` (for "did you mean")."""
    candidates = dict.fromkeys(names)
    for name in names:  # module prefixes too: "classifer" is closest to "classifier", not "classifier.weight"
        parts = name.split(".")
        for i in range(1, len(parts)):
            candidates.setdefault(".".join(parts[:i]))
    return difflib.get_close_matches(pattern, list(candidates), n=n, cutoff=0.6)


def unmatched(pattern: str, names: Sequence[str], arg: str, what: str | None = None) -> ValueError:
    close = close_names(pattern, names)
    hint = (
        f"did you mean {' or '.join(repr(c) for c in close)}?" if close
        else f"the parameters are e.g. {list(names[:4])}"
    )
    return ValueError(f"{arg}={pattern!r} matches no parameter{f' of {what}' if what else ''}: {hint}")


def check_each_matches(names: Sequence[str], patterns: Sequence[str], arg: str, what: str | None = None) -> None:
    """Every pattern must match at least one name: a pattern that matches nothing is a typo."""
    for p in patterns:
        if not any(_matches(n, p) for n in names):
            raise unmatched(p, names, arg, what)
