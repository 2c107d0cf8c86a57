"""The mpqemu IO shell: the only code in mpqemu-mgmt that calls recvmsg/sendmsg on an mpqemu socket.

It drives a sans-IO endpoint (:mod:`mpqemu_mgmt.protocol.endpoint`) over a connected, blocking
AF_UNIX SOCK_STREAM socket, reading the way mpqemu_msg_recv does (hw/remote/mpqemu-link.c):

* the 16-byte header with ``recvmsg`` and ``MSG_CMSG_CLOEXEC``, with control space for
  SOCKET_MAX_FDS = 16 fds (io/channel-socket.c); if that read is short, the rest of the header
  is read without a control buffer, because qio_channel_readv_full_all_eof passes fds only to
  its first read (the kernel then discards fds that come later, exactly as for QEMU);
* then exactly ``size`` payload bytes with plain ``recv`` (no fds are accepted with the payload;
  the kernel drops any that come, as it does for QEMU);
* ``MSG_CTRUNC`` (more fds than fit) is a protocol error (``TooManyFds``, every received fd
  closed), judged when the message is complete, as mpqemu_msg_recv judges its fd count;
* EOF before a header is a clean close (``None``); EOF inside a message is ``TruncatedMessage``;
  ``EINTR`` is retried (also by Python itself, PEP 475).

Sending mirrors mpqemu_msg_send: the fds ride on the first ``sendmsg``; the rest of the bytes
follow without fds. It must not interpret messages: that is the endpoint's job.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from typing import Literal

from mpqemu_mgmt.errors import InvalidMessage, ProtocolError, TooManyFds, TruncatedMessage
from mpqemu_mgmt.protocol import wire
from mpqemu_mgmt.protocol.endpoint import (
    ConnectionClosed,
    Event,
    MessageReceived,
    ProxyEndpoint,
    RemoteEndpoint,
    ReplyReceived,
    State,
)
from mpqemu_mgmt.protocol.fds import FdBundle, OwnedFd
from mpqemu_mgmt.protocol.messages import Message, close_message

_FD_SIZE = array.array("i").itemsize
CMSG_SPACE = socket.CMSG_SPACE(wire.SOCKET_MAX_FDS * _FD_SIZE)


def wrap_fd(fd: int) -> OwnedFd:
    """An OwnedFd that really closes (the codec's wrapper takes its closer from us)."""
    return OwnedFd(fd, os.close)


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            fds.extend(arr)
    return fds


class Transport:
    """Blocking message IO for one endpoint role over one connected socket."""

    def __init__(self, sock: socket.socket, role: Literal["remote", "proxy"] = "remote") -> None:
        self.sock = sock
        self.endpoint: RemoteEndpoint | ProxyEndpoint = (
            RemoteEndpoint() if role == "remote" else ProxyEndpoint()
        )
        self._events: list[Event] = []
        self.closed_by_peer = False

    # -- receiving -----------------------------------------------------------------------------

    def _recv_header_chunk(self, n: int) -> tuple[bytes, FdBundle, bool]:
        """One header read with room for 16 fds; returns (data, fds, MSG_CTRUNC seen)."""
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(n, CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
                break
            except InterruptedError:
                continue
        fds = FdBundle.adopt(_fds_from_ancillary(ancdata), os.close)
        return data, fds, bool(flags & socket.MSG_CTRUNC)

    def _recv_payload_chunk(self, n: int) -> bytes:
        while True:
            try:
                return self.sock.recv(n)
            except InterruptedError:
                continue

    def read_event(self) -> Event:
        """Block until the endpoint yields one event (a message, a reply, or the close)."""
        while not self._events:
            self._events.extend(self.endpoint.next_events())
            if not self._events and self.endpoint.state is State.REPLY_DUE:
                raise ProtocolError("remote: reading the next message before answering the last one")
            if self._events:
                break
            n, header = self.endpoint.wants()
            ctrunc = False
            try:
                if header and n == wire.HEADER_SIZE:
                    data, fds, ctrunc = self._recv_header_chunk(n)
                else:
                    data, fds = self._recv_payload_chunk(n), FdBundle()
            except ConnectionResetError:
                data, fds = b"", FdBundle()
            if not data:
                # fds that came with no bytes (peer closed right after sendmsg) are not a message.
                fds.close()
                # An endpoint that was already closed yields nothing: report the close again.
                self._events.extend(self.endpoint.receive_eof() or [ConnectionClosed()])
                break
            # MSG_CTRUNC is a protocol error (TooManyFds), raised once the message is complete,
            # where mpqemu_msg_recv's fd-count check would fail for stock QEMU too.
            self._events.extend(self.endpoint.receive_data(data, list(fds), ctrunc))
        return self._events.pop(0)

    def read_message(self) -> Message | None:
        """Remote role: the next valid message, or None on a clean EOF at a message boundary."""
        ev = self.read_event()
        if isinstance(ev, ConnectionClosed):
            self.closed_by_peer = True
            return None
        if isinstance(ev, MessageReceived):
            return ev.message
        return ev.reply

    def read_reply(self) -> ReplyReceived | None:
        """Proxy role: the RET for the outstanding request, or None if the remote closed."""
        ev = self.read_event()
        if isinstance(ev, ConnectionClosed):
            self.closed_by_peer = True
            return None
        if isinstance(ev, MessageReceived):  # pragma: no cover - ProxyEndpoint raises instead
            close_message(ev.message)
            raise ProtocolError("proxy: unexpected message", cmd=int(ev.message.cmd))
        return ev

    def read_raw_frame(self, max_payload: int = 1 << 20) -> tuple[bytes, FdBundle] | None:
        """Read one frame without decoding it: ``(header + payload, fds)``; None on EOF at a boundary.

        For relays and recorders that must pass traffic on byte for byte. Fds are accepted only
        with header bytes, as mpqemu_msg_recv does.
        """
        buf = b""
        fds: list[OwnedFd] = []
        try:
            while len(buf) < wire.HEADER_SIZE:
                if buf:
                    data = self._recv_payload_chunk(wire.HEADER_SIZE - len(buf))
                else:
                    data, chunk_fds, ctrunc = self._recv_header_chunk(wire.HEADER_SIZE)
                    fds.extend(chunk_fds)
                    if ctrunc:
                        raise TooManyFds(
                            f"ancillary data truncated: more than {wire.SOCKET_MAX_FDS} fds",
                            received=len(chunk_fds),
                        )
                if not data:
                    if buf or fds:
                        raise TruncatedMessage("Message header corrupted", buffered=len(buf))
                    return None
                buf += data
            _, size = wire.HEADER.unpack(buf)
            if size > max_payload:
                raise InvalidMessage("Invalid size for message", size=size)
            while len(buf) < wire.HEADER_SIZE + size:
                data = self._recv_payload_chunk(wire.HEADER_SIZE + size - len(buf))
                if not data:
                    raise TruncatedMessage("Unable to read full message", buffered=len(buf))
                buf += data
        except BaseException:
            for f in fds:
                f.close()
            raise
        return buf, FdBundle(fds)

    # -- sending -------------------------------------------------------------------------------

    def send_message(self, msg: Message) -> None:
        """Encode through the endpoint (which enforces the role's rules), then send."""
        data, fds = self.endpoint.send(msg)
        self.send_raw(data, fds)

    def send_raw(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        """Write ``data`` with ``fds`` attached to the first sendmsg (mpqemu_msg_send)."""
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        while True:
            try:
                sent = self.sock.sendmsg([view], anc)
                break
            except InterruptedError:
                continue
        view = view[sent:]
        while view:
            try:
                sent = self.sock.send(view)
            except InterruptedError:
                continue
            view = view[sent:]

    def close(self) -> None:
        """Close the endpoint's held fds and any undelivered events' fds; the socket is the caller's."""
        for ev in self._events:
            if isinstance(ev, MessageReceived):
                close_message(ev.message)
        self._events.clear()
        self.endpoint.close()


def is_disconnect(exc: OSError) -> bool:
    """True for the errors a send meets when the peer is gone (EPIPE, ECONNRESET)."""
    return exc.errno in (errno.EPIPE, errno.ECONNRESET)
