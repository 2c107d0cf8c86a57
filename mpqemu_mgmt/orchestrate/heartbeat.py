"""Health of supervised processes: the pure HealthPolicy and the loop that feeds it.

QEMU 7.2 has no heartbeat of its own: the v8 series' PROXY_PING timer was dropped in review
because the proxy waits for replies in ``mpqemu_msg_send_and_await_reply`` (hw/remote/mpqemu-link.c)
with the BQL held, so a hung remote stalls the vCPU that touched it (qemu-devel,
20200819080001.GA334045@stefanha-x1.localdomain). So we watch from outside:

* liveness: a pidfd per process turns readable the instant the process exits;
* responsiveness: QMP ``query-status`` on each process's own monitor, under a timeout.

The core is :func:`decide`: an :class:`Observation` and the current :class:`Health` in, the next
:class:`Health` and a tuple of :class:`Action` out. It performs nothing, reads no clock and imports
no IO module; the supervisor executes the actions. The loop half (:class:`PidfdWatch`,
:class:`QmpProbe`, :func:`probe_forever`) is the IO shell; it must not take decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from mpqemu_mgmt.errors import HeartbeatTimeout, ProcessFailed

# ----------------------------------------------------------------------------------------------
# pure core
# ----------------------------------------------------------------------------------------------


class Role(enum.Enum):
    """What a supervised process is to its guest."""

    REMOTE = "remote"  # one device process (ours or a stock -machine x-remote)
    MAIN = "main"  # the guest's main QEMU (direct driver) or libvirt's QEMU


class OnFailure(enum.Enum):
    """A device's ``on_failure`` (guest spec, DESIGN.md Contract 5)."""

    REPLUG = "replug"
    PAUSE = "pause"
    STOP = "stop"
    IGNORE = "ignore"


class State(enum.Enum):
    STARTING = "starting"  # launched, no successful probe yet
    HEALTHY = "healthy"
    UNRESPONSIVE = "unresponsive"  # a main QEMU missed probes: reported, never killed
    HUNG = "hung"  # a remote missed probes: it is being killed
    DEAD = "dead"  # exited; the on_failure action is under way
    BACKOFF = "backoff"  # waiting to replug after a crash (crash-loop damping)
    FAILED = "failed"  # gave up: max restarts reached, or on_failure pause/stop/ignore applied
    STOPPED = "stopped"  # exited because we asked it to


@dataclass(frozen=True)
class Settings:
    """Heartbeat and recovery knobs. Defaults meet issue 8: hung detected within 2 s."""

    interval: float = 0.5  # seconds between query-status probes
    timeout: float = 1.0  # a probe that takes longer is a miss
    misses: int = 1  # consecutive misses before a process counts as hung
    max_restarts: int = 5  # consecutive replugs before giving up
    backoff_base: float = 0.0  # first replug is immediate; then base*2**n ...
    backoff_step: float = 1.0  # ... with this step from the second crash on
    backoff_max: float = 30.0
    stable_after: float = 60.0  # healthy this long resets the consecutive-restart count


# Observations: what the loop saw. `at` is a monotonic timestamp taken by the loop.


@dataclass(frozen=True)
class Exited:
    at: float
    status: str = "exited"  # "exit 0", "signal 9", or "exited" when not our child
    expected: bool = False  # we stopped/killed it on purpose as part of an operation


@dataclass(frozen=True)
class ProbeOk:
    at: float
    latency: float
    run_state: str = "running"


@dataclass(frozen=True)
class ProbeMissed:
    at: float
    reason: str  # "timeout" or the connection error


@dataclass(frozen=True)
class Replugged:
    """The supervisor finished a replug: a fresh process is under watch."""

    at: float


@dataclass(frozen=True)
class ReplugFailed:
    """The supervisor could not bring a fresh process up; counts as one more crash."""

    at: float
    reason: str


Observation = Exited | ProbeOk | ProbeMissed | Replugged | ReplugFailed


