"""The server-role vfio-user endpoint: a sans-IO state machine (h11/wsproto style).

``receive(header, payload, fds)`` turns one framed message into exactly one event; ``reply``,
``error``, ``dma_read`` and ``dma_write`` turn decisions into bytes. The endpoint never acts by
itself, never touches a device and never closes an fd: the event says which fds a handler may
adopt and the transport closes the rest.

State table (vfio-user.rst "Connection Initiation": VERSION is the client's first message):

====================  ==================================  ===================
state                 VERSION                             any other command
====================  ==================================  ===================
AWAIT_VERSION         negotiate -> READY (or close)       rejected EINVAL
READY                 rejected EINVAL (already agreed)    decoded -> handler
CLOSED                (nothing is read any more)
====================  ==================================  ===================

This module must not do IO or import socket/os/asyncio.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from mpqemu_mgmt.errors import InvalidMessage
from mpqemu_mgmt.protocol.vfio_user import codec, wire
from mpqemu_mgmt.protocol.vfio_user import messages as m
from mpqemu_mgmt.protocol.vfio_user.wire import Command, Header


class State(enum.Enum):
    AWAIT_VERSION = "await-version"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True)
class ServerCaps:
    """What this server offers and accepts."""

    max_msg_fds: int = 8  # fds we accept in one message; QEMU chunks SET_IRQS by it
    max_data_xfer_size: int = wire.DEFAULT_MAX_DATA_XFER
    pgsizes: int = wire.DEFAULT_PGSIZES
    max_dma_maps: int = 64  # DMA windows we keep at once (guest RAM is a handful)


@dataclass(frozen=True)
class Negotiated:
    """The session's agreed version and the client's limits that bind us."""

    major: int
    minor: int
    client_max_msg_fds: int
    client_max_data_xfer: int


@dataclass(frozen=True)
class RequestReceived:
    msg_id: int
    no_reply: bool
    request: m.Request


@dataclass(frozen=True)
class Rejected:
    """A command that broke a rule. ``answer`` is the error reply to send (None for NO_REPLY)."""

    msg_id: int
    command: int
    errno: int
    reason: str
    answer: bytes | None
    fatal: bool = False


@dataclass(frozen=True)
class ReplyReceived:
    """The client's answer to one of our DMA_READ/DMA_WRITE commands."""

    msg_id: int
    command: int
    reply: m.Reply | None  # None when the client answered with an error
    errno: int = 0


@dataclass(frozen=True)
class StrayReply:
    """A reply to nothing we sent: dropped (QEMU's client does the same, "unexpected reply")."""

    msg_id: int
    command: int


Event = RequestReceived | Rejected | ReplyReceived | StrayReply


def _as_limit(caps: dict[str, Any], key: str, default: int, ceiling: int) -> int:
    value = caps.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > ceiling:
        raise InvalidMessage(f"VERSION: malformed {key}", errno=wire.EINVAL)
    return value


def negotiate(offer: m.Version, ours: ServerCaps) -> tuple[m.Version, Negotiated]:
    """Answer a client's VERSION (vfio-user.rst "Version"; checks as in QEMU's caps_check).

    Same major; minor no greater than proposed; only capabilities the client named, each with
    the smaller of the two limits where a smaller one is meaningful.
    """
    if offer.major != wire.VERSION_MAJOR:
        raise InvalidMessage("VERSION: unsupported major", errno=wire.ENOTSUP, major=offer.major, fatal=True)
    caps = offer.capabilities
    client_fds = _as_limit(caps, "max_msg_fds", wire.DEFAULT_MAX_MSG_FDS, wire.MAX_MAX_MSG_FDS)
    client_xfer = _as_limit(caps, "max_data_xfer_size", wire.DEFAULT_MAX_DATA_XFER, wire.MAX_MAX_DATA_XFER)
    pgsizes = _as_limit(caps, "pgsizes", wire.DEFAULT_PGSIZES, (1 << 64) - 1)
    if pgsizes & (wire.DEFAULT_PGSIZES - 1):
        raise InvalidMessage("VERSION: page sizes below 4 KiB", errno=wire.EINVAL)
    _as_limit(caps, "max_dma_maps", wire.DEFAULT_MAX_DMA_MAPS, (1 << 32) - 1)
    answer: dict[str, Any] = {}
    if "max_msg_fds" in caps:
        answer["max_msg_fds"] = ours.max_msg_fds
    if "max_data_xfer_size" in caps:
        answer["max_data_xfer_size"] = ours.max_data_xfer_size
    if "pgsizes" in caps:
        answer["pgsizes"] = ours.pgsizes
    if "max_dma_maps" in caps:
        answer["max_dma_maps"] = ours.max_dma_maps
    minor = min(offer.minor, wire.VERSION_MINOR)
    agreed = Negotiated(wire.VERSION_MAJOR, minor, client_fds, client_xfer)
    return m.Version(wire.VERSION_MAJOR, minor, answer), agreed


