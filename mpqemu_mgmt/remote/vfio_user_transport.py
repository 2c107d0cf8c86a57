"""The vfio-user IO shell: the only code that calls recvmsg/sendmsg on a vfio-user socket, writes
interrupt eventfds and runs the device's timers.

Reading mirrors QEMU's client (vfio_user_recv_one in hw/vfio-user/proxy.c): the 16-byte header with
``recvmsg`` (fds ride with it, ``MSG_CMSG_CLOEXEC``), the header frame-checked by the endpoint
before a single payload byte is read, then exactly ``msg_size - 16`` bytes. ``MSG_CTRUNC`` (more
fds than we allow) and EOF inside a message are fatal; every fd received is closed on every error
path. Sending puts header, payload and fds in one ``sendmsg`` (as vfio_user_send_qio does).

It must not interpret messages beyond the header: that is the endpoint's and the dispatcher's job.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mpqemu_mgmt.errors import InvalidMessage, TooManyFds, TruncatedMessage
from mpqemu_mgmt.protocol.fds import FdBundle
from mpqemu_mgmt.protocol.vfio_user import wire
from mpqemu_mgmt.protocol.vfio_user.endpoint import ServerEndpoint
from mpqemu_mgmt.protocol.vfio_user.wire import Header
from mpqemu_mgmt.remote.scm import cmsg_space, fds_from_ancillary, send_with_fds


def close_fds(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(frozen=True)
class RawMessage:
    header: Header
    payload: bytes
    #: the fds that came with the header, owned: whatever is not detached (adopted) is closed
    #: when the bundle is closed (protocol/fds.py, the same wrappers the mpqemu transport uses)
    fds: FdBundle


class VfioUserTransport:
    """Blocking message IO over one connected AF_UNIX SOCK_STREAM socket."""

    def __init__(self, sock: socket.socket, endpoint: ServerEndpoint) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self._cmsg = cmsg_space(max(1, endpoint.caps.max_msg_fds))
        self.sent = 0
        self.received = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_message(self) -> RawMessage | None:
        """One whole message, or None on a clean EOF before a header. Raises ProtocolError."""
        fds: list[int] = []
        try:
            head = bytearray()
            while len(head) < wire.HEADER_SIZE:
                data, ancdata, flags, _ = self.sock.recvmsg(
                    wire.HEADER_SIZE - len(head), self._cmsg, socket.MSG_CMSG_CLOEXEC
                )
                fds += fds_from_ancillary(ancdata)
                if flags & socket.MSG_CTRUNC:
                    raise TooManyFds("control data truncated: more fds than allowed")
                if not data:
                    if not head and not fds:
                        return None
                    raise TruncatedMessage("EOF inside a vfio-user header", got=len(head))
                head += data
            header = self.endpoint.unpack_header(head)
            payload = bytearray()
            want = header.payload_size
            while len(payload) < want:
                chunk = self.sock.recv(min(want - len(payload), 1 << 20))
                if not chunk:
                    raise TruncatedMessage("EOF inside a vfio-user payload", got=len(payload), want=want)
                payload += chunk
        except BaseException:
            close_fds(fds)
            raise
        self.received += 1
        return RawMessage(header, bytes(payload), FdBundle.adopt(fds, os.close))

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """Send one whole message; fds ride on the first sendmsg."""
        send_with_fds(self.sock, data, fds)
        self.sent += 1

    def wait_readable(self, timeout: float | None, extra: tuple[int, ...] = ()) -> list[int]:
        """Block until the socket or one of ``extra`` fds is readable (or timeout).

        ``poll``, not ``select``: the device seccomp allowlist (policies/x86_64/common_device.policy)
        permits poll/ppoll, and poll has no FD_SETSIZE limit.
        """
        poller = select.poll()
        for fd in (self.sock.fileno(), *extra):
            poller.register(fd, select.POLLIN | select.POLLPRI)
        ms = -1 if timeout is None else int(timeout * 1000) + (1 if timeout > 0 else 0)
        try:
            return [fd for fd, _ in poller.poll(ms)]
        except InterruptedError:
            return []


def signal_eventfd(fd: int) -> None:
    """Add 1 to an eventfd (what a vfio-user server does to raise an interrupt)."""
    with contextlib.suppress(BlockingIOError):
        os.write(fd, (1).to_bytes(8, "little"))


def drain_eventfd(fd: int) -> int:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except (BlockingIOError, OSError):
        return 0


@dataclass(order=True)
class _Timer:
    deadline: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class LoopTimers:
    """One-shot timers run by the serve loop between messages (devices/base.py ``Timers``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[_Timer] = []
        self._seq = itertools.count()

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        timer = _Timer(self._clock() + max(0.0, delay), next(self._seq), callback)
        heapq.heappush(self._heap, timer)
        return timer

    def cancel(self, handle: object) -> None:
        if isinstance(handle, _Timer):
            handle.cancelled = True

    def timeout(self) -> float | None:
        """Seconds until the next live timer (None: none pending)."""
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return max(0.0, self._heap[0].deadline - self._clock())

    def run_due(self) -> int:
        ran = 0
        now = self._clock()
        while self._heap and self._heap[0].deadline <= now:
            timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                timer.callback()
                ran += 1
        return ran

    def clear(self) -> None:
        self._heap.clear()


__all__ = [
    "InvalidMessage",
    "LoopTimers",
    "RawMessage",
    "VfioUserTransport",
    "close_fds",
    "drain_eventfd",
    "signal_eventfd",
]
