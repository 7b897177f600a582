"""Writing files without ever losing a user's: atomic files, atomic directory publishing, locks.

* ``atomic_write_text``: a temporary file beside the target, then a rename; readers see the old
  file or the whole new one, never half of it. Temporary names are unique per process and thread.
* ``publish_dir``: a model (or any directory of outputs) is written into a fresh temporary
  directory beside the target and renamed into place only when complete, every file and directory
  in it with the permissions the process umask gives (readable by a team under umask 022). A
  target that exists and is not empty is refused unless ``overwrite``, and even then only if it is
  a previous export of this tool (it holds ``EXPORT_MARKER``); the working directory, the source
  model's directory and their parents are never targets. Any failure leaves the target exactly as
  it was.
* ``exclusive``: an inter-process lock (``filelock``) for a run directory or a cache entry; a second
  process is refused at once with a message saying what is busy (``Busy``); a second thread of this
  process waits, shown and cancellable through its progress callback.
* ``drop_torn_tail``: before appending to a JSON-lines log, move what follows its last record (a
  line a kill left torn, garbage, blank lines) into ``LOG.damaged``, so the next line never glues
  onto it and the run resumes; junk followed by records is refused as corruption.
"""
from __future__ import annotations

import contextlib
import hashlib
import errno
import json
import os
import re
import shutil
import threading
import unicodedata
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, NoReturn

from shedder.core.errors import Busy, ShedderError, printable

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


# ------------------------------------------------------------------------------ the output policy
# Every writer of the tool goes through one of three claims, each checked before any work and again
# just before publishing: ``check_output_file`` (a CSV, a plan, an official config), ``check_output_dir``
# (an exported model) and ``claim_run_dir`` (a search, recovery or imported run). The shared rules
# (``check_place``): an empty name is refused; the working directory, the source model's directory
# and their parents are never targets, and nothing is written inside a source model's directory.

#: A file beside every output file (``.NAME.shedder``): the hash of what this tool wrote, so that
#: ``--overwrite`` replaces only an unchanged output of ours, never a user's file of the same name.
OUTPUT_SIDECAR = ".{name}.shedder"
#: A file every run directory holds from its creation: marks a directory ``--resume`` may write into.
RUN_MARKER = ".shedder-run"
#: The lock file of a run directory (``exclusive``); a directory holding only it is still empty.
RUN_LOCK = ".lock"


def check_place(target: str | Path, protected: Iterable[str | Path], what: str) -> Path:
    if not str(target).strip():
        raise ShedderError(f"no {what} given (the name is empty); name a new one")
    check_path_names(target, f"{what} name")
    out = Path(target).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        where = "is" if out == cwd else "contains"
        raise ShedderError(f"refusing to write to {printable(target)}: it {where} the working directory; "
                           f"name a new {what}")
    for p in protected:
        keep = Path(p).expanduser().resolve()
        if out == keep or out in keep.parents or keep in out.parents:
            where = "is" if out == keep else ("contains" if out in keep.parents else "lies inside")
            raise ShedderError(f"refusing to write to {printable(target)}: it {where} the source directory "
                               f"{printable(p)}, which this command reads; choose another place")
    return out


def model_dirs(*models) -> list[Path]:
    """The local directories ``models`` were loaded from (``name_or_path``): places no output may touch."""
    dirs = []
    for model in models:
        name = str(getattr(model, "name_or_path", "") or "")
        if name and Path(name).expanduser().is_dir():
            dirs.append(Path(name).expanduser().resolve())
    return dirs


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (outputs and checkpoints record it)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(OUTPUT_SIDECAR.format(name=path.name))


def written_by_us(path: str | Path) -> bool:
    """True when ``path`` is a file this tool wrote and nobody has changed since."""
    path = Path(path)
    if not (path.is_file() and _sidecar(path).is_file()):
        return False
    try:
        record = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        return path.is_file() and isinstance(record, dict) and record.get("sha256") == file_sha256(path)
    except (OSError, ValueError):
        return False


