"""Frozen mpqemu message types, their exact encoding, and decoding with QEMU 7.2's validity rules.

``encode(msg) -> (bytes, fds)`` produces exactly what ``mpqemu_msg_send`` writes (16-byte header,
then ``size`` payload bytes; the fds go as one SCM_RIGHTS message with the first byte).
``decode(cmd, payload, fds)`` applies the rules of ``mpqemu_msg_valid`` (hw/remote/mpqemu-link.c)
and returns a message or raises :class:`~mpqemu_mgmt.errors.InvalidMessage`; whatever happens,
every received fd ends up either inside the returned message or closed.

Must not do IO and must not import ``os``/``socket``/``asyncio``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mpqemu_mgmt.errors import InvalidMessage, ProtocolError, TooManyFds
from mpqemu_mgmt.protocol import wire
from mpqemu_mgmt.protocol.fds import OwnedFd
from mpqemu_mgmt.protocol.wire import Cmd

_U32 = (1 << 32) - 1
_U64 = wire.UINT64_MAX


def _check_range(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ProtocolError(f"{name}={value} does not fit the wire field", field=name, value=value)


@dataclass(frozen=True, slots=True)
class SysmemRegion:
    """One entry of SyncSysmemMsg: guest-physical ``gpa``, ``size`` bytes, at ``offset`` in ``fd``."""

    gpa: int
    size: int
    offset: int
    fd: OwnedFd = field(compare=False)


@dataclass(frozen=True, slots=True)
class SyncSysmem:
    """MPQEMU_CMD_SYNC_SYSMEM: replace the remote's whole view of guest RAM. No reply."""

    regions: tuple[SysmemRegion, ...]
    cmd = Cmd.SYNC_SYSMEM

    def close(self) -> None:
        for region in self.regions:
            region.fd.close()


@dataclass(frozen=True, slots=True)
class PciConfigRead:
    """MPQEMU_CMD_PCI_CFGREAD. ``value`` is unused (the proxy sends 0) but kept for exactness."""

    addr: int
    length: int
    value: int = 0
    cmd = Cmd.PCI_CFGREAD


@dataclass(frozen=True, slots=True)
class PciConfigWrite:
    """MPQEMU_CMD_PCI_CFGWRITE. ``length`` is a C int and is not range-checked by QEMU."""

    addr: int
    value: int
    length: int
    cmd = Cmd.PCI_CFGWRITE


@dataclass(frozen=True, slots=True)
class BarRead:
    """MPQEMU_CMD_BAR_READ at an absolute guest address (memory) or port (I/O)."""

    addr: int
    size: int
    memory: bool
    value: int = 0
    cmd = Cmd.BAR_READ


@dataclass(frozen=True, slots=True)
class BarWrite:
    """MPQEMU_CMD_BAR_WRITE at an absolute guest address (memory) or port (I/O)."""

    addr: int
    value: int
    size: int
    memory: bool
    cmd = Cmd.BAR_WRITE


@dataclass(frozen=True, slots=True)
class SetIrqfd:
    """MPQEMU_CMD_SET_IRQFD: fds[0] = irqfd (remote writes to assert INTx), fds[1] = resamplefd."""

    irqfd: OwnedFd = field(compare=False)
    resamplefd: OwnedFd = field(compare=False)
    cmd = Cmd.SET_IRQFD

    def close(self) -> None:
        self.irqfd.close()
        self.resamplefd.close()


@dataclass(frozen=True, slots=True)
class DeviceReset:
    """MPQEMU_CMD_DEVICE_RESET: no payload, no fds; answered by RET."""

    cmd = Cmd.DEVICE_RESET


@dataclass(frozen=True, slots=True)
class Ret:
    """MPQEMU_CMD_RET. ``size`` is the wire payload size: 8 normally, 0 for the stock reset reply.

    The proxy zero-fills its reply buffer (mpqemu_msg_send_and_await_reply), so a shorter payload
    supplies only the low bytes of ``value``; bytes past the first 8 of a longer payload are
    ignored, as ``data.u64`` ignores them, and re-encode as zeros.
    """

    value: int = 0
    size: int = 8
    cmd = Cmd.RET

    @property
    def failed(self) -> bool:
        return self.value == wire.UINT64_MAX


