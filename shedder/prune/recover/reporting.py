"""A recovery run's curves: the training loss and the held-out loss, where a user reads them.

Every run logs both into ``RUN_DIR/log.jsonl`` (``step`` events carry the smoothed training loss,
``held_out`` events the mean next-token loss on the evaluation windows), so the studio draws the curve
while the run goes and after a reload, from the log alone (``curve``). ``report_to="tensorboard"``
also writes them as TensorBoard scalars under ``RUN_DIR/tensorboard`` with the writer that torch ships
(``torch.utils.tensorboard``), named as transformers' Trainer names them (``train/loss``,
``train/learning_rate``, ``eval/loss``), so a dashboard already watching Trainer runs reads these too.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from shedder.core.defaults import REPORT_TO, TENSORBOARD_DIR
from shedder.core.errors import ShedderError

#: At most this many held-out measurements in a run (plus the one before training).
HELD_OUT_POINTS = 20


def held_out_every(total_steps: int) -> int:
    """Steps between two held-out measurements: every 10 steps for short runs, spread to at most
    ``HELD_OUT_POINTS`` for long ones (each costs one pass over the evaluation windows)."""
    return max(10, math.ceil(total_steps / HELD_OUT_POINTS / 10) * 10)


class Reporter:
    """Sends scalars to ``report_to``; a ``none`` reporter does nothing (the log has them already)."""

    def __init__(self, report_to: str, run_dir: Path, start_step: int):
        if report_to not in REPORT_TO:
            raise ShedderError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
        self.writer = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: needs the optional tensorboard package
            except ImportError:
                raise ShedderError("--report-to tensorboard needs the tensorboard package: "
                                   "pip install tensorboard") from None
            # purge_step drops what a killed run wrote after its last checkpoint: those steps are redone.
            self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step or None)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def curve(run_dir: str | Path) -> list[dict]:
    """The run's curve from its log: rows ``{"step", "series": "train" | "held-out", "loss"}``, in order;
    the held-out row at step 0 is the pruned model before training. Empty when there is no log yet."""
    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        return []
    rows = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a line a kill left torn
            continue
        if not isinstance(entry, dict):
            continue
        event = entry.get("event")
        if event == "start" and _number(entry.get("ppl", {}).get("pruned")):
            rows.append({"step": 0, "series": "held-out", "loss": math.log(entry["ppl"]["pruned"])})
        elif event == "step" and _number(entry.get("loss")):
            rows.append({"step": entry["step"], "series": "train", "loss": entry["loss"]})
        elif event == "held_out" and _number(entry.get("loss")):
            rows.append({"step": entry["step"], "series": "held-out", "loss": entry["loss"]})
        elif event == "done" and _number(entry.get("ppl", {}).get("recovered")):
            rows.append({"step": entry["steps"], "series": "held-out", "loss": math.log(entry["ppl"]["recovered"])})
    return rows


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
