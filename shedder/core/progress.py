"""Progress callbacks for the CLI: ``progress(done, total, message)`` drawn as tqdm bars on stderr.

A new bar starts whenever the work restarts (``total`` changes or ``done`` goes back), labelled with
the message's part before ``": "`` (e.g. ``step 3``); the rest of the message is shown after the bar.
"""
from __future__ import annotations

import sys
from typing import Callable

#: ``progress(done, total, message)``: what every long-running engine function accepts.
Progress = Callable[[int, int, str], None]


class TqdmProgress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def __call__(self, done: int, total: int, message: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        label, _, detail = message.partition(": ")
        if self.bar is None or self.bar.total != total or done <= self.bar.n or self.bar.desc != label:
            self.close()
            self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False, dynamic_ncols=True)
        if detail:
            self.bar.set_postfix_str(detail, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
