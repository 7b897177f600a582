"""``python -m shedder``: the engine's commands for long runs and scripts.

    python -m shedder info    --model mamba2-tiny
    python -m shedder eval    --model mamba2-tiny [--plan plan.json] [--data test] [--samples N --seq-len 256]
                              [--tasks local|paper|lambada_openai,hellaswag,... [--limit N]]   (lm-eval accuracy)
    python -m shedder extract --model mamba2-tiny --plan plan.json --out pruned/ [--overwrite]
    python -m shedder score   --model mamba2-tiny --kinds block,ssm --out scores.csv [--metric taylor]
    python -m shedder score   --model mamba2-tiny --kinds block,head --compare all --out agreement.csv
    python -m shedder search  --model mamba2-tiny --kinds ssm --steps 4 --out runs/ssm [--resume] [--race]
                              [--protocol official --data hf:tatsu-lab/alpaca:train|rows.jsonl]
                              [--workers N | --ray-address ADDR]   (score too: on Ray workers)
    python -m shedder stock   --model mamba2-tiny --strategy one-shot|greedy --out plans/   (stock-shaped widths)
    python -m shedder bench   --model mamba2-tiny --plan plan.json     (speed of the extracted model)
    python -m shedder bench search [--model mamba2-tiny --kinds ssm --steps 4]  (fast vs reference search)
    python -m shedder bench scan [--json]              (engine SSD scan vs transformers' torch reference)
    python -m shedder bench scale [--sizes S,M,130m]   (time and memory as models grow)
    python -m shedder bench announce [--layers 24]     (a search's announced memory and ETA vs actual)
    python -m shedder bench gpu-check                  (the whole journey on CUDA; skips without a GPU)
    python -m shedder bench gpu-check --paper --out DIR [--dry-run]   (the paper's speed numbers on CUDA)
    python -m shedder bench search --workers 1,2                       (speed-up of Ray workers)
    python -m shedder recover --model mamba2-tiny --plan plan.json --method lora --out recovered/ [--resume]
    python -m shedder bench recover [--steps 12]   (recovery per method for the same token budget)
    python -m shedder plan convert plan.json --to official|shedder [--model M] --out FILE
    python -m shedder import-run OFFICIAL_RUN_DIR --model M --out RUN_DIR

Every command takes ``--json`` for machine-readable output. Progress bars go to stderr. A mistake in
the input (bad path, plan for another model, empty text, ...) prints one line ``error: ...`` and exits
with status 2; an internal error prints one line and exits with status 1 (``--debug`` shows its
traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

from shedder.cli import bench, eval, extract, import_run, info, plan, recover, score, search, stock
from shedder.cli.options import OneLineParser
from shedder.core.errors import Cancelled, ShedderError, printable
from shedder.core.fileio import full_disk_reason

#: The commands, in the order ``--help`` lists them; each module adds its parser and runs it.
COMMANDS = (info, eval, extract, score, search, stock, recover, plan, import_run, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m shedder", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{info,eval,extract,score,search,stock,recover,bench,plan,import-run}")
    for command in COMMANDS:
        command.add(sub)
    return parser


def _os_error_text(error: Exception) -> str:
    """One line for an error of the machine rather than of the input: a full disk says so and that
    runs keep their finished work; any other ``OSError`` as the system gives it."""
    reason = full_disk_reason(error)
    if reason is None:
        return printable(error)
    return (f"{reason} ({printable(error)}); free space and run the same command again (search and recover: "
            "with --resume; their finished steps are kept)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] in (["bench", "scale"], ["bench", "gpu-check"]):
        args = bench.scale_parser(argv[1], main).parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging  # lazy: start-up (--help imports no torch)

    hf_logging.disable_progress_bar()  # our own bars show the work; weight loading is quick
    try:
        return args.func(args)
    except Cancelled:
        print("error: cancelled", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `info --json | head`: the reader has gone; nothing to report
        with contextlib.suppress(OSError, ValueError):  # no second error when Python flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ShedderError as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (score, search and recover keep their finished work: rerun the same command, "
              "with --resume for search and recover)", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, OSError) or full_disk_reason(e) is not None:  # a path that cannot be written, a full disk
            print(f"error: {_os_error_text(e)}", file=sys.stderr)
            return 2
        # a bug, not the user's input: one line unless asked for the traceback
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: internal error ({type(e).__name__}: {printable(e)}); rerun with --debug for the traceback",
              file=sys.stderr)
        return 1
