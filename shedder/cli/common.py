"""What every command shares: its common options, and the glue from parsed flags to the use cases."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys

from shedder import api
from shedder.api import DEFAULT_BATCH, DEFAULT_CALIBRATION, DEFAULT_MODEL, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from shedder.cli.options import positive_int, threads
from shedder.core.progress import TqdmProgress


#: What ``--overwrite`` may replace, per kind of output (the output policy, ``shedder.core.fileio``).
OVERWRITES = {"file": "replace --out if this tool wrote it and it is unchanged since (never any other file)",
              "export": "replace --out if it is a previous export of this tool (never any other directory)"}


def overwrite_option(p: argparse.ArgumentParser, output: str) -> None:
    """``--overwrite`` for a command whose ``--out`` is an output ``file`` or an ``export`` directory."""
    p.add_argument("--overwrite", action="store_true", help=OVERWRITES[output])


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


# ---------------------------------------------------------------------------------------- parser
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


