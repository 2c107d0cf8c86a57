"""The supervisor: watches every process of every running guest and feeds the HealthPolicy.

For each main QEMU and each remote it holds a pidfd watch (exit seen at once) and a QMP
``query-status`` probe loop (hang seen within interval + timeout). Each observation goes through
:func:`mpqemu_mgmt.orchestrate.heartbeat.decide`; the resulting actions are handed to an
:class:`Executor` (the daemon), except ``Kill``, which the supervisor performs itself through the
pidfd (pidfd_send_signal cannot hit a recycled pid). Must not touch QEMU state (no device_add,
no stop): that is the executor's job under the guest's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mpqemu_mgmt.orchestrate.heartbeat import (
    Action,
    Emit,
    Exited,
    Health,
    Kill,
    Observation,
    OnFailure,
    PidfdWatch,
    Probe,
    QmpProbe,
    ReplugFailed,
    Replugged,
    Role,
    Settings,
    State,
    decide,
    probe_forever,
)

MAIN = "main"  # the subject key of a guest's main QEMU; devices use their id


class Executor(Protocol):
    """What the supervisor needs from the daemon."""

    def on_transition(self, guest: str, subject: str, health: Health, event: Emit) -> None: ...

    def on_action(self, guest: str, subject: str, health: Health, action: Action) -> None: ...


@dataclass
class Watch:
    guest: str
    subject: str
    pid: int
    health: Health
    pidfd: int | None = None
    watch: PidfdWatch | None = None
    probe: asyncio.Task[None] | None = None
    latency: float | None = None
    detected_at: dict[str, float] = field(default_factory=dict)


class Supervisor:
    def __init__(self, executor: Executor, settings: Settings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.executor = executor
        self.settings = settings
        self.clock = clock
        self.watches: dict[tuple[str, str], Watch] = {}

    def watch(self, guest: str, subject: str, *, pid: int, pidfd: int | None, qmp: str | None,
              role: Role, on_failure: str = "replug", restarts: int = 0,
              health: Health | None = None, probe: Probe | None = None, gone: bool = False) -> Watch:
        """Start watching one process (replacing an older watch on the same subject).

        ``gone``: the process is known to have exited already (found dead at re-adoption; its pid
        may have been recycled, so it is not even opened).

        The watch owns a pidfd of its own (a dup of ``pidfd``, or one opened from ``pid``), so the
        driver closing its copy can never make us signal a recycled fd number.
        """
        self.unwatch(guest, subject)
        if health is None:
            health = Health(role=role, on_failure=OnFailure(on_failure), restarts=restarts)
        w = Watch(guest, subject, pid, health)
        self.watches[(guest, subject)] = w
        try:
            w.pidfd = None if gone else os.dup(pidfd) if pidfd is not None else os.pidfd_open(pid)
        except OSError:
            w.pidfd = None
        if w.pidfd is not None:
            w.watch = PidfdWatch(w.pidfd, lambda status: self._exited(w, status))
        else:
            # the pid is already gone (re-adoption of a process that died while we were away)
            asyncio.get_running_loop().call_soon(self._exited, w, "exited")
        if probe is None and qmp is not None and w.pidfd is not None:
            probe = QmpProbe(qmp, self.settings.timeout)
        if probe is not None:
            w.probe = asyncio.create_task(
                probe_forever(probe, self.settings.interval,
                              lambda obs: self.observe(w, obs)),
                name=f"heartbeat:{guest}:{subject}")
        return w

    def replugged(self, guest: str, subject: str, *, pid: int, pidfd: int | None, qmp: str | None) -> Watch:
        """A fresh process replaced a dead one: same health record, restart counted."""
        old = self.watches.get((guest, subject))
        health = old.health if old is not None else Health(role=Role.REMOTE)
        w = self.watch(guest, subject, pid=pid, pidfd=pidfd, qmp=qmp, role=health.role, health=health)
        self.observe(w, Replugged(at=self.clock()))
        return w

    def replug_failed(self, guest: str, subject: str, reason: str) -> None:
        w = self.watches.get((guest, subject))
        if w is not None:
            self.observe(w, ReplugFailed(at=self.clock(), reason=reason))

    def unwatch(self, guest: str, subject: str) -> Watch | None:
        """Stop watching (before we stop or replace the process ourselves: no false alarm)."""
        w = self.watches.pop((guest, subject), None)
        if w is not None:
            if w.watch is not None:
                w.watch.cancel()
            if w.probe is not None:
                w.probe.cancel()
            if w.pidfd is not None:
                with contextlib.suppress(OSError):
                    os.close(w.pidfd)
                w.pidfd = None
        return w

    def unwatch_guest(self, guest: str) -> None:
        for g, s in list(self.watches):
            if g == guest:
                self.unwatch(g, s)

    def get(self, guest: str, subject: str) -> Watch | None:
        return self.watches.get((guest, subject))

    def latencies(self) -> dict[tuple[str, str], float]:
        return {k: w.latency for k, w in self.watches.items() if w.latency is not None}

    async def close(self) -> None:
        tasks = [w.probe for w in self.watches.values() if w.probe is not None]
        for g, s in list(self.watches):
            self.unwatch(g, s)
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- observations -----------------------------------------------------------------------

    def _exited(self, w: Watch, status: str) -> None:
        w.detected_at["exit"] = self.clock()
        if w.probe is not None:
            w.probe.cancel()  # nothing left to probe; late misses would only be noise
        self.observe(w, Exited(at=self.clock(), status=status))

    def observe(self, w: Watch, obs: Observation) -> None:
        if self.watches.get((w.guest, w.subject)) is not w:
            return  # a result for a watch that was replaced or removed
        before = w.health
        w.health, actions = decide(w.health, obs, self.settings)
        if hasattr(obs, "latency"):
            w.latency = obs.latency
        for action in actions:
            if isinstance(action, Emit):
                self.executor.on_transition(w.guest, w.subject, w.health, action)
            elif isinstance(action, Kill):
                w.detected_at["hung"] = self.clock()
                self._kill(w)
                self.executor.on_action(w.guest, w.subject, w.health, action)
            else:
                self.executor.on_action(w.guest, w.subject, w.health, action)
        final = w.health.state in (State.FAILED, State.STOPPED)
        if before.state is not w.health.state and final and w.probe is not None:
            w.probe.cancel()  # stop probing, keep the final health for `status`

    def _kill(self, w: Watch) -> None:
        # A hung remote holds the vCPU that touched it (the proxy waits with the BQL held in
        # mpqemu_msg_send_and_await_reply, hw/remote/mpqemu-link.c): only killing it frees the guest.
        if w.pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(w.pidfd, signal.SIGKILL)
