"""Control-plane secrets and socket hardening. A deployment shares one cluster key; from it every
member derives the same CURVE keypair, so each holder is both a valid server and a valid client,
and a ZAP authenticator admits exactly that public key. Without a key, sockets bind only where no
other host can reach them. Also: frame limits, HMACs for the data plane's rendezvous, and the
counter every receive loop uses for what it drops.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.base import Authenticator
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

KEY_ENV = "ADRENALINE_CLUSTER_KEY"
KEY_BYTES = 32
ZAP_DOMAIN = "adrenaline"
# The largest control message is a Prefill or ReserveDecode: a prompt's token ids at up to
# 5 bytes each in msgpack, plus a generator state of a few KiB. 64 MiB holds prompts of over
# 10 million tokens, far past any max_model_len, while a peer announcing a larger frame is
# disconnected before anything is allocated.
MAX_FRAME_BYTES = 64 << 20

log = logging.getLogger(__name__)


class ClusterKeyError(ValueError):
    """The cluster key file or variable is missing, unreadable, malformed or too permissive."""


class InsecureBindError(ValueError):
    """A control socket would listen beyond this host without a cluster key."""


@dataclass(frozen=True, repr=False)
class ClusterKey:
    secret: bytes  # KEY_BYTES random bytes

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ClusterKeyError(f"a cluster key is {KEY_BYTES} bytes, not {len(self.secret)}")

    @classmethod
    def parse(cls, text: str, source: str) -> ClusterKey:
        text = text.strip()
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) != KEY_BYTES:
            raise ClusterKeyError(
                f"{source} is not a cluster key (expected {2 * KEY_BYTES} hex digits, as "
                "`adrenaline keygen` writes)"
            )
        return cls(secret)

    def to_text(self) -> str:
        return self.secret.hex()

    def _derive(self, purpose: bytes) -> bytes:
        return hashlib.blake2b(self.secret, digest_size=32, person=purpose).digest()

    @cached_property
    def curve_secret(self) -> bytes:
        """z85 CURVE secret key; curve25519 takes any 32 bytes (it clamps them itself)."""
        return z85.encode(self._derive(b"adrenaline-curve"))

    @cached_property
    def curve_public(self) -> bytes:
        return zmq.curve_public(self.curve_secret)

    def mac(self, *parts: str | bytes | int) -> str:
        """Hex HMAC-SHA256 over the parts (length-prefixed, so no two lists collide)."""
        h = hmac.new(self._derive(b"adrenaline-hmac"), digestmod=hashlib.sha256)
        for part in parts:
            raw = part if isinstance(part, bytes) else str(part).encode()
            h.update(len(raw).to_bytes(8, "big") + raw)
        return h.hexdigest()

    def verify(self, mac: str, *parts: str | bytes | int) -> bool:
        return hmac.compare_digest(mac.encode(), self.mac(*parts).encode())

    def __repr__(self) -> str:  # never the secret
        return f"ClusterKey(public={self.curve_public.decode()})"


# Key files -----------------------------------------------------------------------------------


def generate_cluster_key() -> str:
    return secrets.token_bytes(KEY_BYTES).hex()


def write_cluster_key(path: str | os.PathLike) -> ClusterKey:
    """A new key in a new file only its owner may read; never overwrites one."""
    text = generate_cluster_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ClusterKeyError(f"{path} exists; remove it or choose another --output") from exc
    except OSError as exc:
        raise ClusterKeyError(f"cannot create cluster key file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return ClusterKey.parse(text, str(path))


def load_cluster_key(
    path: str | os.PathLike | None, env: Mapping[str, str] = os.environ
) -> ClusterKey | None:
    """The key in `path`, else the one in $ADRENALINE_CLUSTER_KEY (the key's text), else None."""
    if path is None:
        text = env.get(KEY_ENV, "")
        return ClusterKey.parse(text, f"${KEY_ENV}") if text.strip() else None
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ClusterKeyError(f"cluster key {path} is not a regular file")
        if mode & 0o077:
            raise ClusterKeyError(
                f"cluster key file {path} may be read by other users (mode "
                f"{stat.S_IMODE(mode):o}); run `chmod 600 {path}`"
            )
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ClusterKeyError(
            f"cluster key file {path} does not exist; create it with "
            f"`adrenaline keygen --output {path}`"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ClusterKeyError(f"cannot read cluster key file {path}: {exc}") from exc
    return ClusterKey.parse(text, f"cluster key file {path}")


# Sockets -------------------------------------------------------------------------------------


def is_local_address(address: str) -> bool:
    """True for ZeroMQ addresses no other host can reach: ipc://, inproc://, tcp:// loopback."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    if rest.startswith("["):
        host = rest[1:].split("]", 1)[0]
    else:
        host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: may face the network


def secure_server(sock: zmq.Socket, key: ClusterKey | None, address: str) -> None:
    """Call before bind. With a key: CURVE server, peers checked by the context's authenticator.
    Without: only a local bind address is allowed."""
    if key is None:
        if not is_local_address(address):
            raise InsecureBindError(
                f"binding the control plane on {address} without --cluster-key would let any "
                "host register as a worker; pass --cluster-key FILE (see `adrenaline keygen`)"
            )
        return
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, key.curve_secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, key.curve_public)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())


def secure_client(sock: zmq.Socket, key: ClusterKey | None) -> None:
    """Call before connect: CURVE client of a server holding the same key."""
    if key is None:
        return
    sock.setsockopt(zmq.CURVE_SERVERKEY, key.curve_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, key.curve_public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, key.curve_secret)


def set_frame_limit(sock: zmq.Socket, max_bytes: int = MAX_FRAME_BYTES) -> None:
    """Call before bind or connect (ZeroMQ copies options then). A peer sending a larger frame
    is disconnected instead of making us allocate it."""
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)


class _OnlyClusterKey:
    def __init__(self, public: bytes) -> None:
        self.public = public
        self.refused = DroppedMessages(log, "refused a connection")

    def callback(self, domain: str, key: bytes) -> bool:
        if hmac.compare_digest(key, self.public):
            return True
        self.refused.drop("the peer does not hold this deployment's cluster key",
                          f"its public key is {key.decode()}")  # fmt: skip
        return False


def start_authenticator(ctx: zmq.Context, key: ClusterKey | None) -> Authenticator | None:
    """The ZAP handler of `ctx`, admitting only the cluster key's public key. Start it before
    the first bind of a CURVE server and stop it before ctx.term(); the router's asyncio
    context needs a running event loop."""
    if key is None:
        return None
    if isinstance(ctx, zmq.asyncio.Context):
        auth: Authenticator = AsyncioAuthenticator(ctx)
    else:
        auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(ZAP_DOMAIN, _OnlyClusterKey(key.curve_public))
    return auth


# Receive loops -------------------------------------------------------------------------------


class DroppedMessages:
    """Counts what a receive loop drops; logs each reason at most once per `interval_s`, with
    how many were dropped silently since, so a flood of garbage cannot flood the log too.
    Reasons come from a fixed set (a peer's content goes in `detail`)."""

    def __init__(
        self, logger: logging.Logger, what: str = "dropped a message", interval_s: float = 5.0
    ) -> None:
        self.log = logger
        self.what = what
        self.interval_s = interval_s
        self.total = 0
        self._last_logged: dict[str, float] = {}
        self._silent: dict[str, int] = {}

    def drop(self, reason: str, detail: str = "") -> None:
        self.total += 1
        now = time.monotonic()
        if now - self._last_logged.get(reason, float("-inf")) < self.interval_s:
            self._silent[reason] = self._silent.get(reason, 0) + 1
            return
        silent = self._silent.pop(reason, 0)
        self._last_logged[reason] = now
        more = f" ({silent} more since the last report)" if silent else ""
        self.log.warning("%s: %s%s%s", self.what, reason, f" ({detail})" if detail else "",
                         more)  # fmt: skip


_HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def report_handshake_failures(sock: zmq.Socket, peer: str) -> None:
    """Logs (once per outage) when this client's CURVE handshake with `peer` fails: with a
    wrong key the peer drops the connection before any message, so neither side would
    otherwise say why this process never joins."""
    from zmq.utils.monitor import recv_monitor_message

    monitor = sock.get_monitor_socket(_HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED)

    def watch() -> None:
        failing = False
        try:
            while True:
                event = recv_monitor_message(monitor)["event"]
                if event == zmq.EVENT_MONITOR_STOPPED:
                    return
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    failing = False
                elif not failing:
                    failing = True
                    log.error("the handshake with %s failed: check --cluster-key (both ends "
                              "must hold the same key file)", peer)  # fmt: skip
        except zmq.ZMQError:
            return  # the context is closing
        finally:
            monitor.close(0)

    threading.Thread(target=watch, name="handshake-monitor", daemon=True).start()
