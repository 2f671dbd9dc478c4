"""`adrenaline serve`'s own calls to its router: /health while it starts, then on stop
POST /admin/drain (new requests get 503) and GET /stats until no request is in flight.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

log = logging.getLogger(__name__)

POLL_S = 0.2
# Loopback calls to our own router, never through an http_proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def local_url(host: str, port: int) -> str:
    """Where serve reaches its own router: a wildcard bind answers on loopback."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def healthy(url: str) -> bool:
    try:
        with _HTTP.open(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def drain(url: str, api_key: str | None, timeout_s: float, give_up: Callable[[], bool]) -> bool:
    """Has the router refuse new requests and waits, at most `timeout_s` or until `give_up()`,
    for those in flight to finish. False when cut short; a router without /admin/drain (404) is
    not waited for."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        _call(f"{url}/admin/drain", headers, method="POST")
    except urllib.error.HTTPError as exc:
        return exc.code == 404 or _cut_short(f"POST /admin/drain answered {exc.code}")
    except OSError as exc:
        return _cut_short(f"the router did not take POST /admin/drain ({exc})")
    log.info("draining: new requests get 503 (at most %g s; a second Ctrl-C stops now)", timeout_s)
    deadline = time.monotonic() + timeout_s
    active: object = "?"
    while not give_up():
        try:
            active = json.loads(_call(f"{url}/stats", headers))["requests"]["active"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a busy router may answer late; the deadline still holds
        if active == 0:
            return True
        if time.monotonic() >= deadline:
            return _cut_short(f"{active} requests in flight after --drain-timeout {timeout_s:g}")
        time.sleep(POLL_S)
    return _cut_short(f"stopped with {active} requests in flight")


def _cut_short(reason: str) -> bool:
    print(f"adrenaline serve: error: drain: {reason}; stopping anyway", file=sys.stderr, flush=True)
    return False


def _call(url: str, headers: dict[str, str], method: str = "GET") -> bytes:
    data = b"" if method == "POST" else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    with _HTTP.open(request, timeout=5) as resp:
        return resp.read()
