"""Liveness apart from progress: a process's heartbeat goes out from a thread of its own on a
fixed beat, whatever its main loop is doing (a long step, a graph capture, a stalled copy), and
says separately how far that loop has got, so a slow worker is never taken for a dead one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from transport.messages import Progress

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.25


class SharedSocket:
    """A ZeroMQ socket used by a main loop and its heartbeat thread. ZeroMQ sockets are not
    thread-safe, so every use holds one lock; sends never block (a router that is gone must
    not wedge the heartbeat thread while it holds the lock)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, data: bytes) -> bool:
        with self.lock:
            try:
                self.sock.send(data, zmq.NOBLOCK)
                return True
            except zmq.Again:
                return False

    def poll(self, timeout_ms: int) -> bool:
        with self.lock:
            return bool(self.sock.poll(timeout_ms))

    def recv_nowait(self) -> list[bytes] | None:
        """The next message's frames, or None when there is none."""
        with self.lock:
            try:
                return self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None

    def close(self) -> None:
        with self.lock:
            self.sock.close(0)


class StepProgress:
    """Counts engine steps and times the one running now; written by the main loop, read by
    the heartbeat thread (plain attribute stores, so a read sees one value or the other)."""

    def __init__(self) -> None:
        self.steps_total = 0
        self.last_step_ms = 0.0
        self._started = 0.0

    def begin(self) -> None:
        self._started = time.monotonic()

    def end(self) -> None:
        started, self._started = self._started, 0.0
        self.steps_total += 1
        self.last_step_ms = (time.monotonic() - started) * 1000 if started else 0.0

    def snapshot(self) -> Progress:
        started = self._started
        running = time.monotonic() - started if started else 0.0
        return Progress(self.steps_total, round(running, 3), round(self.last_step_ms, 3))


class HeartbeatThread:
    """Calls `beat` every `interval_s` from a daemon thread until stopped."""

    def __init__(self, beat: Callable[[], None], interval_s: float = HEARTBEAT_S) -> None:
        self.beat = beat
        self.interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval_s + 1)

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                self.beat()
                failures = 0
            except Exception:
                failures += 1
                if failures == 1:  # one line per outage, not one per beat
                    log.exception("heartbeat failed")
            self._stopped.wait(self.interval_s)


def host_identity() -> str:
    """This host's name, boot id and pid namespace: equal for two processes exactly when their
    pids are in the same process table (as far as a router can cheaply tell); empty where the
    process table cannot be identified, so nobody relies on it."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{socket.gethostname()}/{boot}/{namespace}"


def process_exited(pid: int) -> bool:
    """Whether `pid` (in this process table) is gone or a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"
