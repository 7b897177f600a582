"""What the studio lets its visitors do, decided by whoever starts the server, never by a visitor.

Two switches and a place:

* ``allow_remote_code`` — may a visitor tick "trust remote code" (run a hub repository's Python on
  the server)?
* ``allow_save`` — may a visitor write an extracted model to the server's disk (under
  ``export_root`` only)? Without it the Export page still offers the model as a zip download.
* ``export_root`` — the one directory server-side saves go into; a path outside it (``..``, an
  absolute path elsewhere) is refused.

Each comes from an environment variable (``SHEDDER_ALLOW_REMOTE_CODE``, ``SHEDDER_ALLOW_SAVE``:
``1``/``true``/``yes`` or ``0``/``false``/``no``; ``SHEDDER_EXPORT_ROOT``), else from a ``[shedder]``
section in ``.streamlit/secrets.toml`` (``allow_remote_code``, ``allow_save``, ``export_root``). When
neither says, both switches are on only while the server listens on localhost alone
(``server.address`` is ``localhost``, ``127.0.0.1`` or ``::1``); the export root defaults to
``./exports``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

LOCAL_ADDRESSES = ("localhost", "127.0.0.1", "::1")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Hosting:
    allow_remote_code: bool
    allow_save: bool
    export_root: Path
    local_only: bool  # the server listens on localhost alone


def _secrets() -> dict:
    try:
        return dict(st.secrets.get("shedder", {}))
    except Exception:  # no secrets file (the usual case) or an unreadable one: nothing configured there
        return {}


def _flag(env: str, key: str, secrets: dict, default: bool) -> bool:
    raw = os.environ.get(env)
    value = raw if raw is not None else secrets.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{env} / [shedder] {key} must be true or false, got {value!r}")


def hosting() -> Hosting:
    """The settings of this server (read on every call: cheap, and a restart is not needed in tests)."""
    local = str(st.get_option("server.address") or "").strip() in LOCAL_ADDRESSES
    secrets = _secrets()
    root = os.environ.get("SHEDDER_EXPORT_ROOT") or secrets.get("export_root") or "exports"
    return Hosting(allow_remote_code=_flag("SHEDDER_ALLOW_REMOTE_CODE", "allow_remote_code", secrets, local),
                   allow_save=_flag("SHEDDER_ALLOW_SAVE", "allow_save", secrets, local),
                   export_root=Path(root).expanduser().resolve(), local_only=local)
