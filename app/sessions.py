"""Uploads of a browser session, deleted once the session has ended.

Streamlit keeps a closed tab's session state alive, so nothing tied to the lifetime of the session's
objects (a ``weakref.finalize`` on the workspace) runs before the server stops. Instead each
session's uploads live in a folder of its own under one root, ``$SHEDDER_CACHE_DIR/uploads/``,
holding a record of its owner (this server process, the Streamlit session id) whose mtime is the
session's heartbeat, refreshed on every rerun of that session. A sweep, run from any session's
rerun at most once a minute and at server exit, deletes:

* a folder of this server whose session Streamlit no longer has active
  (``Runtime.is_active_session``) and has not seen for ``RECONNECT_GRACE_S`` (longer than the two
  minutes Streamlit lets a dropped connection resume its session);
* a folder Streamlit cannot vouch for (this process runs no Streamlit server: AppTest, bare mode;
  the owner was another server process, now ended, or on another host) once its heartbeat is older
  than ``SHEDDER_UPLOAD_TTL_S`` seconds (default an hour);
* at server exit (``atexit``), every folder of this server.

A live session's folder is never deleted: Streamlit vouches for this server's sessions, and a
folder of another server process still running on this host is left to that process.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from streamlit import runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx
from streamlit.runtime.scriptrunner_utils.script_run_context_attr import SCRIPT_RUN_CONTEXT_ATTR_NAME

from shedder.api import default_cache_dir

#: The owner record in every session folder; its mtime is the heartbeat.
RECORD = ".session.json"
#: How long a session Streamlit no longer has active keeps its uploads (it may reconnect meanwhile).
RECONNECT_GRACE_S = 5 * 60
#: Uploads of a session nobody can vouch for live this long after its last rerun (``SHEDDER_UPLOAD_TTL_S``).
DEFAULT_TTL_S = 60 * 60
#: The least time between two sweeps of one process.
SWEEP_EVERY_S = 60
#: This server process, as its folders' records name it.
PROCESS = uuid.uuid4().hex

_ROOTS: set[Path] = set()  # roots this process made folders under (swept at exit)
_last_sweep = float("-inf")
_sweep_guard = threading.Lock()


def upload_root() -> Path:
    return default_cache_dir() / "uploads"


def ttl_s() -> float:
    """``SHEDDER_UPLOAD_TTL_S``, else an hour."""
    raw = os.environ.get("SHEDDER_UPLOAD_TTL_S")
    try:
        return float(raw) if raw else DEFAULT_TTL_S
    except ValueError:
        raise ValueError(f"SHEDDER_UPLOAD_TTL_S must be a number of seconds, got {raw!r}") from None


def session_id() -> str | None:
    """The Streamlit session this script run serves, or None outside a script run."""
    ctx = get_script_run_ctx(suppress_warning=True)
    return ctx.session_id if ctx is not None else None


def holder_note(thread) -> str:
    """What to say while ``thread`` (the holder of the shared model, or None when unknown) keeps a page
    waiting: "another session" only when it serves another session Streamlit still has active."""
    ctx = getattr(thread, SCRIPT_RUN_CONTEXT_ATTR_NAME, None)
    holder = getattr(ctx, "session_id", None)
    if holder is not None and (holder == session_id() or runtime_active(holder) is False):
        return "Finishing an earlier run of this page first (it stops at its next step)…"
    return "Waiting for the model: another session is using it…"


def runtime_active(session: str | None) -> bool | None:
    """Whether Streamlit has ``session`` active, or None where no Streamlit server runs in this process
    (AppTest, bare mode) to say."""
    if session is None or not runtime.exists():
        return None
    return runtime.get_instance().is_active_session(session)


def open_folder(session: str | None, folder: Path | None = None, root: Path | None = None) -> Path:
    """A session's upload folder, made (private to the server's user: uploads are the visitor's own)
    and recorded as this process's; ``folder`` is re-made at its old path when a sweep took it."""
    root = Path(root or upload_root())
    root.mkdir(parents=True, exist_ok=True)
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="session-", dir=root))
    else:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = {"process": PROCESS, "pid": os.getpid(), "host": socket.gethostname(), "session": session}
    (folder / RECORD).write_text(json.dumps(record) + "\n", encoding="utf-8")
    with _sweep_guard:
        if not _ROOTS:
            atexit.register(remove_own_folders)
        _ROOTS.add(root.resolve())
    return folder


def touch(folder: Path, now: float | None = None) -> None:
    """Refresh a session folder's heartbeat (a rerun of its session) to ``now`` (default: the time)."""
    try:
        os.utime(folder / RECORD, None if now is None else (now, now))
    except FileNotFoundError:  # swept meanwhile; the next upload re-makes it
        pass


def _record(folder: Path) -> dict:
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _heartbeat(folder: Path) -> float:
    for path in (folder / RECORD, folder):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return float("-inf")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def ended(record: dict, age: float, ttl: float, active: Callable[[str | None], bool | None],
          pid_alive: Callable[[int], bool] = _pid_alive) -> bool:
    """Whether the session a folder's ``record`` names has ended, its heartbeat ``age`` seconds old."""
    if record.get("process") == PROCESS:
        live = active(record.get("session"))
        if live is not None:
            return not live and age > RECONNECT_GRACE_S
    elif record.get("host") == socket.gethostname() and record.get("pid") is not None and pid_alive(record["pid"]):
        return False  # another server on this host looks after its own sessions
    return age > ttl


def sweep(root: Path | None = None, now: float | None = None, ttl: float | None = None,
          active: Callable[[str | None], bool | None] = runtime_active,
          pid_alive: Callable[[int], bool] = _pid_alive) -> list[Path]:
    """Delete the upload folders under ``root`` whose session has ended (``ended``); refresh the
    heartbeat of this server's sessions Streamlit has active. Returns the folders deleted."""
    root = Path(root or upload_root())
    now = time.time() if now is None else now
    ttl = ttl_s() if ttl is None else ttl
    gone = []
    for folder in _folders(root):
        record = _record(folder)
        if ended(record, now - _heartbeat(folder), ttl, active, pid_alive):
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
        elif record.get("process") == PROCESS and active(record.get("session")):
            touch(folder, now)  # seen active: its reconnect grace counts from now
    return gone


def _folders(root: Path) -> list[Path]:
    try:
        return [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:  # no uploads yet
        return []


def maybe_sweep() -> None:
    """``sweep`` the upload root, unless this process swept less than ``SWEEP_EVERY_S`` ago (every
    rerun calls this; the sweep lists a directory)."""
    global _last_sweep
    with _sweep_guard:
        if time.monotonic() - _last_sweep < SWEEP_EVERY_S:
            return
        _last_sweep = time.monotonic()
    sweep()


def remove_own_folders() -> None:
    """Delete every upload folder of this process (the server is stopping: its sessions end)."""
    for root in list(_ROOTS):
        for folder in _folders(root):
            if _record(folder).get("process") == PROCESS:
                shutil.rmtree(folder, ignore_errors=True)
