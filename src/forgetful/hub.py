"""Access to the Hugging Face Hub: a fast reachability probe and clear offline errors.

Without a network, ``datasets`` and ``transformers`` retry for up to a minute before failing. We
probe ``huggingface.co`` once (3 s) and, when it is unreachable, load from the local cache only,
so an offline user gets a one-line answer at once instead of a minute of retries.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator

from .errors import ForgetfulError

HUB_HOST = "huggingface.co"


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hub can be reached (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def cache_only_when_offline() -> Iterator[bool]:
    """While active, the Hub libraries read the local cache only if the Hub is unreachable.
    Yields whether the Hub is reachable."""
    online = hub_reachable()
    if online:
        yield True
        return
    import datasets.config
    import huggingface_hub.constants

    saved = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def hub_error(kind: str, name: str, exc: BaseException, local_hint: str) -> ForgetfulError:
    """One clear line for a failed Hub load: what, why, and how to use a local copy."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = "the Hub is unreachable (offline?) and it is not in the local cache" if not hub_reachable() else reason
    return ForgetfulError(f"cannot load {kind} '{name}': {where}; {local_hint}")
