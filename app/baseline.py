"""The unpruned model's baseline numbers kept on disk for the next session (``shedder.api.baseline``):
what the Model page shows at once when the studio is reopened (another tab, a restarted server)."""
from __future__ import annotations

import contextlib

from shedder import api

#: The numbers kept: perplexity on the evaluation windows, next-word accuracy on the evaluation text.
WHAT = ("ppl", "accuracy")


def _key(ws, what: str) -> dict:
    s, accuracy = ws.settings, what == "accuracy"
    return dict(windows=ws.windows(s.evaluation), source=s.evaluation if accuracy else None,
                passages=s.accuracy_passages if accuracy else None)


def known(ws) -> dict:
    """What an earlier session kept on disk for the workspace ``ws``'s unpruned model: ``{what: value}``."""
    found = {what: api.known_baseline(ws.loaded.model, what, **_key(ws, what)) for what in WHAT}
    return {what: value for what, value in found.items() if value is not None}


def keep(ws, plan, what: str, value: float) -> float:
    """``value``, kept on disk first when ``plan`` is the unpruned model (a disk that refuses costs only
    measuring again next time)."""
    if not plan.components:
        with contextlib.suppress(OSError):
            api.remember_baseline(ws.loaded.model, what, value=value, **_key(ws, what))
    return value
