"""Whether the Hugging Face hub can be used, decided in seconds: the HF_HUB_OFFLINE flag, else one TCP connection
to the hub (3 s, remembered for a minute). Loaders ask before they let a library reach the network, so a missing
model fails at once with the local alternatives instead of after transformers' retries."""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
PROBE_TTL_S = 60.0
_TRUTHY = ("1", "true", "yes", "on")

_lock = threading.Lock()
_probe: tuple[float, bool] | None = None  # (when, reachable)


def offline_flag() -> bool:
    """HF_HUB_OFFLINE is set (the user, CI or the tests asked for no network)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def reachable() -> bool:
    """One TCP connection to the hub's endpoint within PROBE_TIMEOUT_S, its answer kept for PROBE_TTL_S. Behind a
    proxy (HTTPS_PROXY) the direct connection says nothing, so the hub counts as reachable."""
    global _probe
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    with _lock:
        if _probe is not None and time.monotonic() - _probe[0] < PROBE_TTL_S:
            return _probe[1]
        try:
            with socket.create_connection(_endpoint(), timeout=PROBE_TIMEOUT_S):
                ok = True
        except OSError:
            ok = False
        _probe = (time.monotonic(), ok)
        return ok


def offline() -> bool:
    """No hub: the flag is set or the endpoint does not answer. Loaders then read the local cache only."""
    return offline_flag() or not reachable()


def offline_reason() -> str:
    """Why the hub is not used, in words for an error message."""
    if offline_flag():
        return "the hub is offline (HF_HUB_OFFLINE=1)"
    host, _ = _endpoint()
    return f"{host} cannot be reached (no answer within {PROBE_TIMEOUT_S:g} s)"
