"""The model hub, seen from a machine that may be offline.

With no route to the hub, hub ids resolve from the local cache at once instead of retrying the
network for half a minute: models (``shedder.formats.loading``) and datasets (``shedder.measure.data``,
lm-eval's tasks) both ask ``hub_unreachable`` first.
"""
from __future__ import annotations

import contextlib
import functools
import socket
from urllib.parse import urlparse


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> bool:
    """True when the model hub cannot be reached (checked once per process, 3 s at most), so that
    hub ids resolve from the local cache at once instead of retrying the network for half a minute."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return False
    except OSError:
        return True


@contextlib.contextmanager
def offline_when_unreachable():
    """With no route to the hub, let `datasets` use its local cache at once instead of retrying the
    network for half a minute (the same check ``shedder.formats.loading`` makes for models)."""
    if not hub_unreachable():
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