# Actions: effects as data, executed by the supervisor.


@dataclass(frozen=True)
class Kill:
    reason: str


@dataclass(frozen=True)
class Replug:
    delay: float  # seconds to wait first (crash-loop backoff)
    attempt: int


@dataclass(frozen=True)
class PauseGuest:
    reason: str


@dataclass(frozen=True)
class StopGuest:
    reason: str


@dataclass(frozen=True)
class GuestCrashed:
    """A main QEMU died: the guest is gone; reap its remotes."""

    reason: str


@dataclass(frozen=True)
class Emit:
    """Record a transition as an event (every transition is one)."""

    kind: str
    detail: str


Action = Kill | Replug | PauseGuest | StopGuest | GuestCrashed | Emit


@dataclass(frozen=True)
class Health:
    """What the policy remembers about one supervised process."""

    role: Role
    on_failure: OnFailure = OnFailure.REPLUG
    state: State = State.STARTING
    misses: int = 0
    restarts: int = 0  # total replugs, shown by `status`
    consecutive: int = 0  # replugs since the last stable period
    healthy_since: float | None = None
    last_latency: float | None = None
    last_reason: str = ""
    history: tuple[str, ...] = field(default=(), repr=False)


def backoff(settings: Settings, consecutive: int) -> float:
    """Delay before replug number ``consecutive + 1``: 0, step, 2*step, 4*step ... capped."""
    if consecutive <= 0:
        return settings.backoff_base
    return float(min(settings.backoff_max, settings.backoff_step * 2 ** (consecutive - 1)))


def _failure_actions(h: Health, settings: Settings, reason: str) -> tuple[Health, tuple[Action, ...]]:
    """The device's on_failure once its process is gone."""
    if h.on_failure is OnFailure.REPLUG:
        if h.consecutive >= settings.max_restarts:
            return (
                replace(h, state=State.FAILED,
                        last_reason=f"{reason}; gave up after {h.consecutive} restarts"),
                (Emit("gave_up", f"{h.consecutive} consecutive restarts (max {settings.max_restarts})"),),
            )
        delay = backoff(settings, h.consecutive)
        nxt = replace(h, state=State.BACKOFF if delay > 0 else State.DEAD, last_reason=reason)
        return nxt, (Emit("replug_scheduled", f"attempt {h.consecutive + 1} in {delay:.1f}s"),
                     Replug(delay=delay, attempt=h.consecutive + 1))
    failed = replace(h, state=State.FAILED, last_reason=reason)
    if h.on_failure is OnFailure.PAUSE:
        return failed, (PauseGuest(reason),)
    if h.on_failure is OnFailure.STOP:
        return failed, (StopGuest(reason),)
    return failed, (Emit("ignored", reason),)


