"""Writing files without ever losing a user's: atomic files, atomic directory publishing, locks.

* ``atomic_write_text``: a temporary file beside the target, then a rename; readers see the old
  file or the whole new one, never half of it. Temporary names are unique per process and thread.
* ``publish_dir``: a model (or any directory of outputs) is written into a fresh temporary
  directory beside the target and renamed into place only when complete. A target that exists and
  is not empty is refused unless ``overwrite``, and even then only if it is a previous export of
  this tool (it holds ``EXPORT_MARKER``); the working directory, the source model's directory and
  their parents are never targets. Any failure leaves the target exactly as it was.
* ``exclusive``: an inter-process lock (``filelock``) for a run directory or a cache entry; a second
  process is refused at once with a message saying what is busy (``Busy``); a second thread of this
  process waits, shown and cancellable through its progress callback.
* ``drop_torn_tail``: before appending to a JSON-lines log, cut a last line that a kill left torn
  or that is not JSON, so the next line never glues onto it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import Busy, ShedderError, printable

#: A file every directory written by ``publish_dir`` holds: it marks what ``--overwrite`` may replace.
EXPORT_MARKER = ".shedder-export"


def temp_path(path: Path) -> Path:
    """A temporary name beside ``path``, unique per process and thread (and per call)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a temporary sibling of ``path`` (e.g. ``torch.save``), then rename it over
    ``path``; the parent directory is created. A failure leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ directories
def check_output_dir(target: str | Path, overwrite: bool = False, protected: Iterable[str | Path] = ()) -> Path:
    """The resolved output directory, or ``ShedderError`` saying why it may not be written."""
    if not str(target).strip():
        raise ShedderError("no output directory given (the name is empty); name a new directory")
    out = Path(target).expanduser().resolve()
    for keep, what in [(Path.cwd(), "the working directory"),
                       *((Path(p).expanduser().resolve(), f"the source model's directory {p}") for p in protected)]:
        if out == keep or out in keep.parents:
            where = "is" if out == keep else "contains"
            raise ShedderError(f"refusing to write to {printable(target)}: it {where} {what}; choose a new directory")
    if out.exists() and not out.is_dir():
        raise ShedderError(f"{target} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ShedderError(f"{target} exists and is not empty; choose a new directory, or pass --overwrite "
                               "to replace a previous export of this tool")
        if not (out / EXPORT_MARKER).is_file():
            raise ShedderError(f"refusing to replace {target}: it is not a directory this tool exported "
                               f"(no {EXPORT_MARKER} file in it)")
    return out


def inside(root: str | Path, name: str | Path) -> Path:
    """``root / name`` resolved, or ``ShedderError`` when it lies outside ``root`` (``..``, an
    absolute path elsewhere, a symlink out) or is ``root`` itself: saves confined to one directory."""
    base = Path(root).expanduser().resolve()
    if not str(name).strip():
        raise ShedderError("no output directory given (the name is empty); name a new directory")
    path = (base / Path(name).expanduser()).resolve()
    if path == base or base not in path.parents:
        raise ShedderError(f"{printable(name)} is outside the export directory {base}; "
                           "give a name inside it (no '..', no other absolute path)")
    return path


@contextlib.contextmanager
def publish_dir(target: str | Path, overwrite: bool = False, protected: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on a clean exit it becomes ``target``
    (marked as an export). On any exception the temporary directory is removed and ``target`` is
    untouched. See ``check_output_dir`` for what is refused."""
    out = check_output_dir(target, overwrite, protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "shedder"}) + "\n")
        _replace_dir(tmp, check_output_dir(target, overwrite, protected))  # checked again: it may have changed
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` (empty, or a marked export) is moved aside
    first and deleted only once ``new`` is in place, or moved back if the rename fails."""
    if not out.exists():
        os.rename(new, out)
        return
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def zip_dir(directory: str | Path) -> bytes:
    """A directory's files as zip bytes, under its own name (what a download offers)."""
    import io
    import zipfile

    directory = Path(directory)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(p for p in directory.rglob("*") if p.is_file()):
            z.write(f, Path(directory.name) / f.relative_to(directory))
    return buf.getvalue()


# ------------------------------------------------------------------------------ locks
_HELD: dict[str, threading.Lock] = {}  # lock files this process holds -> who in it holds them
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def exclusive(lock_file: str | Path, what: str, progress=None, poll_s: float = 0.2) -> Iterator[None]:
    """Hold an inter-process lock on ``lock_file`` (created as needed) for the block. Another
    process holding it: ``Busy`` at once, naming ``what``. Another thread of this process (an app
    session, or this session's previous run still stopping): with ``progress``, wait, calling
    ``progress(0, 1, message)`` every ``poll_s`` seconds (it may raise to stop waiting); without,
    ``Busy`` at once."""
    from filelock import FileLock, Timeout

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with _HELD_GUARD:
        local = _HELD.setdefault(str(lock_file.resolve()), threading.Lock())
    while not local.acquire(timeout=poll_s if progress else 0):
        if not progress:
            raise Busy(f"{what} is in use by another session; wait for it to finish")
        progress(0, 1, f"waiting: another session is writing {what}")
    try:
        lock = FileLock(str(lock_file), thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise Busy(f"{what} is in use by another process (lock {lock_file}); "
                       "wait for it to finish, or use another directory") from None
        try:
            yield
        finally:
            lock.release()
    finally:
        local.release()


# ------------------------------------------------------------------------------ logs
def drop_torn_tail(path: str | Path) -> bool:
    """Cut the last line of a JSON-lines file when it is unterminated or not JSON (a write
    interrupted by a kill, or garbage); True when something was cut."""
    path = Path(path)
    data = path.read_bytes()
    if not data:
        return False
    body, _, last = data.rstrip(b"\n").rpartition(b"\n")
    keep = body + b"\n" if body else b""
    try:
        if not isinstance(json.loads(last), dict):  # every line of our logs is an object
            raise ValueError(last)
        if data.endswith(b"\n"):
            return False
        keep = data + b"\n"  # whole JSON, only the newline was lost
    except (ValueError, RecursionError):
        pass
    atomic_write_bytes(path, keep)
    return True