Message = SyncSysmem | PciConfigRead | PciConfigWrite | BarRead | BarWrite | SetIrqfd | DeviceReset | Ret
"""Any decoded mpqemu message."""

REQUEST_TYPES = (PciConfigRead, PciConfigWrite, BarRead, BarWrite, DeviceReset)
"""Proxy → remote messages answered by exactly one RET."""
NOTICE_TYPES = (SyncSysmem, SetIrqfd)
"""Proxy → remote messages that get no reply."""


def reply_expected(msg: Message) -> bool:
    return isinstance(msg, REQUEST_TYPES)


def message_fds(msg: Message) -> tuple[OwnedFd, ...]:
    """The fds a message owns, in wire order."""
    if isinstance(msg, SyncSysmem):
        return tuple(r.fd for r in msg.regions)
    if isinstance(msg, SetIrqfd):
        return (msg.irqfd, msg.resamplefd)
    return ()


def close_message(msg: Message) -> None:
    """Close every fd the message owns (for a consumer that does not adopt them)."""
    for fd in message_fds(msg):
        fd.close()


# ---------------------------------------------------------------------------------- encoding


def encode_frame(cmd: int, payload: bytes = b"", pad: int = 0) -> bytes:
    """Header + payload for any ``cmd`` (the fuzz campaign uses this for malformed frames)."""
    header = wire.HEADER.pack(cmd, len(payload))
    if pad:
        header = header[:4] + pad.to_bytes(4, "little") + header[8:]
    return header + payload


def encode_payload(msg: Message) -> bytes:
    """The exact payload bytes ``mpqemu_msg_send`` writes for ``msg``."""
    if isinstance(msg, SyncSysmem):
        n = len(msg.regions)
        if not 1 <= n <= wire.REMOTE_MAX_FDS:
            raise ProtocolError("SYNC_SYSMEM carries 1 to 8 regions", regions=n)
        gpas = [0] * 8
        sizes = [0] * 8
        offsets = [0] * 8
        for i, r in enumerate(msg.regions):
            _check_range("gpa", r.gpa, 0, _U64)
            _check_range("size", r.size, 0, _U64)
            _check_range("offset", r.offset, -(1 << 63), (1 << 63) - 1)
            gpas[i], sizes[i], offsets[i] = r.gpa, r.size, r.offset
        return wire.SYNC_SYSMEM.pack(*gpas, *sizes, *offsets)
    if isinstance(msg, PciConfigRead | PciConfigWrite):
        _check_range("addr", msg.addr, 0, _U32)
        _check_range("value", msg.value, 0, _U32)
        _check_range("length", msg.length, -(1 << 31), (1 << 31) - 1)
        return wire.PCI_CONF.pack(msg.addr, msg.value, msg.length)
    if isinstance(msg, BarRead | BarWrite):
        _check_range("addr", msg.addr, 0, _U64)
        _check_range("value", msg.value, 0, _U64)
        _check_range("size", msg.size, 0, _U32)
        return wire.BAR_ACCESS.pack(msg.addr, msg.value, msg.size, 1 if msg.memory else 0)
    if isinstance(msg, SetIrqfd | DeviceReset):
        return b""
    _check_range("size", msg.size, 0, wire.MAX_PAYLOAD)
    _check_range("value", msg.value, 0, _U64)
    full = wire.RET_U64.pack(msg.value)
    if msg.size < 8 and msg.value >> (8 * msg.size):
        raise ProtocolError("RET value does not fit its payload size", value=msg.value, size=msg.size)
    return full[: msg.size].ljust(msg.size, b"\0")


def encode(msg: Message) -> tuple[bytes, tuple[int, ...]]:
    """Return ``(bytes, fds)``: the fds are borrowed numbers, to be sent with the first byte."""
    return encode_frame(msg.cmd, encode_payload(msg)), tuple(f.fileno() for f in message_fds(msg))


# ---------------------------------------------------------------------------------- decoding