def decide(h: Health, obs: Observation, settings: Settings) -> tuple[Health, tuple[Action, ...]]:
    """The policy table. Pure: same inputs, same outputs.

    ============  =================  ===========================================================
    role          observation        outcome
    ============  =================  ===========================================================
    remote        ProbeOk when hung  dropped: the Kill is committed
    any           ProbeOk            healthy (event on the change); stable long enough: count reset
    remote        ProbeMissed x N    hung -> Kill (a hung remote blocks the vCPU touching it)
    main          ProbeMissed x N    unresponsive -> event only (it may be waiting on a hung remote)
    remote        Exited (expected)  stopped
    remote        Exited             dead -> on_failure: Replug(backoff) | PauseGuest | StopGuest | -
    main          Exited (expected)  stopped
    main          Exited             dead -> GuestCrashed (reap its remotes)
    remote        Replugged          starting, restarts + 1
    remote        ReplugFailed       one more crash -> on_failure again (or give up)
    ============  =================  ===========================================================

    Observations about a process that already left the picture (FAILED, STOPPED, DEAD) are
    dropped, except Replugged, so late probe results cannot resurrect or double-count it.
    """
    if isinstance(obs, Replugged):
        return replace(h, state=State.STARTING, misses=0, restarts=h.restarts + 1,
                       consecutive=h.consecutive + 1, healthy_since=None), (
            Emit("replugged", f"restart {h.restarts + 1}"),)
    if isinstance(obs, ReplugFailed):
        if h.state not in (State.DEAD, State.BACKOFF):
            return h, ()
        counted = replace(h, restarts=h.restarts + 1, consecutive=h.consecutive + 1)
        nxt, actions = _failure_actions(counted, settings, f"replug failed: {obs.reason}")
        return nxt, (Emit("replug_failed", obs.reason), *actions)
    if h.state in (State.FAILED, State.STOPPED, State.DEAD, State.BACKOFF):
        return h, ()
    if isinstance(obs, ProbeOk):
        if h.state is State.HUNG:
            return h, ()  # the Kill is committed: a late answer must not cancel it
        since = h.healthy_since if h.healthy_since is not None else obs.at
        consecutive = h.consecutive
        if consecutive and obs.at - since >= settings.stable_after:
            consecutive = 0
        nxt = replace(h, state=State.HEALTHY, misses=0, last_latency=obs.latency,
                      healthy_since=since, consecutive=consecutive)
        if h.state is State.HEALTHY:
            return nxt, ()
        return nxt, (Emit("healthy", f"query-status answered in {obs.latency * 1000:.0f} ms"),)
    if isinstance(obs, ProbeMissed):
        if h.state is State.HUNG:
            return h, ()  # the Kill is already under way
        misses = h.misses + 1
        if misses < settings.misses:
            return replace(h, misses=misses, healthy_since=None), ()
        if h.role is Role.REMOTE:
            reason = f"no answer to query-status ({obs.reason}) after {misses} probe(s)"
            return replace(h, state=State.HUNG, misses=misses, healthy_since=None, last_reason=reason), (
                Emit("hung", reason), Kill(reason))
        if h.state is State.UNRESPONSIVE:
            return replace(h, misses=misses), ()
        reason = f"main QEMU did not answer query-status ({obs.reason})"
        return replace(h, state=State.UNRESPONSIVE, misses=misses, healthy_since=None,
                       last_reason=reason), (Emit("unresponsive", reason),)
    # Exited
    if obs.expected:
        return replace(h, state=State.STOPPED, last_reason=obs.status), (Emit("stopped", obs.status),)
    reason = f"process {obs.status}" if h.state is not State.HUNG else f"killed after hang ({h.last_reason})"
    dead = replace(h, state=State.DEAD, healthy_since=None, last_reason=reason)
    if h.role is Role.MAIN:
        return dead, (Emit("dead", reason), GuestCrashed(reason))
    nxt, actions = _failure_actions(dead, settings, reason)
    return nxt, (Emit("dead", reason), *actions)


# ----------------------------------------------------------------------------------------------
# IO shell: the loop
# ----------------------------------------------------------------------------------------------


def exit_status(pidfd: int) -> str:
    """Reap a child through its pidfd and describe how it ended; "exited" for a non-child."""
    try:
        res = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return "exited"  # re-adopted process: its parent is not us, the status is not ours to read
    if res is None:
        return "exited"
    if res.si_code == os.CLD_EXITED:
        return f"exit {res.si_status}"
    return f"signal {res.si_status}"


class PidfdWatch:
    """Calls ``on_exit(status)`` once, from the event loop, when the process behind ``pidfd`` exits.

    A pidfd polls readable at exit (pidfd_open(2)), so detection costs no polling and no latency
    beyond one loop iteration. The watch owns a dup of the pidfd and closes it when cancelled.
    """

    def __init__(self, pidfd: int, on_exit: Callable[[str], None]) -> None:
        self._fd = os.dup(pidfd)
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self._done = False
        self._loop.add_reader(self._fd, self._fire)

    def _fire(self) -> None:
        if self._done:
            return
        self._done = True
        self._loop.remove_reader(self._fd)
        status = exit_status(self._fd)
        os.close(self._fd)
        self._on_exit(status)

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._loop.remove_reader(self._fd)
            os.close(self._fd)