def check_output_file(target: str | Path, overwrite: bool = False, protected: Iterable[str | Path] = ()) -> Path:
    """The resolved output file, or ``ShedderError`` saying why it may not be written: an existing
    file is replaced only with ``overwrite`` and only if this tool wrote it, unchanged since."""
    out = check_place(target, protected, "output file")
    if out.is_dir():
        raise ShedderError(f"{printable(target)} is a directory; name a file to write")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ShedderError(f"{printable(target)} already exists; choose a new file, or pass --overwrite to "
                               "replace an earlier output of this tool")
        if not written_by_us(out) or out.is_symlink():
            raise ShedderError(f"refusing to replace {printable(target)}: this tool did not write it (or it was "
                               "changed since); choose a new file")
    sidecar = _sidecar(out)
    if (sidecar.exists() or sidecar.is_symlink()) and not _our_sidecar(sidecar):
        raise ShedderError(f"refusing to write {printable(target)}: its record file {printable(sidecar.name)} exists "
                           "and this tool did not write it; choose another name")
    return out


def _our_sidecar(sidecar: Path) -> bool:
    """Whether ``sidecar`` is a record this tool wrote (so replacing it loses nothing of a user's)."""
    if sidecar.is_symlink() or not sidecar.is_file():  # never open a FIFO or a link for reading
        return False
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("written_by") == "shedder"


def write_output_file(target: str | Path, data: str | bytes, overwrite: bool = False,
                      protected: Iterable[str | Path] = ()) -> Path:
    """Write an output file under the policy (checked, then written atomically, then recorded as
    ours); returns its resolved path."""
    out = check_output_file(target, overwrite, protected)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    check_output_file(target, overwrite, protected)  # checked again: it may have appeared meanwhile
    with reporting_full_disk(target):
        atomic_write_bytes(out, payload)
        atomic_write_text(_sidecar(out), json.dumps({"written_by": "shedder", "sha256": file_sha256(out)}) + "\n")
    return out


#: errno values of a device that cannot take more data: out of space, or out of the user's quota.
FULL_DISK = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}


@contextlib.contextmanager
def reporting_full_disk(target: str | Path) -> Iterator[None]:
    """Turn a full disk (``ENOSPC``, ``EDQUOT``) while writing ``target`` into one ``ShedderError``
    that says so and that nothing was changed: every writer of the output policy writes through a
    temporary name, so a failed write leaves the target as it was, and the raw error (errno,
    temporary file name) would only hide that."""
    try:
        yield
    except Exception as e:
        reason = full_disk_reason(e)
        if reason is None:
            raise
        raise ShedderError(f"{reason} writing {printable(target)}; nothing was changed "
                           "(free space, or choose another --out)") from None


def full_disk_reason(error: BaseException) -> str | None:
    """What a full device did, when ``error`` says it is one: an ``OSError`` with its errno, or a
    library's own error wrapping it (safetensors raises ``SafetensorError: ... os error 28``)."""
    if isinstance(error, OSError) and error.errno in FULL_DISK:
        return FULL_DISK[error.errno]
    text = str(error)
    for code, reason in FULL_DISK.items():
        if os.strerror(code) in text or f"os error {code})" in text:
            return reason
    return None


def check_output_dir(target: str | Path, overwrite: bool = False, protected: Iterable[str | Path] = ()) -> Path:
    """The resolved output directory, or ``ShedderError`` saying why it may not be written."""
    out = check_place(target, protected, "output directory")
    if out.exists() and not out.is_dir():
        raise ShedderError(f"{printable(target)} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ShedderError(f"{printable(target)} exists and is not empty; choose a new directory, or pass "
                               "--overwrite to replace a previous export of this tool")
        if not (out / EXPORT_MARKER).is_file():
            raise ShedderError(f"refusing to replace {printable(target)}: it is not a directory this tool exported "
                               f"(no {EXPORT_MARKER} file in it)")
    return out


