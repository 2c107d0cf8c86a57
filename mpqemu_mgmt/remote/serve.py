"""The remote's serve loop: one blocking, single-threaded loop over the mpqemu socket.

What it is: the IO shell that ties the transport (mpqemu_mgmt/remote/transport.py), the
:class:`~mpqemu_mgmt.remote.dispatch.MpqemuDispatcher`, the resamplefd, the device's timers and
the QMP monitor together with one ``poll``. Single-threaded on purpose: the seccomp allowlist
stays small and the model needs no locks (hw/remote runs its message loop as one coroutine, too).

Order inside one turn: run due timers; poll (timeout = next deadline); handle at most one mpqemu
message (the proxy waits for each RET, so there is never more than one), resample events and QMP.

Exit status: 0 when the proxy closes the socket (or QMP ``quit``), as Contracts 1 and the stock
remote require; 1 after a protocol error (the stream can no longer be trusted; the stock remote
stops too).

What it must not do: send anything unsolicited on the mpqemu socket, or block anywhere but poll
and the read of a message that has started to arrive.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable
from typing import Any

from mpqemu_mgmt.devices.base import PciDeviceModel
from mpqemu_mgmt.errors import ProtocolError
from mpqemu_mgmt.remote.dispatch import MpqemuDispatcher
from mpqemu_mgmt.remote.irq import EventfdIrq
from mpqemu_mgmt.remote.memory import MappedGuestMemory
from mpqemu_mgmt.remote.qmp_server import QmpServer
from mpqemu_mgmt.remote.timers import TimerQueue
from mpqemu_mgmt.remote.transport import Transport, is_disconnect

_IN = select.POLLIN | select.POLLPRI


class Remote:
    """One device model served over one mpqemu socket."""

    def __init__(
        self,
        sock: socket.socket,
        model: PciDeviceModel,
        memory: MappedGuestMemory,
        irq: EventfdIrq,
        timers: TimerQueue,
        *,
        log: Callable[[str], None] | None = None,
        debug: Callable[[str], None] | None = None,
    ) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.model = model
        self.memory = memory
        self.irq = irq
        self.timers = timers
        self.log = log or (lambda _m: None)
        self.transport = Transport(sock, role="remote")
        self.dispatcher = MpqemuDispatcher(model, memory, irq, self.log, debug)
        self.qmp: QmpServer | None = None

    def attach_qmp(self, listener: socket.socket) -> QmpServer:
        self.qmp = QmpServer(listener, self.device_status, self.log)
        return self.qmp

    def device_status(self) -> dict[str, Any]:
        """The payload of QMP ``x-device-status``."""
        out = dict(self.model.status())
        out.update(
            pid=os.getpid(),
            messages=self.dispatcher.message_counts(),
            errors=self.dispatcher.errors,
            memory={
                "regions": self.memory.regions(),
                "syncs": self.memory.syncs,
                "remaps": self.memory.remaps,
            },
            irq={
                "attached": self.irq.attached,
                "level": self.irq.level,
                "asserts": self.irq.asserts,
                "resamples": self.irq.resamples,
            },
        )
        return out

    def _handle_message(self) -> bool:
        """Read and answer one message; False when the proxy has gone."""
        msg = self.transport.read_message()
        if msg is None:
            return False
        reply = self.dispatcher.handle(msg)
        if reply is not None:
            try:
                self.transport.send_message(reply)
            except OSError as exc:
                if is_disconnect(exc):
                    return False
                raise
        return True

    def _watch_key(self) -> tuple[int | None, int | None]:
        qmp_fd = self.qmp.filenos()[0] if self.qmp is not None else None
        return self.irq.resample_fileno, qmp_fd

    def run(self) -> int:
        """Serve until the proxy closes the socket (0), QMP quit (0) or a protocol error (1)."""
        sock_fd = self.sock.fileno()
        poller = select.poll()
        poller.register(sock_fd, _IN)
        key: tuple[int | None, int | None] = (None, None)
        timers = self.timers
        try:
            while True:
                if timers:
                    timers.run_due()
                # re-register only when SET_IRQFD or a QMP (dis)connection changed the fd set:
                # this loop runs once per guest access, so it stays lean
                new_key = self._watch_key()
                if new_key != key:
                    for fd in key:
                        if fd is not None:
                            poller.unregister(fd)
                    for fd in new_key:
                        if fd is not None:
                            poller.register(fd, _IN)
                    key = new_key
                timeout = timers.timeout() if timers else None
                try:
                    events = poller.poll(-1 if timeout is None else int(timeout * 1000) + 1)
                except InterruptedError:
                    continue
                for fd, _ev in events:
                    if fd == sock_fd:
                        if not self._handle_message():
                            return 0
                    elif fd == key[0]:
                        self.irq.on_resample()
                    elif self.qmp is not None and fd == key[1]:
                        # a hung-up client reads as EOF in on_readable and is dropped there
                        self.qmp.on_readable(fd)
                        if self.qmp.quit_requested:
                            self.qmp.announce_shutdown()
                            return 0
        except ProtocolError as exc:
            self.log(f"mpqemu protocol error, stopping: {exc}")
            return 1
        except OSError as exc:
            if is_disconnect(exc):
                return 0
            raise
        finally:
            self.transport.close()

    def close(self) -> None:
        self.irq.close()
        self.memory.close()
        if self.qmp is not None:
            self.qmp.close()
