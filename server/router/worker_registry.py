"""The router's book of workers: who registered from which ZeroMQ identity, and whether each
is alive (its process exists and heartbeats arrive), stuck (alive, but one step has run past a
deadline), or draining (finishing its requests before it exits).

Liveness is about the process, never the step: heartbeats come from a thread of their own in
every worker, a worker on this host is checked by pid within a heartbeat of exiting, and a
worker that is merely slow stays alive. A stuck worker stays registered, but takes nothing new
and the router moves its requests elsewhere. Silence is counted only while the router itself
ran: a router stalled past the timeout (a paused VM, a starved process) finds its workers'
heartbeats waiting unread, and must not call them dead for its own absence.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import msgspec

from transport.heartbeat import host_identity, process_exited
from transport.messages import Register, WorkerStats

log = logging.getLogger(__name__)

PID_CHECK_S = 0.2


class RegistrationRefused(Exception):
    """A Register the router will not accept (a forged or conflicting identity)."""


@dataclass
class WorkerInfo:
    instance: str
    role: str
    identity: bytes
    registration: Register
    last_seen: float
    alive: bool = True
    stuck: bool = False
    draining: bool = False
    death: str = ""  # why it was marked dead

    @property
    def available(self) -> bool:
        """Whether new work may be placed here."""
        return self.alive and not self.stuck and not self.draining

    # What scheduler.routing reads of a worker (its WorkerState).
    @property
    def stats(self) -> WorkerStats:
        return self.registration.stats

    @property
    def colocated_with(self) -> str:
        return self.registration.colocated_with

    @property
    def heartbeat_at(self) -> float:
        return self.last_seen

    def as_json(self, now: float) -> dict:
        return {
            "role": self.role,
            "alive": self.alive,
            "stuck": self.stuck,
            "draining": self.draining,
            "pid": self.registration.pid,
            "seconds_since_heartbeat": round(now - self.last_seen, 3),
            **msgspec.structs.asdict(self.registration.progress),
            **msgspec.structs.asdict(self.registration.stats),
        }


class WorkerRegistry:
    def __init__(self, heartbeat_timeout_s: float, stuck_timeout_s: float) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.stuck_timeout_s = stuck_timeout_s
        self.workers: dict[str, WorkerInfo] = {}
        self.host = host_identity()
        self._pids_checked_at = 0.0

    def get(self, instance: str | None) -> WorkerInfo | None:
        return self.workers.get(instance) if instance else None

    def sender(self, identity: bytes) -> WorkerInfo | None:
        """The registered worker that owns this ZeroMQ identity, if any."""
        worker = self.workers.get(identity.decode("utf-8", "replace"))
        return worker if worker is not None and worker.identity == identity else None

    def register(self, identity: bytes, msg: Register) -> tuple[WorkerInfo, WorkerInfo | None]:
        """Records a heartbeat; returns the worker and, when a new process took over the name
        (a restart), the old incarnation, now dead, whose requests must move."""
        # Workers name their socket after their instance, and ZeroMQ lets one identity connect
        # only once at a time: a Register whose name is not its sender's is forged.
        if msg.instance.encode() != identity:
            raise RegistrationRefused(f"{msg.instance!r} registered from identity {identity!r}")
        if msg.role not in ("prefill", "decode", "attention"):
            raise RegistrationRefused(f"{msg.instance!r} registered an unknown role {msg.role!r}")
        known = self.workers.get(msg.instance)
        now = time.monotonic()
        replaced = None
        if known is not None and known.registration.pid != msg.pid:
            if known.alive:
                self.mark_dead(known, f"replaced by pid {msg.pid}")
            replaced = known
        elif known is not None and known.role != msg.role:
            raise RegistrationRefused(f"{msg.instance!r} is a {known.role}, not a {msg.role}")
        if known is None or replaced is not None or not known.alive:
            log.info("%s worker %s (pid %d) registered", msg.role, msg.instance, msg.pid)
            worker = WorkerInfo(msg.instance, msg.role, identity, msg, now)
            self.workers[msg.instance] = worker
        else:
            worker = known
            worker.registration, worker.last_seen = msg, now
        self._update_progress(worker)
        return worker, replaced

    def _update_progress(self, worker: WorkerInfo) -> None:
        reg = worker.registration
        stuck = reg.progress.step_running_s > self.stuck_timeout_s
        if stuck != worker.stuck:
            log.warning("%s worker %s %s", worker.role, worker.instance,
                        f"stuck in one step for {reg.progress.step_running_s:.0f} s"
                        if stuck else "made progress again")  # fmt: skip
        worker.stuck = stuck
        # Draining is for good: once said, a worker takes nothing new until it is gone.
        worker.draining = worker.draining or reg.draining

    def check(self, now: float) -> list[WorkerInfo]:
        """Marks silent or exited workers dead; returns those that died now."""
        died = []
        check_pids = now - self._pids_checked_at >= PID_CHECK_S
        if check_pids:
            self._pids_checked_at = now
        for w in self.workers.values():
            if not w.alive:
                continue
            if now - w.last_seen > self.heartbeat_timeout_s:
                self.mark_dead(w, f"no heartbeat for {now - w.last_seen:.1f} s")
            elif check_pids and self._on_this_host(w) and process_exited(w.registration.pid):
                self.mark_dead(w, f"its process (pid {w.registration.pid}) exited")
            else:
                continue
            died.append(w)
        return died

    def forgive(self, stall_s: float, now: float) -> None:
        """The router did not run for `stall_s`: the heartbeats sent meanwhile wait unread in
        its socket, so that time is no worker's silence."""
        for w in self.workers.values():
            w.last_seen = min(now, w.last_seen + stall_s)

    def _on_this_host(self, worker: WorkerInfo) -> bool:
        return bool(self.host) and worker.registration.host == self.host

    def mark_dead(self, worker: WorkerInfo, why: str) -> None:
        worker.alive, worker.death = False, why
        log.warning("%s worker %s marked dead: %s", worker.role, worker.instance, why)

    def of_role(self, role: str) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.role == role]