@dataclass
class ServerEndpoint:
    """One vfio-user session, server side."""

    caps: ServerCaps = field(default_factory=ServerCaps)
    state: State = State.AWAIT_VERSION
    negotiated: Negotiated | None = None
    _next_id: int = 0
    _pending: dict[int, int] = field(default_factory=dict)  # our msg_id -> command

    @property
    def max_message_size(self) -> int:
        return wire.max_message_size(self.caps.max_data_xfer_size)

    @property
    def client_max_data_xfer(self) -> int:
        return self.negotiated.client_max_data_xfer if self.negotiated else wire.DEFAULT_MAX_DATA_XFER

    def unpack_header(self, data: bytes | bytearray | memoryview) -> Header:
        return wire.unpack_header(data, self.max_message_size)

    def _reject(self, header: Header, exc: InvalidMessage) -> Rejected:
        errno = int(exc.details.get("errno", wire.EINVAL))
        fatal = bool(exc.details.get("fatal", False))
        answer = None if header.no_reply else codec.encode_error(header.msg_id, header.command, errno)
        if fatal:
            self.state = State.CLOSED
        return Rejected(header.msg_id, header.command, errno, exc.message, answer, fatal)

    def receive(self, header: Header, payload: bytes, fds: tuple[int, ...] = ()) -> Event:
        """One framed message in, one event out. Never raises for peer misbehaviour."""
        if self.state is State.CLOSED:
            return self._reject(header, InvalidMessage("session closed", errno=wire.EINVAL))
        if header.is_reply:
            return self._receive_reply(header, payload, fds)
        if len(fds) > self.caps.max_msg_fds:
            return self._reject(header, InvalidMessage("too many fds", errno=wire.EINVAL))
        try:
            request = codec.decode_request(header, payload, fds)
        except InvalidMessage as exc:
            return self._reject(header, exc)
        if self.state is State.AWAIT_VERSION:
            if not isinstance(request, m.Version):
                return self._reject(header, InvalidMessage("VERSION must come first", errno=wire.EINVAL))
            try:
                reply, self.negotiated = negotiate(request, self.caps)
            except InvalidMessage as exc:
                return self._reject(header, exc)
            self.state = State.READY
            return RequestReceived(header.msg_id, header.no_reply, reply)
        if isinstance(request, m.Version):
            return self._reject(header, InvalidMessage("VERSION already negotiated", errno=wire.EINVAL))
        return RequestReceived(header.msg_id, header.no_reply, request)

    def _receive_reply(self, header: Header, payload: bytes, fds: tuple[int, ...]) -> Event:
        command = self._pending.get(header.msg_id)
        if command is None or command != header.command:
            return StrayReply(header.msg_id, header.command)
        del self._pending[header.msg_id]
        if header.is_error:
            return ReplyReceived(header.msg_id, command, None, header.error or wire.EIO)
        try:
            reply = codec.decode_reply(header, payload, fds, command)
        except InvalidMessage as exc:
            return ReplyReceived(header.msg_id, command, None, int(exc.details.get("errno", wire.EINVAL)))
        return ReplyReceived(header.msg_id, command, reply)

    # -- outgoing ---------------------------------------------------------------------------

    def reply(self, msg_id: int, body: Any) -> bytes:
        return codec.encode(msg_id, body, reply=True)

    def error(self, msg_id: int, command: int, errno: int) -> bytes:
        return codec.encode_error(msg_id, command, errno)

    def _request(self, body: m.DmaRead | m.DmaWrite) -> tuple[int, bytes]:
        if self.state is not State.READY:
            raise InvalidMessage("DMA before VERSION", errno=wire.EINVAL)
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        self._pending[msg_id] = int(body.COMMAND)
        return msg_id, codec.encode(msg_id, body)

    def dma_read(self, address: int, count: int) -> tuple[int, bytes]:
        """A DMA_READ command to the client (memory not shared by fd)."""
        if count > self.client_max_data_xfer:
            raise InvalidMessage("DMA_READ over the client's max_data_xfer_size", errno=wire.E2BIG)
        return self._request(m.DmaRead(address, count))

    def dma_write(self, address: int, data: bytes) -> tuple[int, bytes]:
        if len(data) > self.client_max_data_xfer:
            raise InvalidMessage("DMA_WRITE over the client's max_data_xfer_size", errno=wire.E2BIG)
        return self._request(m.DmaWrite(address, bytes(data)))

    def close(self) -> None:
        self.state = State.CLOSED
        self._pending.clear()


# Re-exported for callers that only need the command numbers.
__all__ = [
    "Command",
    "Event",
    "Negotiated",
    "Rejected",
    "ReplyReceived",
    "RequestReceived",
    "ServerCaps",
    "ServerEndpoint",
    "State",
    "StrayReply",
    "negotiate",
]
