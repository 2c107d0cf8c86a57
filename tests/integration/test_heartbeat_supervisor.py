"""The supervisor with real processes (``sleep``) and a recording executor: exits become events
and actions, unwatching before a planned stop raises no alarm, a process found dead at re-adoption
is reported at once, and a replug keeps the health record (restarts counted)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

from mpqemu_mgmt.orchestrate.heartbeat import (
    Action,
    Emit,
    Health,
    OnFailure,
    Replug,
    Role,
    Settings,
    State,
    StopGuest,
)
from mpqemu_mgmt.service.supervisor import Supervisor


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple[str, str, str]] = []
        self.changed = asyncio.Event()

    def on_transition(self, guest: str, subject: str, health: Health, event: Emit) -> None:
        self.log.append((guest, subject, event.kind))
        self.changed.set()

    def on_action(self, guest: str, subject: str, health: Health, action: Action) -> None:
        self.log.append((guest, subject, type(action).__name__))
        self.changed.set()


async def until(rec: Recorder, item: tuple[str, str, str], timeout: float = 5.0) -> None:
    async def wait() -> None:
        while item not in rec.log:
            rec.changed.clear()
            await rec.changed.wait()
    await asyncio.wait_for(wait(), timeout)


def spawn() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def test_exit_becomes_dead_then_replug_and_replugged_keeps_counts() -> None:
    async def run() -> None:
        rec = Recorder()
        sup = Supervisor(rec, Settings())
        p = spawn()
        sup.watch("g", "d0", pid=p.pid, pidfd=None, qmp=None, role=Role.REMOTE)
        os.kill(p.pid, signal.SIGKILL)
        await until(rec, ("g", "d0", "Replug"))
        assert ("g", "d0", "dead") in rec.log
        w = sup.get("g", "d0")
        assert w is not None and w.health.state is State.DEAD
        p2 = spawn()
        sup.replugged("g", "d0", pid=p2.pid, pidfd=None, qmp=None)
        w = sup.get("g", "d0")
        assert w is not None and w.health.restarts == 1 and w.health.state is State.STARTING
        p2.kill()

        async def second() -> None:
            while rec.log.count(("g", "d0", "Replug")) < 2:
                rec.changed.clear()
                await rec.changed.wait()
        await asyncio.wait_for(second(), 5)
        w = sup.get("g", "d0")
        assert w is not None and w.health.consecutive == 1 and w.health.state is State.BACKOFF
        await sup.close()
        p.wait()
        p2.wait()

    asyncio.run(run())


def test_unwatch_before_a_planned_stop_raises_no_alarm() -> None:
    async def run() -> None:
        rec = Recorder()
        sup = Supervisor(rec, Settings())
        p = spawn()
        sup.watch("g", "d0", pid=p.pid, pidfd=None, qmp=None, role=Role.REMOTE)
        sup.unwatch("g", "d0")
        p.kill()
        p.wait()
        await asyncio.sleep(0.2)
        assert rec.log == []
        await sup.close()

    asyncio.run(run())


def test_process_found_dead_at_readoption_is_reported_at_once() -> None:
    async def run() -> None:
        rec = Recorder()
        sup = Supervisor(rec, Settings())
        # gone=True: never opened (its pid may belong to someone else by now)
        sup.watch("g", "d0", pid=os.getpid(), pidfd=None, qmp=None, role=Role.REMOTE, on_failure="stop",
                  health=Health(role=Role.REMOTE, on_failure=OnFailure.STOP, state=State.HEALTHY), gone=True)
        await until(rec, ("g", "d0", "StopGuest"), timeout=2)
        await sup.close()

    asyncio.run(run())
    _ = StopGuest, Replug  # the action types this module asserts by name


def test_main_qemu_death_is_a_guest_crash() -> None:
    async def run() -> None:
        rec = Recorder()
        sup = Supervisor(rec, Settings())
        p = spawn()
        sup.watch("g", "main", pid=p.pid, pidfd=None, qmp=None, role=Role.MAIN)
        p.kill()
        await until(rec, ("g", "main", "GuestCrashed"))
        p.wait()
        await sup.close()

    asyncio.run(run())
