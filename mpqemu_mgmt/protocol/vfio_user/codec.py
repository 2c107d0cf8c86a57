"""Encode and decode whole vfio-user messages: header + payload + fds <-> frozen dataclasses.

``decode_request`` is the server's view of client commands (validity rules applied, errors raised
as InvalidMessage carrying the errno to answer with); ``decode_reply`` and
``decode_server_request`` are the client's view, used by tests, the benchmark and the fuzz
campaign. Every encoder returns bytes only: fds are passed beside them by the caller.

This module must not do IO, own fds, or import socket/os/asyncio.
"""

from __future__ import annotations

from typing import Any

from mpqemu_mgmt.errors import InvalidMessage
from mpqemu_mgmt.protocol.vfio_user import messages as m
from mpqemu_mgmt.protocol.vfio_user import wire
from mpqemu_mgmt.protocol.vfio_user.wire import Command, Header

_REQUESTS: dict[int, Any] = {
    Command.VERSION: m.Version,
    Command.DMA_MAP: m.DmaMap,
    Command.DMA_UNMAP: m.DmaUnmap,
    Command.DEVICE_GET_INFO: m.DeviceInfoRequest,
    Command.DEVICE_GET_REGION_INFO: m.RegionInfoRequest,
    Command.DEVICE_GET_IRQ_INFO: m.IrqInfoRequest,
    Command.DEVICE_SET_IRQS: m.SetIrqs,
    Command.REGION_READ: m.RegionRead,
    Command.REGION_WRITE: m.RegionWrite,
    Command.REGION_WRITE_MULTI: m.RegionWriteMulti,
    Command.DEVICE_RESET: m.DeviceReset,
}

# Well-formed commands we answer with ENOTSUP rather than treat as garbage.
_UNSUPPORTED = frozenset(
    {
        Command.DEVICE_GET_REGION_IO_FDS,
        Command.DIRTY_PAGES,
        Command.DEVICE_FEATURE,
        Command.MIG_DATA_READ,
        Command.MIG_DATA_WRITE,
    }
)

_REPLIES: dict[int, Any] = {
    Command.VERSION: m.Version,
    Command.DMA_UNMAP: m.DmaUnmap,
    Command.DEVICE_GET_INFO: m.DeviceInfo,
    Command.DEVICE_GET_REGION_INFO: m.RegionInfo,
    Command.DEVICE_GET_IRQ_INFO: m.IrqInfo,
    Command.REGION_READ: m.RegionReadReply,
    Command.REGION_WRITE: m.RegionWriteReply,
    Command.DMA_READ: m.DmaReadReply,
    Command.DMA_WRITE: m.DmaWriteReply,
}


def encode(msg_id: int, body: Any, *, reply: bool = False, no_reply: bool = False) -> bytes:
    """Header + payload of ``body`` (any message dataclass with ``COMMAND``/``pack``, or Empty)."""
    payload: bytes = body.pack()
    command = int(body.command if isinstance(body, m.Empty) else body.COMMAND)
    flags = wire.TYPE_REPLY if reply else wire.TYPE_COMMAND
    if no_reply:
        flags |= wire.FLAG_NO_REPLY
    return Header(msg_id & 0xFFFF, command, wire.HEADER_SIZE + len(payload), flags).pack() + payload


def encode_error(msg_id: int, command: int, errno: int) -> bytes:
    """An error reply: header only, Error flag set (vfio-user.rst "Header")."""
    flags = wire.TYPE_REPLY | wire.FLAG_ERROR
    return Header(msg_id & 0xFFFF, command & 0xFFFF, wire.HEADER_SIZE, flags, errno & 0xFFFFFFFF).pack()


def decode_request(header: Header, payload: bytes, fds: tuple[int, ...] = ()) -> m.Request:
    """A client command, validated. Raises InvalidMessage(errno=...) on any rule broken."""
    if header.is_reply:
        raise InvalidMessage("a reply where a command was expected", errno=wire.EINVAL)
    if header.flags & ~wire.FLAGS_KNOWN or header.is_error or header.error:
        raise InvalidMessage("command with error bits or unknown flags", errno=wire.EINVAL)
    if len(payload) != header.payload_size:
        raise InvalidMessage("payload length differs from msg_size", errno=wire.EINVAL)
    cls = _REQUESTS.get(header.command)
    if cls is None:
        if header.command in _UNSUPPORTED:
            return m.Unsupported(header.command, bytes(payload))
        raise InvalidMessage("unknown command", errno=wire.ENOSYS, command=header.command)
    msg: m.Request = cls.unpack(bytes(payload), tuple(fds))
    return msg


def decode_reply(header: Header, payload: bytes, fds: tuple[int, ...], command: int) -> m.Reply:
    """The reply to a command we sent (client role, or the server's DMA requests)."""
    if not header.is_reply:
        raise InvalidMessage("a command where a reply was expected")
    if header.command != command:
        raise InvalidMessage("reply to a different command", got=header.command, expected=command)
    if header.is_error:
        raise InvalidMessage("error reply", errno=header.error, command=command)
    cls = _REPLIES.get(command)
    if cls is None:
        if payload:
            raise InvalidMessage("unexpected reply payload", command=command)
        return m.Empty(Command(command))
    reply: m.Reply = cls.unpack(bytes(payload), tuple(fds))
    return reply


def decode_server_request(
    header: Header, payload: bytes, fds: tuple[int, ...] = ()
) -> m.DmaRead | m.DmaWrite:
    """A server-to-client command (client role): only DMA_READ and DMA_WRITE exist."""
    if header.is_reply:
        raise InvalidMessage("a reply where a command was expected")
    if header.command == Command.DMA_READ:
        return m.DmaRead.unpack(bytes(payload), tuple(fds))
    if header.command == Command.DMA_WRITE:
        return m.DmaWrite.unpack(bytes(payload), tuple(fds))
    raise InvalidMessage("unknown server command", errno=wire.ENOSYS, command=header.command)
