"""Command-line parsing shared by ``python -m shedder`` and its bench commands: the parser class, the
number types and the options several commands take.

Pure Python over ``shedder.core.defaults``: building every parser imports neither torch nor
transformers, so ``--help`` and argument errors answer at once (``tests/test_startup.py``).

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

from shedder.core.defaults import DEFAULT_BATCH, DEFAULT_CALIBRATION, DEFAULT_MODEL, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
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


#: What ``--overwrite`` may replace, per kind of output (the output policy, ``shedder.core.fileio``).
OVERWRITES = {"file": "replace --out if this tool wrote it and it is unchanged since (never any other file)",
              "export": "replace --out if it is a previous export of this tool (never any other directory)"}


def overwrite_option(p: argparse.ArgumentParser, output: str) -> None:
    """``--overwrite`` for a command whose ``--out`` is an output ``file`` or an ``export`` directory."""
    p.add_argument("--overwrite", action="store_true", help=OVERWRITES[output])


def model_options(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    p.add_argument("--model", default=None if model_required else DEFAULT_MODEL, required=model_required,
                   help=f"bundled name, local directory or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    p.add_argument("--threads", type=threads, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--weight-reorder", action="store_true",
                   help="sort each MLP's channels by L1 norm first (the official --weight_reorder; the model's "
                        "function is unchanged, MLP widths then keep the strongest channels); give it to every "
                        "command that uses the plan")
    p.add_argument("--tokenizer", help="tokenizer name, directory or hub id (default: the model's own; needed "
                                       "only to read text when the model directory has none)")


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="print the traceback of an internal error")


def data_options(p: argparse.ArgumentParser, data: str, samples: int | None, seq_len: int = DEFAULT_SEQ_LEN) -> None:
    p.add_argument("--data", default=data, help=f"text source: calibration, test, a .txt/.jsonl file or "
                                                f"hf:DATASET[:CONFIG]:SPLIT (default {data})")
    p.add_argument("--samples", type=positive_int, default=samples,
                   help=f"number of windows (default {samples if samples else 'all'})")
    p.add_argument("--seq-len", type=positive_int, default=seq_len, help=f"tokens per window (default {seq_len})")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH, help=f"windows per forward (default {DEFAULT_BATCH})")


def calibration_options(p: argparse.ArgumentParser) -> None:
    """Data options of score/search: defaults depend on --protocol, so they are filled in later."""
    p.add_argument("--protocol", choices=["shedder", "official"], default="shedder",
                   help="calibration sampling: shedder (the first --samples windows of --data) or official "
                        "(the Mamba-Shedder code's: --samples rows of the 10%% part of an 80/10/10 split, seed 42, "
                        "of a datasets id or a local .json/.jsonl with a 'text' field; defaults alpaca, 256 rows, "
                        "2048-token windows, batch 2)")
    p.add_argument("--data", help=f"text source (default {DEFAULT_CALIBRATION}; official: hf:tatsu-lab/alpaca:train)")
    p.add_argument("--samples", type=positive_int, help=f"windows (default {DEFAULT_SAMPLES}); official: rows (default 256)")
    p.add_argument("--seq-len", type=positive_int, help=f"tokens per window (default {DEFAULT_SEQ_LEN}; official 2048)")
    p.add_argument("--batch-size", type=positive_int, help=f"windows per forward (default {DEFAULT_BATCH}; official 2)")


def distributed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=positive_int, help="evaluate candidates on N Ray workers, each with its own model "
                                               "replica (one GPU each with --device cuda); starts a local Ray "
                                               "unless --ray-address is given")
    p.add_argument("--ray-address", help="run the workers on this Ray cluster (e.g. auto, or ray://HEAD:10001); "
                                         "without --workers: one per GPU (--device cuda) or per node")


def counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"not a list of worker counts like 1,2: {text!r}")
    return counts


def kinds(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


TARGET_RULE = "an integer count ≥ 1, a fraction in (0, 1), or a percentage in (0, 100%)"


def target(text: str) -> float:
    """A parameter count (``250000``, ``2.5e5``), a fraction of the model (``0.2``) or a
    percentage (``20%``); anything else (``1.0``, ``150%``, ``0``) is refused, never guessed."""
    raw = text.strip()
    try:
        value = float(raw[:-1] if raw.endswith("%") else raw)
    except ValueError:
        value = math.nan
    if raw.endswith("%"):
        if 0 < value < 100:
            return value / 100
    elif 0 < value < 1:
        return value
    elif value >= 1 and value.is_integer() and ("e" in raw.lower() or "." not in raw):  # 2.5e5 yes, 1.0 no
        return int(value)
    raise argparse.ArgumentTypeError(f"--target-params takes {TARGET_RULE}; got {text!r}")


