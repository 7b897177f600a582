"""The glue every command shares from parsed flags to the use cases (its options: ``shedder.cli.options``).

A command imports this module inside its handler, not at the top: it imports ``shedder.api`` and so
torch and transformers, which ``--help`` and argument errors never need (``tests/test_startup.py``)."""
from __future__ import annotations

import contextlib
import json
import sys

from shedder import api
from shedder.core.progress import TqdmProgress


def emit(args, payload: dict, text: str) -> None:
    """Print the result: JSON with ``--json`` (which escapes control characters), else ``text``,
    in which every path or name echoed from the command line went through ``printable``
    (``--out $'a\\nb'`` must neither split a line nor drive the terminal)."""
    print(json.dumps(payload, indent=2, default=str) if args.json else text)


def say(text: str) -> None:
    """A line about the work (cost, ETA) on stderr, so stdout stays the result."""
    print(text, file=sys.stderr, flush=True)


def pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%"


def distributed(args) -> bool:
    return getattr(args, "workers", None) is not None or getattr(args, "ray_address", None) is not None


def load(args):
    """(model, tokenizer) of ``--model``; with Ray workers the model runs on them (on --device) and
    this process only reads its weights."""
    device = "cpu" if distributed(args) else args.device
    return api.load(args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code,
                    tokenizer=args.tokenizer, threads=args.threads, weight_reorder=getattr(args, "weight_reorder", False))


def sources(args) -> list[str]:
    """The local directories a command reads models from: no output may go into (or over) them."""
    return api.sources(*(getattr(args, k, None) for k in ("model", "teacher", "baseline")))


def text_tokenizer(args, tokenizer):
    return api.text_tokenizer(tokenizer, args.model)


def progress(args) -> TqdmProgress:
    return TqdmProgress(enabled=not args.no_progress)


def calibration(args, tokenizer):
    """(windows, protocol line) of score/search, by ``--protocol`` (``api.Calibration``); the resolved
    values are written back to ``args`` (the official run layout records them)."""
    cal = api.Calibration.resolve(args.protocol, args.data, args.samples, args.seq_len, args.batch_size)
    args.data, args.samples, args.seq_len, args.batch_size = cal.source, cal.samples, cal.seq_len, cal.batch_size
    windows = cal.windows(text_tokenizer(args, tokenizer))
    return windows, cal.describe(windows)


@contextlib.contextmanager
def worker_pool(args, model, windows, group_sizes=None):
    """The Ray workers of ``--workers`` / ``--ray-address`` (None without them)."""
    with api.worker_pool(model, windows, getattr(args, "workers", None), getattr(args, "ray_address", None),
                         args.batch_size, group_sizes, device=args.device) as pool:
        if pool is not None and not args.json:
            print(f"evaluating on {len(pool.actors)} Ray workers ({args.device})", file=sys.stderr, flush=True)
        yield pool