def check_header(cmd: int, size: int, nfds: int) -> None:
    """Checks that can be made as soon as the header (and its fds) arrived.

    Mirrors mpqemu_msg_recv: ``size > sizeof(msg->data)`` is "Invalid size for message"; more fds
    than ``G_N_ELEMENTS(msg->fds)`` is the "Overflow error". The caller closes the fds on error.
    """
    if size > wire.MAX_PAYLOAD:
        raise InvalidMessage("Invalid size for message", cmd=cmd, size=size)
    if nfds > wire.REMOTE_MAX_FDS:
        raise TooManyFds(
            f"received {nfds} fds, more than max of {wire.REMOTE_MAX_FDS} fds", cmd=cmd, nfds=nfds
        )


def decode(cmd: int, payload: bytes, fds: Sequence[OwnedFd]) -> Message:
    """Validate and decode one complete message; on any error every fd in ``fds`` is closed.

    Mirrors mpqemu_msg_valid (hw/remote/mpqemu-link.c), with two deliberate differences:
    SYNC_SYSMEM may carry 8 fds (the proxy sends 8 regions, the payload has 8 slots, the stock
    remote wrongly rejects them: protocol.md §2.3), and fds attached to a command that takes none
    are closed here instead of leaked as the stock remote does. ``fcntl(F_GETFL)`` on each fd is
    not repeated: a descriptor installed by SCM_RIGHTS is always open.
    """
    try:
        return _decode(cmd, payload, fds)
    except BaseException:
        for f in fds:
            f.close()
        raise


def _decode(cmd: int, payload: bytes, fds: Sequence[OwnedFd]) -> Message:
    size = len(payload)
    nfds = len(fds)
    check_header(cmd, size, nfds)
    if not 0 <= cmd < wire.CMD_MAX:
        raise InvalidMessage(f"Unknown command ({cmd})", cmd=cmd)
    kind = Cmd(cmd)
    if nfds >= wire.REMOTE_MAX_FDS and kind is not Cmd.SYNC_SYSMEM:
        raise InvalidMessage("too many fds for this command", cmd=cmd, nfds=nfds)

    if kind is Cmd.SYNC_SYSMEM:
        if nfds == 0 or size != wire.SYNC_SYSMEM.size:
            raise InvalidMessage("SYNC_SYSMEM needs >= 1 fd and a 192-byte payload", size=size, nfds=nfds)
        v = wire.SYNC_SYSMEM.unpack(payload)
        gpas, sizes, offsets = v[0:8], v[8:16], v[16:24]
        return SyncSysmem(
            tuple(SysmemRegion(gpas[i], sizes[i], offsets[i], fds[i]) for i in range(nfds))
        )
    if kind is Cmd.SET_IRQFD:
        if size != 0 or nfds != 2:
            raise InvalidMessage("SET_IRQFD needs no payload and exactly 2 fds", size=size, nfds=nfds)
        return SetIrqfd(fds[0], fds[1])
    if kind in (Cmd.BAR_READ, Cmd.BAR_WRITE):
        if size != wire.BAR_ACCESS.size or nfds != 0:
            raise InvalidMessage("BAR access needs a 24-byte payload and no fds", size=size, nfds=nfds)
        addr, value, width, memory = wire.BAR_ACCESS.unpack(payload)
        if kind is Cmd.BAR_READ:
            return BarRead(addr, width, memory != 0, value)
        return BarWrite(addr, value, width, memory != 0)

    msg: Message
    if kind in (Cmd.PCI_CFGREAD, Cmd.PCI_CFGWRITE):
        if size != wire.PCI_CONF.size:
            raise InvalidMessage("PCI config access needs a 12-byte payload", size=size)
        addr, value, length = wire.PCI_CONF.unpack(payload)
        if kind is Cmd.PCI_CFGREAD:
            msg = PciConfigRead(addr, length, value)
        else:
            msg = PciConfigWrite(addr, value, length)
    elif kind is Cmd.DEVICE_RESET:
        # No extra checks in mpqemu_msg_valid: a payload (<= 192 bytes) is read and ignored.
        msg = DeviceReset()
    else:
        # RET: no extra checks; the reader uses data.u64 of a zero-filled buffer.
        value = int.from_bytes(payload[:8].ljust(8, b"\0"), "little")
        msg = Ret(value, size)
    # Valid per QEMU, but these commands own no fds: close them rather than leak them.
    for f in fds:
        f.close()
    return msg
