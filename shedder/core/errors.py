"""Errors a user can cause. Each carries one message that names what is wrong; the CLI and the app
show that message instead of a traceback."""


class ShedderError(Exception):
    """Base class: anything the user can fix by changing their input."""


class ModelLoadError(ShedderError):
    """A model path, hub id or bundled name that cannot be loaded."""


class UnsupportedModelError(ModelLoadError):
    """A checkpoint of an architecture no adapter handles."""


class NonFiniteError(ShedderError):
    """A loss or perplexity that came out nan or inf: a broken model or dtype, never a number to show."""


class PlanError(ShedderError, ValueError):
    """A plan that cannot be read or does not fit the model."""


class DataError(ShedderError):
    """Text that cannot be used for evaluation (missing, empty, too short)."""


class Cancelled(ShedderError):
    """Raised by a progress callback to stop long work; finished, logged steps are kept."""


class Busy(ShedderError):
    """A run directory or cache entry another process or session is writing right now."""


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``, ``\\n``), so a name read from a file
    cannot drive the terminal or split a one-line message."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in str(text))


class DownstreamError(ShedderError):
    """lm-eval missing, an unknown task, or task data that cannot be loaded."""
