"""Small UI helpers every page uses: errors as messages, progress bars that can be cancelled,
a model that is always loaded, and human labels for components and numbers."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

from shedder import api
from shedder.core.errors import Busy, Cancelled, ShedderError
from shedder.core.plan import ONCE_PER_LAYER, Component

from .state import Settings, Workspace, workspace

KIND_LABELS = {
    "block": "blocks", "mixer": "token mixers", "shared_block": "shared-block applications", "ssm": "SSMs",
    "head": "Mamba heads", "channel_group": "channel groups", "attention": "attention sub-blocks",
    "mlp": "MLP sub-blocks", "mlp_channel_group": "MLP channel groups",
    "expert": "MoE experts",
}
#: What a page says when another session is writing the same search run or score cache entry.
BUSY_SEARCH = "Another session is running this search right now. Try again when it has finished; its steps are reused."
BUSY_SCORES = "Another session is computing these scores right now. Try again when it has finished; they are reused."
#: Kinds with one component per layer (their index is always 0).
WHOLE_KINDS = ONCE_PER_LAYER


@contextlib.contextmanager
def shown_errors(busy: str | None = None) -> Iterator[None]:
    """Show a user-caused error as one message in the page instead of a traceback (uploads named
    by their file name, never by their server path). ``busy`` is what to say when the run or cache
    entry is being written by another session right now."""
    try:
        yield
    except Cancelled:
        st.warning("Cancelled. Nothing was changed; finished work is kept where the engine keeps it.")
    except Busy as e:
        st.error(busy or workspace().public(str(e)))
    except ShedderError as e:
        st.error(workspace().public(str(e)))
    except OSError as e:  # a save the disk refused (full, read-only): nothing was replaced
        st.error(workspace().public(f"could not write: {e}"))


@contextlib.contextmanager
def progress(label: str) -> Iterator[Callable[[int, int, str], None]]:
    """A ``progress(done, total, message)`` callback drawing an ``st.progress`` bar.

    Cancel buttons work through Streamlit itself: a click while work runs makes Streamlit interrupt
    this script run at the next UI update, which happens inside the callback. The callback turns
    that interruption into ``Cancelled`` so the engine stops cleanly (keeping logged steps), then
    hands the interruption back to Streamlit so the rerun with the clicked button proceeds.
    """
    bar = st.progress(0.0, text=label)
    interrupted: list[BaseException] = []
    first: list[tuple[float, int]] = []  # (time, done) of the first update: the rate is measured from there

    def callback(done: int, total: int, message: str = "") -> None:
        first or first.append((time.perf_counter(), done))
        try:
            detail = f" — {message}" if message and message != label else ""
            bar.progress(min(max(done / max(total, 1), 0.0), 1.0),
                         text=f"{label}{detail} ({done}/{total}{_eta(*first[0], done, total)})")
        except ScriptControlException as e:
            interrupted.append(e)
            raise Cancelled("cancelled from the app") from None

    try:
        yield callback
    except Cancelled:
        if interrupted:
            raise interrupted[0] from None
        raise
    bar.empty()


def _eta(since: float, done_then: int, done: int, total: int) -> str:
    """", about N left" at the rate measured since the first update (``since``, when ``done_then`` units
    were done): work resumed at step 900 of 1000, or set-up before the first unit, does not count as
    progress made in this run. "" until a unit has been timed."""
    if done <= done_then or done >= total:
        return ""
    return f", about {api.human_seconds((time.perf_counter() - since) / (done - done_then) * (total - done))} left"


def cost_caption(what: str, kinds: list[str], steps: int | None = 1, metric: str = "ppl") -> None:
    """Say what a score or search on the calibration windows will cost, before it is started: the
    windows and batch size of the chosen protocol, the ones the run uses."""
    ws = workspace()
    loaded = ws.loaded
    _caption(api.cost(what, loaded.model, loaded.adapter, ws.calibration(), kinds, steps=steps,
                      batch_size=ws.settings.calibration_batch_size, metric=metric))


def compare_caption(kinds: list[str], metrics: list[str]) -> bool:
    """Say what **Compare metrics** will cost (every metric, then each on both calibration halves),
    by the function ``score --compare`` announces with; False (and why) when it cannot run: the
    halves need two calibration windows at least."""
    ws = workspace()
    windows = ws.calibration()
    if len(windows) < 2:
        st.caption("Compare metrics also ranks on two halves of the calibration windows, so it needs at least 2; "
                   "the Model page sets how many.")
        return False
    _caption(api.compare_cost(ws.loaded.model, ws.loaded.adapter, windows, kinds, metrics,
                              batch_size=ws.settings.calibration_batch_size))
    return True


def _caption(estimate) -> None:
    text = estimate.describe()
    st.caption(text[:1].upper() + text[1:] + "; the progress bar shows the time left once it starts.")


def defaults_note() -> str:
    """The app's default windows beside the CLI's, said once for every page that shows perplexity: the
    same plan reads differently under each (the app measures fewer, shorter windows so that a toggle
    answers in about a second), and a user comparing the two should know why."""
    app = Settings()
    return (f"App defaults: {app.samples} × {app.seq_len}-token windows (set on the Model page). The CLI's `eval` "
            f"defaults to every {api.DEFAULT_SEQ_LEN}-token window of the test text, `score` and `search` to "
            f"{api.DEFAULT_SAMPLES} × {api.DEFAULT_SEQ_LEN}-token calibration windows: pass `--samples` and "
            "`--seq-len` to match the numbers here.")


def cancel_button(key: str) -> None:
    """A Cancel button drawn before long work starts; clicking it interrupts the work."""
    if st.button("Cancel", key=key, help="Stops the running computation"):
        st.warning("Cancelled.")


def ready() -> Workspace:
    """The session's workspace with its model loaded (the defaults on first visit), or stop the
    page with the loading error shown."""
    ws = workspace()
    try:
        ws.windows(ws.settings.evaluation)
        if ws.plan.model is None:  # the first, empty plan gets the model's identity
            ws.plan = ws.loaded.adapter.resolve(ws.plan)
    except ShedderError as e:
        st.error(f"{ws.public(str(e))}  \nChoose another model or text on the Model page.")
        st.stop()
    return ws


def component_label(c: Component) -> str:
    if c.kind in WHOLE_KINDS:
        return f"{c.kind} · layer {c.layer}"
    return f"{c.kind} · layer {c.layer} · #{c.index}"


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def delta(text: str) -> str | None:
    """A metric's delta as shown, or None when it reads as zero ("+0.000", "-0.0%"): Streamlit would
    draw a coloured arrow for it, saying a change the number does not show."""
    return text if any(c in "123456789" for c in text) else None
