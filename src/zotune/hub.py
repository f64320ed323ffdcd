"""The Hugging Face hub: whether it answers, and reading from the local cache when it does not."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator


def reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint (or the configured HTTPS proxy) accepts a connection.

    A quick probe, so that an offline machine fails in seconds instead of minutes of retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    from urllib.parse import urlparse
    from urllib.request import getproxies

    from huggingface_hub import constants

    url = urlparse(getproxies().get("https") or constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def offline() -> Iterator[None]:
    """`datasets` and `huggingface_hub` in offline mode for the duration: hub ids resolve from the local
    cache at once instead of after retries (as ``HF_HUB_OFFLINE=1`` does, set after they are imported)."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
