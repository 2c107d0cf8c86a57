"""Monitor channels: the only code that talks to a main QEMU's monitor.

:class:`MonitorChannel` is what the runner needs: ``execute`` (every command under a timeout),
``send_fd`` (one fd over SCM_RIGHTS, then ``getfd``) and ``arm`` (an event waiter registered
*before* the command that triggers the event, so a fast event is not missed, as in Nova's detach).

* :class:`QmpChannel` (direct driver): qemu.qmp's ``QMPClient`` on the guest's QMP socket.
  qemu.qmp has no per-command timeout, so each call runs under ``asyncio.wait_for``
  (python/qemu/qmp/qmp_client.py has none); ``send_fd_scm`` sends one fd and must be followed by
  ``getfd`` (QEMU pairs the fd with the next monitor command, monitor/fds.c ``qmp_getfd``).
* :class:`LibvirtChannel` (libvirt driver): QMP passthrough through libvirtd, which owns the
  monitor: ``qemuMonitorCommandWithFiles`` carries the fd with ``getfd`` and
  ``qemuMonitorEventRegister`` delivers QMP events libvirt does not model (``DEVICE_DELETED`` of
  a device it does not know). The libvirt calls themselves live in ``domain/libvirt_host.py``.

Errors: a QMP error reply becomes :class:`QmpCommandError` (with QEMU's ``desc``), a timeout
:class:`~mpqemu_mgmt.errors.StepTimeout`, a lost connection
:class:`~mpqemu_mgmt.errors.ProcessFailed`. Cancellation is never wrapped. Must not decide
anything: retries, rollback and policy belong to the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp.events import EventListener
from qemu.qmp.message import Message

from mpqemu_mgmt.errors import LibvirtError, OrchestrationError, ProcessFailed, StepTimeout
from mpqemu_mgmt.orchestrate.plans import EventWait

if TYPE_CHECKING:
    from mpqemu_mgmt.domain.libvirt_host import LibvirtGuest

JSON = Any
T = TypeVar("T")


class QmpCommandError(OrchestrationError):
    """QEMU answered a monitor command with an error; ``desc`` is QEMU's text."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}", command=command, error_class=error_class, desc=desc)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class EventWaiter(Protocol):
    async def wait(self, timeout: float) -> dict[str, JSON]:
        """The matching event's ``data``; StepTimeout if none came in time."""
        ...

    def close(self) -> None: ...


class MonitorChannel(Protocol):
    async def execute(self, command: str, arguments: Mapping[str, JSON] | None = None, *,
                      timeout: float) -> JSON: ...

    async def send_fd(self, fd: int, fdname: str, *, timeout: float) -> None:
        """Hand ``fd`` to QEMU under ``fdname`` (SCM_RIGHTS + ``getfd``); the caller keeps its copy."""
        ...

    def arm(self, wait: EventWait) -> EventWaiter: ...

    async def close(self) -> None: ...


async def _timed(what: str, coro: Awaitable[T], timeout: float) -> T:
    try:
        return await asyncio.wait_for(coro, timeout)
    except TimeoutError as exc:
        raise StepTimeout(f"{what}: no answer within {timeout:g} s", command=what, timeout=timeout) from exc


def _event_data(msg: Message) -> dict[str, JSON]:
    data = msg.get("data", {})
    return dict(data) if isinstance(data, Mapping) else {}


class _QmpWaiter:
    def __init__(self, client: QMPClient, wait: EventWait) -> None:
        self._client = client
        self._wait = wait
        self._listener = EventListener(
            names=[wait.event], event_filter=lambda m: wait.matches(str(m["event"]), _event_data(m))
        )
        client.register_listener(self._listener)

    async def wait(self, timeout: float) -> dict[str, JSON]:
        msg = await _timed(f"wait for {self._wait.event}", self._listener.get(), timeout)
        return _event_data(msg)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.remove_listener(self._listener)