class QmpProbe:
    """``query-status`` on one QMP monitor (a UNIX socket path), each call under a timeout.

    qemu.qmp has no per-command timeout, hence ``asyncio.wait_for`` around connect and execute
    (python/qemu/qmp/qmp_client.py). After a miss the connection is dropped and re-made, so a
    reply that arrives late never answers a later probe.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._client: object | None = None

    async def _connected(self) -> object:
        from qemu.qmp import QMPClient

        if self._client is None:
            client = QMPClient(f"heartbeat:{os.path.basename(self.path)}")
            try:
                await asyncio.wait_for(client.connect(self.path), self.timeout)
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.disconnect()
                raise
            self._client = client
        return self._client

    async def probe(self) -> str:
        """Return the run state; raise :class:`HeartbeatTimeout` or :class:`ProcessFailed`."""
        from qemu.qmp import QMPClient, QMPError

        try:
            client = await self._connected()
            assert isinstance(client, QMPClient)
            reply = await asyncio.wait_for(client.execute("query-status"), self.timeout)
        except TimeoutError as exc:
            await self.close()
            raise HeartbeatTimeout("query-status timed out", path=self.path, timeout=self.timeout) from exc
        except (QMPError, OSError, EOFError) as exc:
            await self.close()
            raise ProcessFailed(f"QMP monitor unusable: {exc!r}", path=self.path) from exc
        if isinstance(reply, dict):
            return str(reply.get("status", "unknown"))
        return "unknown"

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            from qemu.qmp import QMPClient

            assert isinstance(client, QMPClient)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 1.0)


class ChannelProbe:
    """``query-status`` over a monitor connection someone else owns (the driver's channel).

    A main QEMU's ``-qmp unix:...,server=on`` chardev serves one client at a time, and libvirt
    owns its QEMU's monitor, so the main QEMU is probed over the driver's own channel (qemu.qmp
    matches replies by id, so probes and plan steps can share it).
    """

    def __init__(self, execute: Callable[[str, float], Awaitable[object]], timeout: float) -> None:
        self._execute = execute
        self.timeout = timeout

    async def probe(self) -> str:
        from mpqemu_mgmt.errors import MpqemuError, StepTimeout

        try:
            reply = await asyncio.wait_for(self._execute("query-status", self.timeout), self.timeout + 0.5)
        except (TimeoutError, StepTimeout) as exc:
            raise HeartbeatTimeout("query-status timed out", timeout=self.timeout) from exc
        except MpqemuError as exc:
            raise ProcessFailed(f"monitor unusable: {exc.message}") from exc
        if isinstance(reply, dict):
            return str(reply.get("status", "unknown"))
        return "unknown"

    async def close(self) -> None:
        return None


class Probe(Protocol):
    async def probe(self) -> str: ...

    async def close(self) -> None: ...


Reporter = Callable[[Observation], Awaitable[None] | None]


async def probe_forever(probe: Probe, interval: float, report: Reporter,
                        clock: Callable[[], float] = time.monotonic) -> None:
    """Probe every ``interval`` seconds and report each result until cancelled."""
    try:
        while True:
            await asyncio.sleep(interval)
            start = clock()
            obs: Observation
            try:
                run_state = await probe.probe()
                obs = ProbeOk(at=clock(), latency=clock() - start, run_state=run_state)
            except HeartbeatTimeout:
                obs = ProbeMissed(at=clock(), reason="timeout")
            except ProcessFailed as exc:
                obs = ProbeMissed(at=clock(), reason=exc.message)
            res = report(obs)
            if res is not None:
                await res
    finally:
        await probe.close()