def check_cache_dir(target: str | Path, protected: Iterable[str | Path] = ()) -> Path:
    """A cache directory given by the user (``--cache-dir``): the tool writes its own entries under
    it, so it may exist and hold files, but it is never the working directory, a source directory,
    inside one, or a file."""
    out = check_place(target, protected, "cache directory")
    if out.exists() and not out.is_dir():
        raise ShedderError(f"{printable(target)} exists and is not a directory; name a directory for the cache")
    return out


def claim_run_dir(target: str | Path, protected: Iterable[str | Path] = (), what: str = "run",
                  legacy: Iterable[str] = ()) -> Path:
    """Create (or reopen) a run directory: refused when the place is not allowed, when it is a
    file, or when it is a non-empty directory this tool did not make (no ``RUN_MARKER``; runs from
    before the marker are recognised by a file named in ``legacy``). Returns the resolved path,
    created and marked. Whether an existing run may be resumed is for the caller to say."""
    out = check_place(target, protected, f"{what} directory")
    if out.exists() and not out.is_dir():
        raise ShedderError(f"{printable(target)} exists and is not a directory; name a directory for the {what}")
    if out.is_dir() and any(p.name != RUN_LOCK for p in out.iterdir()) and not (out / RUN_MARKER).is_file() \
            and not any((out / name).is_file() for name in legacy):
        raise ShedderError(f"refusing to write the {what} into {printable(target)}: it is not empty and is not a "
                           "run directory of this tool; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_MARKER).is_file():
        atomic_write_text(out / RUN_MARKER, json.dumps({"written_by": "shedder", "run": what}) + "\n")
    return out


# ------------------------------------------------------------------------------ names
#: The longest name of one file or directory most file systems take, in bytes (UTF-8).
NAME_MAX = 255
#: What a name given for an output must be, said whenever one is refused.
NAME_RULE = (f"a name is 1 to {NAME_MAX} bytes (UTF-8) with no NUL byte and no control characters, and is not only "
             "dots")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one file or directory name (``"it contains a NUL byte"``), or None.
    File systems refuse some of these only with a raw ``OSError`` (``ENAMETOOLONG``) or
    ``ValueError`` (NUL), and accept others (a newline, ``...``) that later confuse people."""
    if not name.strip():
        return "it is empty"
    if "\x00" in name:
        return "it contains a NUL byte"
    if "/" in name:
        return "it contains '/'"
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return "it contains a control character"
    if set(name) == {"."}:
        return "it is only dots"
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return f"it is longer than {NAME_MAX} bytes"
    return None


def check_name(name: str, what: str = "name") -> str:
    """``name`` when it is a usable single file or directory name, else ``ShedderError`` naming the rule."""
    problem = name_problem(name)
    if problem:
        _refuse(name, what, problem)
    return name


def check_path_names(path: str | Path, what: str = "name") -> str:
    """``path`` when every one of its parts is a usable name (``name_problem``), else ``ShedderError``
    naming the rule; ``.`` and ``..`` parts pass here and are judged by where the path leads (``inside``)."""
    text = str(path)
    if not text.strip() or "\x00" in text:  # refused whole: there are no parts to judge
        check_name(text, what)
    for part in Path(text).parts:
        problem = None if part in (".", "..", Path(text).anchor) else name_problem(part)
        if problem:
            _refuse(text, what, problem if part == text else f"its part {_shown(part)}: {problem}")
    return text


def _refuse(name: str, what: str, problem: str) -> NoReturn:
    raise ShedderError(f"{_shown(name)} is not a usable {what}: {problem} ({NAME_RULE})")


def _shown(name: str, limit: int = 60) -> str:
    """``name`` escaped (``printable``) and, when long, cut in the middle: a message stays readable."""
    text = printable(name)
    return text if len(text) <= limit else f"{text[:limit - 20]}…{text[-19:]}"


def safe_name(name: str, default: str = "file", limit: int = 120) -> str:
    """A name safe to create for a file a visitor named (an upload): its last part only, every
    character but letters, digits, ``.``, ``-`` and ``_`` replaced by ``_``, no leading dot, at most
    ``limit`` bytes (UTF-8) with its extension kept; ``default`` when nothing usable is left."""
    safe = re.sub(r"[^\w.-]+", "_", re.split(r"[/\\]", name)[-1]).lstrip(".")
    if not safe.strip("._-"):
        return default
    stem, ext = os.path.splitext(safe)
    if len(ext.encode("utf-8")) > 16:  # not an extension, just a dot late in a long name
        stem, ext = safe, ""
    room = limit - len(ext.encode("utf-8"))
    return stem.encode("utf-8")[:room].decode("utf-8", errors="ignore") + ext


def inside(root: str | Path, name: str | Path) -> Path:
    """``root / name`` resolved, or ``ShedderError`` when a part of ``name`` is not a usable name
    (``check_name``) or when it lies outside ``root`` (``..``, an absolute path elsewhere, a symlink
    out) or is ``root`` itself: saves confined to one directory."""
    base = Path(root).expanduser().resolve()
    if not str(name).strip():
        raise ShedderError("no output directory given (the name is empty); name a new directory")
    check_path_names(name, "directory name")
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
    with reporting_full_disk(target):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
        tmp.mkdir()  # not mkdtemp: the export gets the process umask's permissions, readable by its team
        try:
            yield tmp
            (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "shedder"}) + "\n")
            _umask_modes(tmp)
            _replace_dir(tmp, check_output_dir(target, overwrite, protected))  # checked again: it may have changed
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _umask_modes(top: Path) -> None:
    """Give every directory and file under ``top`` the permissions the process umask gives a new one
    (e.g. 0755 and 0644 under umask 022), as read from ``top``, made with ``mkdir`` just before:
    some writers (safetensors, through a temporary file) leave 0600 files a team cannot read. The
    umask is read this way because ``os.umask`` can only be read by setting it, for every thread."""
    dir_mode = top.stat().st_mode & 0o777
    for path in [top, *top.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        want = dir_mode if path.is_dir() else (0o777 if mode & 0o100 else 0o666) & dir_mode
        if mode & 0o777 != want:
            path.chmod(want)


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
#: Beside a JSON-lines log, what ``drop_torn_tail`` cut from its end (appended, never deleted).
DAMAGED_SUFFIX = ".damaged"


def drop_torn_tail(path: str | Path) -> int:
    """Before appending to a JSON-lines log, cut what follows its last record: a last line a kill
    left torn, garbage, blank lines. Every line of our logs is a JSON object; the lines after the
    last one that is (not JSON, not an object, not UTF-8, a torn fragment) are appended to
    ``PATH.damaged`` beside the log (blank lines hold nothing and are just dropped), then the log is
    rewritten atomically without them, so the next line never glues onto a fragment and nothing
    that was in the file is lost. A last record whose newline was lost gets it back. A line that is
    not a record but is *followed* by records is corruption, not a torn tail: ``ShedderError``
    naming the line, and the file is left as it was. Returns the number of lines cut."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the file ends with a newline: no line after it
    good = [_is_record(line) for line in lines]
    last = max((i for i, ok in enumerate(good) if ok), default=-1)
    for i in range(last):
        if not good[i]:
            raise ShedderError(f"{printable(path)}: line {i + 1} is not a JSON object, but records follow it; "
                               "the log is damaged (repair or remove that line)")
    tail = lines[last + 1:]
    keep = b"".join(line + b"\n" for line in lines[:last + 1])
    if keep == data:
        return 0
    junk = [line for line in tail if line.strip()]
    if junk:
        with path.with_name(path.name + DAMAGED_SUFFIX).open("ab") as f:
            f.write(b"".join(line + b"\n" for line in junk))
            f.flush()
            os.fsync(f.fileno())
    atomic_write_bytes(path, keep)
    return len(tail)


def _is_record(line: bytes) -> bool:
    """Whether one line of a log is a JSON object (anything unreadable is not)."""
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):  # not JSON or not UTF-8 (both ValueError), nested too deeply
        return False