class QmpChannel:
    """qemu.qmp on a QMP UNIX socket (the direct driver's main QEMU, or a remote's monitor)."""

    def __init__(self, client: QMPClient, path: str) -> None:
        self._client = client
        self.path = path

    @classmethod
    async def connect(cls, path: str, *, timeout: float = 10.0, name: str = "mpqemu") -> QmpChannel:
        """Connect (greeting + ``qmp_capabilities``), retrying until the socket exists."""
        client = QMPClient(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await _timed(f"connect {path}", client.connect(path), max(0.1, deadline - loop.time()))
                return cls(client, path)
            except QMPError as exc:
                if loop.time() >= deadline:
                    raise ProcessFailed(f"cannot connect to QMP at {path}: {exc}", path=path) from exc
                await asyncio.sleep(0.02)

    async def execute(self, command: str, arguments: Mapping[str, JSON] | None = None, *,
                      timeout: float) -> JSON:
        try:
            return await _timed(command, self._client.execute(command, dict(arguments or {})), timeout)
        except ExecuteError as exc:
            raise QmpCommandError(command, exc.error_class, str(exc)) from exc
        except ExecInterruptedError as exc:
            raise ProcessFailed(f"{command}: QEMU's monitor went away ({self.path})",
                                command=command) from exc
        except QMPError as exc:
            raise ProcessFailed(f"{command}: QMP failed: {exc}", command=command) from exc

    async def send_fd(self, fd: int, fdname: str, *, timeout: float) -> None:
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise ProcessFailed(f"getfd {fdname}: cannot send the fd: {exc}", fdname=fdname) from exc
        await self.execute("getfd", {"fdname": fdname}, timeout=timeout)

    def arm(self, wait: EventWait) -> EventWaiter:
        return _QmpWaiter(self._client, wait)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), 5.0)


class _LibvirtWaiter:
    def __init__(self, channel: LibvirtChannel, wait: EventWait) -> None:
        self._wait = wait
        self._queue: asyncio.Queue[dict[str, JSON]] = asyncio.Queue()
        self._channel = channel
        channel._waiters.add(self)

    def offer(self, name: str, data: dict[str, JSON]) -> None:
        if self._wait.matches(name, data):
            self._queue.put_nowait(data)

    async def wait(self, timeout: float) -> dict[str, JSON]:
        return await _timed(f"wait for {self._wait.event}", self._queue.get(), timeout)

    def close(self) -> None:
        self._channel._waiters.discard(self)


# libvirt tracks these itself; using its own API keeps its state right (src/libvirt-qemu.c calls
# a passthrough that alters state libvirt tracks "unsafe").
_LIBVIRT_NATIVE: dict[str, Callable[[LibvirtGuest], None]] = {
    "cont": lambda g: g.resume(),
    "stop": lambda g: g.suspend(),
    "system_reset": lambda g: g.reset(),
}


class LibvirtChannel:
    """QMP through libvirtd (``qemuMonitorCommandWithFiles`` / ``qemuMonitorEventRegister``)."""

    def __init__(self, guest: LibvirtGuest) -> None:
        self._guest = guest
        self._waiters: set[_LibvirtWaiter] = set()
        self._loop = asyncio.get_running_loop()
        self._unregister = guest.on_qemu_event(self._from_libvirt_thread)

    def _from_libvirt_thread(self, name: str, data: dict[str, JSON]) -> None:
        # Runs on libvirt's event thread: hand over, never act here (Nova host.py does the same).
        self._loop.call_soon_threadsafe(self._dispatch, name, data)

    def _dispatch(self, name: str, data: dict[str, JSON]) -> None:
        for waiter in list(self._waiters):
            waiter.offer(name, data)

    async def execute(self, command: str, arguments: Mapping[str, JSON] | None = None, *,
                      timeout: float) -> JSON:
        native = _LIBVIRT_NATIVE.get(command)
        if native is not None:
            await _timed(command, asyncio.to_thread(native, self._guest), timeout)
            return {}
        return await self._passthrough(command, arguments, None, timeout)

    async def _passthrough(self, command: str, arguments: Mapping[str, JSON] | None, fd: int | None,
                           timeout: float) -> JSON:
        cmd = json.dumps({"execute": command, "arguments": dict(arguments or {})})
        try:
            raw = await _timed(command, asyncio.to_thread(self._guest.monitor_command, cmd, fd), timeout)
        except LibvirtError as exc:
            desc = str(exc.details.get("desc", exc.message))
            raise QmpCommandError(command, "GenericError", desc) from exc
        reply = json.loads(raw)
        if "error" in reply:
            err = reply["error"]
            raise QmpCommandError(command, str(err.get("class", "")), str(err.get("desc", "")))
        return reply.get("return", {})

    async def send_fd(self, fd: int, fdname: str, *, timeout: float) -> None:
        # One fd per command (libvirt's qemuMonitorCommandWithFiles sends it with the command).
        dup = os.dup(fd)
        try:
            await self._passthrough("getfd", {"fdname": fdname}, dup, timeout)
        finally:
            os.close(dup)

    def arm(self, wait: EventWait) -> EventWaiter:
        return _LibvirtWaiter(self, wait)

    async def close(self) -> None:
        self._waiters.clear()
        self._unregister()
