"""Command-line parsing shared by ``python -m shedder`` and its bench commands.

``OneLineParser`` reports a mistake on the command line the way every other user mistake is
reported: one line ``error: ...`` naming the command's ``--help``, exit status 2 (argparse's default
prints a usage block first, which buries the message). The number types refuse, at parse time,
values that would otherwise crash deep inside the work (``--threads 100000`` segfaults PyTorch) or
be accepted silently (``--accuracy-n -1``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from shedder.core.errors import printable

#: The most CPU threads a command may ask PyTorch for: more than this is a typo, and PyTorch
#: crashes (segfault) on counts far beyond the machine.
MAX_THREADS = (os.cpu_count() or 128) * 8


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``error: MESSAGE (see PROG --help)``, exit 2.
    Subparsers made with ``add_subparsers`` inherit the class (argparse uses the parent's type)."""

    def error(self, message: str):
        print(f"error: {printable(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def positive_int(text: str) -> int:
    """A whole number ≥ 1 (counts of windows, tokens, steps, workers, ...)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number ≥ 0 (e.g. warm-up rounds)."""
    return _int_at_least(text, 0)


def threads(text: str) -> int:
    """CPU threads for PyTorch: 1 to ``MAX_THREADS``."""
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS} (8 per CPU core of this machine), "
                                         f"got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (e.g. a perplexity limit); nan and inf are refused."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:  # also a number too long to convert
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least {low}, got {_short(text)!r}")
    return value


def _short(text: str) -> str:
    """``text`` cut to a readable length for a message (a 5,000-digit number is not shown whole)."""
    return text if len(text) <= 40 else text[:37] + "..."


def race_options(p) -> None:
    """``--race`` and its settings (``shedder.prune.race.Race``), of ``search`` and ``bench search``."""
    p.add_argument("--race", action="store_true",
                   help="race each step: score every candidate on a few windows, keep the better half rung "
                        "after rung, finish the survivors exactly (faster, not exact; results say raced)")
    p.add_argument("--race-windows", type=positive_int, default=4, help="with --race: windows raced on (default 4)")
    p.add_argument("--race-finish", type=positive_int, default=2,
                   help="with --race: candidates finished exactly per step (default 2)")
