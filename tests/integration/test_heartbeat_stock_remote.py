"""The heartbeat loop against a real stock `qemu-system-x86_64 -machine x-remote` remote.

SIGKILL must be seen through the pidfd within 50 ms; SIGSTOP must be seen as a hang through the
QMP query-status probe within 2 s at the default interval 0.5 s / timeout 1 s (issue 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpqemu_mgmt.orchestrate.heartbeat import (
    Exited,
    Health,
    Kill,
    Observation,
    PidfdWatch,
    ProbeMissed,
    ProbeOk,
    QmpProbe,
    Role,
    Settings,
    State,
    decide,
    probe_forever,
)

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


class StockRemote:
    def __init__(self, tmp: Path) -> None:
        self.qmp = str(tmp / "remote.qmp")
        self.proxy_end, remote_end = socket.socketpair()
        assert QEMU is not None
        self.proc = subprocess.Popen(
            [QEMU, "-machine", "x-remote", "-nodefaults", "-display", "none",
             "-device", "lsi53c895a,id=lsi0",
             "-object", f"x-remote-object,id=robj0,devid=lsi0,fd={remote_end.fileno()}",
             "-qmp", f"unix:{self.qmp},server=on,wait=off"],
            pass_fds=[remote_end.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        remote_end.close()
        deadline = time.monotonic() + 10
        while not os.path.exists(self.qmp):
            assert self.proc.poll() is None, "stock remote exited at start"
            assert time.monotonic() < deadline, "stock remote QMP socket never appeared"
            time.sleep(0.01)
        self.pidfd = os.pidfd_open(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        with contextlib.suppress(ChildProcessError):  # reaped through the pidfd already
            self.proc.wait(5)
        os.close(self.pidfd)
        self.proxy_end.close()


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[StockRemote]:
    r = StockRemote(tmp_path)
    yield r
    r.close()


def test_sigkill_detected_through_pidfd_within_50ms(remote: StockRemote) -> None:
    async def run() -> tuple[float, str]:
        exited: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        watch = PidfdWatch(remote.pidfd, exited.set_result)
        t0 = time.monotonic()
        os.kill(remote.proc.pid, signal.SIGKILL)
        status = await asyncio.wait_for(exited, 5)
        elapsed = time.monotonic() - t0
        watch.cancel()
        return elapsed, status

    elapsed, status = asyncio.run(run())
    print(f"\nDETECTION dead remote (SIGKILL -> pidfd readable): {elapsed * 1000:.1f} ms")
    assert status == "signal 9"
    assert elapsed < 0.050


def test_sigstop_detected_as_hung_within_2s_then_killed(remote: StockRemote) -> None:
    settings = Settings()  # defaults: interval 0.5 s, timeout 1.0 s

    async def run() -> tuple[float, list[str]]:
        health = Health(role=Role.REMOTE)
        hung = asyncio.Event()
        exited = asyncio.Event()
        log: list[str] = []

        def feed(obs: Observation) -> None:
            nonlocal health
            health, actions = decide(health, obs, settings)
            log.append(health.state.value)
            for action in actions:
                if isinstance(action, Kill):
                    os.kill(remote.proc.pid, signal.SIGKILL)
                    hung.set()

        def on_exit(status: str) -> None:
            feed(Exited(time.monotonic(), status))
            exited.set()

        watch = PidfdWatch(remote.pidfd, on_exit)
        probe = QmpProbe(remote.qmp, settings.timeout)
        task = asyncio.create_task(probe_forever(probe, settings.interval, feed))
        deadline = time.monotonic() + 10
        while health.state is not State.HEALTHY:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        os.kill(remote.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        await asyncio.wait_for(hung.wait(), 5)
        elapsed = time.monotonic() - t0
        await asyncio.wait_for(exited.wait(), 5)
        task.cancel()
        watch.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return elapsed, log

    elapsed, log = asyncio.run(run())
    print(f"\nDETECTION hung remote (SIGSTOP -> query-status miss): {elapsed * 1000:.0f} ms")
    assert elapsed < 2.0
    assert "hung" in log and log[-1] in ("dead", "backoff")


def test_probe_reports_latency_of_a_live_remote(remote: StockRemote) -> None:
    async def run() -> list[Observation]:
        seen: list[Observation] = []
        task = asyncio.create_task(probe_forever(QmpProbe(remote.qmp, 1.0), 0.05, seen.append))
        while len(seen) < 3:
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return seen

    seen = asyncio.run(run())
    assert all(isinstance(o, ProbeOk) and o.run_state == "running" for o in seen)
    assert all(isinstance(o, ProbeOk) and 0 < o.latency < 1.0 for o in seen)


def test_probe_of_a_missing_socket_is_a_miss(tmp_path: Path) -> None:
    async def run() -> Observation:
        seen: list[Observation] = []
        probe = QmpProbe(str(tmp_path / "none.qmp"), 0.5)
        task = asyncio.create_task(probe_forever(probe, 0.01, seen.append))
        while not seen:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return seen[0]

    obs = asyncio.run(run())
    assert isinstance(obs, ProbeMissed) and "unusable" in obs.reason
