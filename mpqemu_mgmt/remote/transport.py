"""The mpqemu IO shell: the only code in mpqemu-mgmt that reads and writes an mpqemu socket (the
SCM_RIGHTS helpers it shares with the vfio-user transport are in remote/scm.py).

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
follow without fds (remote/scm.py ``send_with_fds``).

The remote role has a fast path for the messages a guest access produces (PCI_CFGREAD/WRITE,
BAR_READ/WRITE, DEVICE_RESET) and their RET: the same two reads into preallocated buffers, the
payload unpacked with the codec's own ``struct`` layouts (:mod:`mpqemu_mgmt.protocol.wire`) into the
codec's message classes, and an 8-byte RET packed in one step. It is taken only at a message
boundary with the endpoint IDLE, and only when the header read brought exactly 16 bytes, no fds and
no MSG_CTRUNC, and the header names one of those commands with its exact payload size; in every
other case the bytes already read are fed to the endpoint and the codec decides, so the fast path
yields exactly what ``decode`` would (tests/integration/test_transport_fastpath.py checks both on
the same frames). While a fast-path request awaits its RET the transport enforces the endpoint's rules
itself: no next message before the RET, and nothing but a RET may be sent.

The serve loop uses the lowest level of it: :meth:`Transport.read_request` reads one message and
returns only its command, leaving the payload in :attr:`Transport.payload` for the dispatcher's
specialised handler (no message object), and :meth:`Transport.send_ret_value` sends the cached RET
frame for the value. Everything else (fds, odd sizes, other commands, EOF) goes to the endpoint as
above, and ``read_message`` returns what the codec makes of it.

It must not interpret messages beyond that: the endpoint and the codec stay the authority.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
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
from mpqemu_mgmt.protocol.messages import (
    BarRead,
    BarWrite,
    DeviceReset,
    Message,
    PciConfigRead,
    PciConfigWrite,
    Ret,
    close_message,
    encode,
)
from mpqemu_mgmt.protocol.wire import Cmd
from mpqemu_mgmt.remote.scm import cmsg_space, fds_from_ancillary, send_with_fds

CMSG_SPACE = cmsg_space(wire.SOCKET_MAX_FDS)

# The fast path's commands and their only valid payload sizes (mpqemu_msg_valid in
# hw/remote/mpqemu-link.c: BAR accesses carry a BarAccessMsg, config accesses a PciConfDataMsg;
# DEVICE_RESET with no payload is what the proxy sends). Any other (cmd, size) goes to the codec.
_FAST_SIZES: dict[int, int] = {
    int(Cmd.PCI_CFGREAD): wire.PCI_CONF.size,
    int(Cmd.PCI_CFGWRITE): wire.PCI_CONF.size,
    int(Cmd.BAR_READ): wire.BAR_ACCESS.size,
    int(Cmd.BAR_WRITE): wire.BAR_ACCESS.size,
    int(Cmd.DEVICE_RESET): 0,
}
_CFGREAD, _CFGWRITE = int(Cmd.PCI_CFGREAD), int(Cmd.PCI_CFGWRITE)
_BAR_READ, _BAR_WRITE = int(Cmd.BAR_READ), int(Cmd.BAR_WRITE)
# header + u64: the frame encode(Ret(value)) produces, packed in one step
_RET_FRAME = struct.Struct(wire.HEADER.format + wire.RET_U64.format.lstrip("<"))
_RET_CMD = int(Cmd.RET)
_RET_SIZE = wire.RET_U64.size
_HEADER_UNPACK = wire.HEADER.unpack_from
_PCI_CONF_UNPACK = wire.PCI_CONF.unpack_from
_BAR_ACCESS_UNPACK = wire.BAR_ACCESS.unpack_from
_AT_BOUNDARY = (wire.HEADER_SIZE, True)  # Endpoint.wants() with nothing buffered
_DECODED_MAX = 4096  # distinct payloads (and RET values) remembered per command before a reset
_DEVICE_RESET = DeviceReset()


def _decode_fast(cmd: int, payload: bytearray) -> Message:
    """What messages.decode returns for a fast-path command with its exact payload size, no fds."""
    if cmd == _CFGREAD:
        addr, value, length = _PCI_CONF_UNPACK(payload)
        return PciConfigRead(addr, length, value)
    if cmd == _CFGWRITE:
        addr, value, length = _PCI_CONF_UNPACK(payload)
        return PciConfigWrite(addr, value, length)
    addr, value, width, memory = _BAR_ACCESS_UNPACK(payload)
    if cmd == _BAR_READ:
        return BarRead(addr, width, memory != 0, value)
    return BarWrite(addr, value, width, memory != 0)
# plain ints: the socket module's flags are IntFlag members, whose operators are slow Python code
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)


def wrap_fd(fd: int) -> OwnedFd:
    """An OwnedFd that really closes (the codec's wrapper takes its closer from us)."""
    return OwnedFd(fd, os.close)


class Transport:
    """Blocking message IO for one endpoint role over one connected socket."""

    def __init__(
        self, sock: socket.socket, role: Literal["remote", "proxy"] = "remote", *, fast_path: bool = True
    ) -> None:
        self.sock = sock
        self.endpoint: RemoteEndpoint | ProxyEndpoint = (
            RemoteEndpoint() if role == "remote" else ProxyEndpoint()
        )
        self._events: list[Event] = []
        self.closed_by_peer = False
        # fast path (remote role): preallocated buffers, reused for every message
        self._fast = fast_path and role == "remote"
        self._fast_due = False  # a fast-path request was handed out, its RET not yet sent
        # the endpoint is IDLE with nothing buffered or queued (fast-path messages leave it so;
        # anything fed to it clears this until read_message checks again)
        self._clean = True
        self._header = bytearray(wire.HEADER_SIZE)
        self._header_bufs = [self._header]
        self._payload = bytearray(wire.MAX_PAYLOAD)
        self.payload = self._payload  # read_request leaves a fast request's payload here
        self._payload_view = memoryview(self._payload)
        # one view per fast payload size, so the common single read creates no object
        self._payload_views = {n: self._payload_view[:n] for n in set(_FAST_SIZES.values())}
        self._decoded: dict[int, dict[bytes, Message]] = {cmd: {} for cmd in _FAST_SIZES}
        self._ret_frames: dict[int, bytes] = {}

    # -- receiving -----------------------------------------------------------------------------

    def _recv_header_chunk(self, n: int) -> tuple[bytes, FdBundle, bool]:
        """One header read with room for 16 fds; returns (data, fds, MSG_CTRUNC seen)."""
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(n, CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
                break
            except InterruptedError:
                continue
        fds = FdBundle.adopt(fds_from_ancillary(ancdata), os.close)
        return data, fds, bool(flags & socket.MSG_CTRUNC)

    def _recv_payload_chunk(self, n: int) -> bytes:
        while True:
            try:
                return self.sock.recv(n)
            except InterruptedError:
                continue
            except BlockingIOError:
                self._wait_readable()

    def _wait_readable(self) -> None:
        """Inside a message, a read timed out (SO_RCVTIMEO, serve.py's hot mode): keep waiting.

        The read of a message that has started blocks until it is complete, as before; only a
        read at a message boundary lets BlockingIOError reach the caller.
        """
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLPRI)
        while True:
            try:
                if poller.poll(-1):
                    return
            except InterruptedError:
                continue

    def _feed(self, data: bytes, fds: FdBundle, ctrunc: bool) -> bool:
        """Hand one chunk to the endpoint; False when it was the EOF (the close is queued)."""
        if not data:
            self._clean = False
            # fds that came with no bytes (peer closed right after sendmsg) are not a message.
            fds.close()
            # An endpoint that was already closed yields nothing: report the close again.
            self._events.extend(self.endpoint.receive_eof() or [ConnectionClosed()])
            return False
        # MSG_CTRUNC is a protocol error (TooManyFds), raised once the message is complete,
        # where mpqemu_msg_recv's fd-count check would fail for stock QEMU too.
        self._clean = False
        self._events.extend(self.endpoint.receive_data(data, list(fds), ctrunc))
        return True

    def read_event(self) -> Event:
        """Block until the endpoint yields one event (a message, a reply, or the close)."""
        if self._fast_due:
            raise ProtocolError("remote: reading the next message before answering the last one")
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
            if not self._feed(data, fds, ctrunc):
                break
        return self._events.pop(0)

    def _read_fast(self) -> Message | None:
        """One message by the fast path, or None after feeding what was read to the endpoint."""
        cmd = self._read_fast_raw()
        return None if cmd < 0 else self.fast_message(cmd)

    def fast_message(self, cmd: int) -> Message:
        """The decoded message of the fast-path request whose payload :meth:`read_request` left.

        A guest polls the same few registers: each distinct payload is decoded once (messages
        are frozen, so one instance can be handed out many times).
        """
        size = _FAST_SIZES[cmd]
        if not size:
            return _DEVICE_RESET
        key = bytes(self._payload_views[size])
        cache = self._decoded[cmd]
        msg = cache.get(key)
        if msg is None:
            msg = _decode_fast(cmd, self._payload)
            if len(cache) >= _DECODED_MAX:
                cache.clear()
            cache[key] = msg
        return msg

    def read_request(self, recv_flags: int = 0) -> int:
        """Remote role, the serve loop's hot path: read one message, decode nothing.

        Returns the command of a fast-path request (exactly 16 header bytes in one read, no fds,
        no MSG_CTRUNC, a fast command with its exact payload size; the payload is then in
        :attr:`payload` and its RET is due), or -1 when the message is anything else or the
        transport is not at a clean boundary: then the bytes read (if any) went to the endpoint
        and :meth:`read_message` returns what the codec makes of them.
        """
        if self._fast and not self._fast_due and (self._clean or self._recheck_clean()):
            return self._read_fast_raw(recv_flags)
        return -1

    def _read_fast_raw(self, recv_flags: int = 0) -> int:
        """Read as :meth:`read_event` would (a 16-byte ``recvmsg`` with room for 16 fds, then the
        payload with plain ``recv``) into the preallocated buffers; the fast command, or -1 after
        feeding what was read to the endpoint."""
        sock = self.sock
        header = self._header
        while True:
            try:
                n, ancdata, flags, _ = sock.recvmsg_into(
                    self._header_bufs, CMSG_SPACE, _MSG_CMSG_CLOEXEC | recv_flags
                )
                break
            except InterruptedError:
                continue
            except ConnectionResetError:
                n, ancdata, flags = 0, [], 0
                break
        if n == wire.HEADER_SIZE and not ancdata and not flags & _MSG_CTRUNC:
            fast: int  # (a local annotation costs nothing at run time)
            size: int
            fast, size = _HEADER_UNPACK(header)
            if _FAST_SIZES.get(fast) == size:
                got = 0
                view = self._payload_view
                while got < size:
                    try:
                        k = sock.recv_into(view[got:size] if got else self._payload_views[size])
                    except InterruptedError:
                        continue
                    except BlockingIOError:
                        self._wait_readable()
                        continue
                    except ConnectionResetError:
                        k = 0
                    if not k:
                        break
                    got += k
                if got == size:
                    self._fast_due = True
                    return fast
                # the peer closed inside the payload: the endpoint judges it (TruncatedMessage)
                self._feed(bytes(header), FdBundle(), False)
                if got:
                    self._feed(bytes(self._payload[:got]), FdBundle(), False)
                self._feed(b"", FdBundle(), False)
                return -1
        fds = FdBundle.adopt(fds_from_ancillary(ancdata), os.close) if ancdata else FdBundle()
        self._feed(bytes(header[:n]), fds, bool(flags & _MSG_CTRUNC))
        return -1

    def _recheck_clean(self) -> bool:
        self._clean = (
            not self._events
            and self.endpoint.state is State.IDLE
            and self.endpoint.wants() == _AT_BOUNDARY
        )
        return self._clean

    def read_message(self) -> Message | None:
        """Remote role: the next valid message, or None on a clean EOF at a message boundary."""
        if self._fast and not self._fast_due and (self._clean or self._recheck_clean()):
            msg = self._read_fast()
            if msg is not None:
                return msg
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
        if self._fast_due:
            self._send_fast_reply(msg)
            return
        data, fds = self.endpoint.send(msg)
        self.send_raw(data, fds)

    def _send_fast_reply(self, msg: Message) -> None:
        """The RET for a fast-path request: the bytes ``encode`` would produce, no fds."""
        if type(msg) is not Ret:
            # the endpoint is IDLE, so it refuses this exactly as it would in REPLY_DUE
            self._fast_due = False
            self.endpoint.send(msg)
            raise ProtocolError("remote: may only send RET")  # pragma: no cover - send raised
        # the reply is no longer due even if encoding fails (the endpoint steps first, too)
        self._fast_due = False
        value = msg.value
        frames = self._ret_frames
        data = frames.get(value) if msg.size == _RET_SIZE else None
        if data is None:
            if msg.size == _RET_SIZE and 0 <= value <= wire.UINT64_MAX:
                data = _RET_FRAME.pack(_RET_CMD, _RET_SIZE, value)
                if len(frames) >= _DECODED_MAX:
                    frames.clear()
                frames[value] = data
            else:
                data, _ = encode(msg)  # validates like the endpoint (ProtocolError when it cannot)
        self._send_frame(data)

    def send_ret_value(self, value: int) -> None:
        """The RET (8-byte payload) for the fast-path request :meth:`read_request` returned.

        Exactly what ``send_message(Ret(value))`` sends: the cached frame for a value seen before,
        else the codec's rules (a value outside u64 is refused by ``encode``).
        """
        data = self._ret_frames.get(value)
        if data is None or not self._fast_due:
            self.send_message(Ret(value))  # the same checks, and the frame is cached for next time
            return
        self._fast_due = False
        self._send_frame(data)

    def send_raw(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        """Write ``data`` with ``fds`` attached to the first sendmsg (mpqemu_msg_send)."""
        send_with_fds(self.sock, data, fds)

    def _send_frame(self, data: bytes) -> None:
        """A cached RET frame, no fds: plain ``send`` (cheaper than sendmsg on the hot path)."""
        while True:
            try:
                sent = self.sock.send(data)
                break
            except InterruptedError:
                continue
        if sent < len(data):
            send_with_fds(self.sock, data[sent:])

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
