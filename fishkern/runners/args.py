"""Argument types and shared options of the ``fishkern`` subcommands.

Here, below both ``fishkern.cli`` (the parser) and the runners' own subcommands
(``fishkern.runners.cifar.command``), so that neither imports the other. Imports nothing heavy.
"""
from __future__ import annotations

import argparse

__all__ = [
    "add_common", "add_out_dir", "fraction", "non_negative_float", "non_negative_int", "positive_float", "positive_int",
]


def fraction(text: str) -> float:
    """A density: a number in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"a density is a fraction in (0, 1] (0.005 means 0.5%), got {text}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def add_out_dir(p: argparse.ArgumentParser, default: str) -> None:
    """``--out-dir``, also spelled ``--output-dir`` and ``--output_dir`` (Hugging Face's name)."""
    p.add_argument("--out-dir", "--output-dir", "--output_dir", dest="out_dir", default=default, metavar="DIR",
                   help="output directory (default: %(default)s)")


def add_common(p: argparse.ArgumentParser) -> None:
    """``--overwrite`` and ``--no-progress``, on every subcommand that writes results."""
    p.add_argument("--overwrite", action="store_true", help="replace results already in the output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
