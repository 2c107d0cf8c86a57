"""Frozen dataclasses for every vfio-user message this package speaks, with their byte layouts.

Each class knows its command, packs its payload (the bytes after the 16-byte header) and unpacks
one from bytes plus the SCM_RIGHTS fds that came with it, applying the per-message validity rules
(sizes, flag combinations, fd counts). Layouts follow ``docs/interop/vfio-user.rst`` and the
structures QEMU's client actually sends and reads (``hw/vfio-user/protocol.h``,
``hw/vfio-user/device.c``, ``hw/vfio-user/pci.c``); where the two differ, QEMU wins and the class
says so. fds are plain ints here: the codec never opens, closes or owns them (the transport does,
and closes every fd of a rejected message).

This module must not do IO or import socket/os/asyncio.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mpqemu_mgmt.errors import InvalidMessage
from mpqemu_mgmt.protocol.vfio_user import wire
from mpqemu_mgmt.protocol.vfio_user.wire import Command

_U64 = (1 << 64) - 1


def _bad(reason: str, errno: int = wire.EINVAL, **details: Any) -> InvalidMessage:
    return InvalidMessage(reason, errno=errno, **details)


def _no_fds(fds: tuple[int, ...], what: str) -> None:
    if fds:
        raise _bad(f"{what} carries no file descriptors", nfds=len(fds))


def _exact(payload: bytes, size: int, what: str) -> None:
    if len(payload) != size:
        raise _bad(f"{what}: payload of {len(payload)} bytes, expected {size}")


def _at_least(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise _bad(f"{what}: payload of {len(payload)} bytes, expected at least {size}")


def _argsz_covers(argsz: int, size: int, what: str) -> None:
    # argsz is the VFIO ioctl convention: the caller's struct size, never below the fixed part.
    if argsz < size:
        raise _bad(f"{what}: argsz too small", argsz=argsz)


# --------------------------------------------------------------------------- VERSION


@dataclass(frozen=True)
class Version:
    """VERSION command and reply: major, minor, then optional NUL-terminated JSON."""

    COMMAND: ClassVar[Command] = Command.VERSION
    FIXED: ClassVar[struct.Struct] = struct.Struct("<HH")

    major: int
    minor: int
    capabilities: dict[str, Any] = field(default_factory=dict)

    def pack(self) -> bytes:
        doc = json.dumps({"capabilities": self.capabilities}, separators=(",", ":"), sort_keys=True)
        return self.FIXED.pack(self.major, self.minor) + doc.encode() + b"\0"

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> Version:
        _no_fds(fds, "VERSION")
        _at_least(payload, cls.FIXED.size, "VERSION")
        major, minor = cls.FIXED.unpack_from(payload)
        text = payload[cls.FIXED.size :]
        caps: dict[str, Any] = {}
        if text:
            # QEMU's client insists on the terminating NUL (vfio_user_validate_version).
            if text[-1:] != b"\0" or b"\0" in text[:-1]:
                raise _bad("VERSION: capabilities not a single NUL-terminated string")
            try:
                doc = json.loads(text[:-1].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise _bad("VERSION: capabilities are not UTF-8 JSON") from exc
            if not isinstance(doc, dict):
                raise _bad("VERSION: capabilities document is not an object")
            inner = doc.get("capabilities", {})
            if not isinstance(inner, dict):
                raise _bad("VERSION: 'capabilities' is not an object")
            caps = inner
        return cls(major, minor, caps)


# --------------------------------------------------------------------------- DMA map / unmap


@dataclass(frozen=True)
class DmaMap:
    """DMA_MAP: a window of client memory, with at most one fd to mmap (none: use DMA_READ/WRITE)."""

    COMMAND: ClassVar[Command] = Command.DMA_MAP
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIQQQ")  # argsz flags offset address size

    flags: int
    offset: int
    address: int
    size: int
    fd: int | None = None

    @property
    def readable(self) -> bool:
        return bool(self.flags & wire.DMA_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & wire.DMA_FLAG_WRITE)

    @property
    def fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)

    def pack(self) -> bytes:
        return self.FIXED.pack(self.FIXED.size, self.flags, self.offset, self.address, self.size)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> DmaMap:
        _exact(payload, cls.FIXED.size, "DMA_MAP")
        argsz, flags, offset, address, size = cls.FIXED.unpack(payload)
        _argsz_covers(argsz, cls.FIXED.size, "DMA_MAP")
        if flags & ~(wire.DMA_FLAG_READ | wire.DMA_FLAG_WRITE):
            raise _bad("DMA_MAP: unknown flags", flags=flags)
        if size == 0 or address + size - 1 > _U64 or offset + size - 1 > _U64:
            raise _bad("DMA_MAP: empty or wrapping window", address=address, size=size)
        if len(fds) > 1:
            raise _bad("DMA_MAP: more than one fd", nfds=len(fds))
        if not fds and offset != 0:
            # vfio-user.rst: offset is "zero if the region is not mappable"
            raise _bad("DMA_MAP: offset without an fd", offset=offset)
        return cls(flags, offset, address, size, fds[0] if fds else None)


@dataclass(frozen=True)
class DmaUnmap:
    """DMA_UNMAP command, and its reply (which echoes the entry, vfio-user.rst)."""

    COMMAND: ClassVar[Command] = Command.DMA_UNMAP
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIQQ")  # argsz flags address size

    flags: int
    address: int
    size: int

    def pack(self) -> bytes:
        return self.FIXED.pack(self.FIXED.size, self.flags, self.address, self.size)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> DmaUnmap:
        _no_fds(fds, "DMA_UNMAP")
        _exact(payload, cls.FIXED.size, "DMA_UNMAP")
        argsz, flags, address, size = cls.FIXED.unpack(payload)
        _argsz_covers(argsz, cls.FIXED.size, "DMA_UNMAP")
        if flags:
            # VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP and friends: dirty tracking is not offered
            raise _bad("DMA_UNMAP: flags not supported", errno=wire.ENOTSUP, flags=flags)
        return cls(flags, address, size)


# --------------------------------------------------------------------------- device / region / irq info


@dataclass(frozen=True)
class DeviceInfoRequest:
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIII")

    argsz: int = 16

    def pack(self) -> bytes:
        return self.FIXED.pack(self.argsz, 0, 0, 0)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> DeviceInfoRequest:
        _no_fds(fds, "DEVICE_GET_INFO")
        _exact(payload, cls.FIXED.size, "DEVICE_GET_INFO")
        argsz, _flags, _nr, _ni = cls.FIXED.unpack(payload)
        _argsz_covers(argsz, cls.FIXED.size, "DEVICE_GET_INFO")
        return cls(argsz)


@dataclass(frozen=True)
class DeviceInfo:
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIII")

    flags: int
    num_regions: int
    num_irqs: int

    def pack(self) -> bytes:
        return self.FIXED.pack(self.FIXED.size, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> DeviceInfo:
        _no_fds(fds, "DEVICE_GET_INFO reply")
        _exact(payload, cls.FIXED.size, "DEVICE_GET_INFO reply")
        _argsz, flags, nr, ni = cls.FIXED.unpack(payload)
        return cls(flags, nr, ni)


@dataclass(frozen=True)
class RegionInfoRequest:
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIIIQQ")  # argsz flags index cap_offset size offset

    index: int
    argsz: int = 32

    def pack(self) -> bytes:
        return self.FIXED.pack(self.argsz, 0, self.index, 0, 0, 0)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> RegionInfoRequest:
        _no_fds(fds, "DEVICE_GET_REGION_INFO")
        # QEMU sends exactly the 32-byte struct even when its argsz asks for room for caps
        # (vfio_user_get_region_info in hw/vfio-user/device.c).
        _exact(payload, cls.FIXED.size, "DEVICE_GET_REGION_INFO")
        argsz, _flags, index, _cap, _size, _offset = cls.FIXED.unpack(payload)
        _argsz_covers(argsz, cls.FIXED.size, "DEVICE_GET_REGION_INFO")
        return cls(index, argsz)


@dataclass(frozen=True)
class RegionInfo:
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIIIQQ")

    index: int
    flags: int
    size: int
    offset: int = 0
    fd: int | None = None  # present only with REGION_FLAG_MMAP

    @property
    def fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)

    def pack(self) -> bytes:
        return self.FIXED.pack(self.FIXED.size, self.flags, self.index, 0, self.size, self.offset)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> RegionInfo:
        _at_least(payload, cls.FIXED.size, "DEVICE_GET_REGION_INFO reply")
        if len(fds) > 1:
            raise _bad("DEVICE_GET_REGION_INFO reply: more than one fd")
        _argsz, flags, index, _cap, size, offset = cls.FIXED.unpack_from(payload)
        return cls(index, flags, size, offset, fds[0] if fds else None)


@dataclass(frozen=True)
class IrqInfoRequest:
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIII")

    index: int
    argsz: int = 16

    def pack(self) -> bytes:
        return self.FIXED.pack(self.argsz, 0, self.index, 0)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> IrqInfoRequest:
        _no_fds(fds, "DEVICE_GET_IRQ_INFO")
        _exact(payload, cls.FIXED.size, "DEVICE_GET_IRQ_INFO")
        argsz, _flags, index, _count = cls.FIXED.unpack(payload)
        _argsz_covers(argsz, cls.FIXED.size, "DEVICE_GET_IRQ_INFO")
        return cls(index, argsz)


@dataclass(frozen=True)
class IrqInfo:
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIII")

    index: int
    flags: int
    count: int

    def pack(self) -> bytes:
        return self.FIXED.pack(self.FIXED.size, self.flags, self.index, self.count)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> IrqInfo:
        _no_fds(fds, "DEVICE_GET_IRQ_INFO reply")
        _exact(payload, cls.FIXED.size, "DEVICE_GET_IRQ_INFO reply")
        _argsz, flags, index, count = cls.FIXED.unpack(payload)
        return cls(index, flags, count)


@dataclass(frozen=True)
class SetIrqs:
    """DEVICE_SET_IRQS: one DATA_* kind and one ACTION_* per message (vfio-user.rst).

    With DATA_EVENTFD the fds travel as SCM_RIGHTS; QEMU sends ``count`` fds, or none to
    de-assign (vfio_user_device_io_set_irqs in hw/vfio-user/device.c sends all-valid or
    all-invalid runs).
    """

    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS
    FIXED: ClassVar[struct.Struct] = struct.Struct("<IIIII")  # argsz flags index start count

    flags: int
    index: int
    start: int
    count: int
    bools: tuple[bool, ...] = ()
    fds: tuple[int, ...] = ()

    @property
    def data(self) -> int:
        return self.flags & wire.IRQ_SET_DATA_MASK

    @property
    def action(self) -> int:
        return self.flags & wire.IRQ_SET_ACTION_MASK_ALL

    def pack(self) -> bytes:
        extra = bytes(1 if b else 0 for b in self.bools)
        argsz = self.FIXED.size + len(extra)
        return self.FIXED.pack(argsz, self.flags, self.index, self.start, self.count) + extra

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> SetIrqs:
        _at_least(payload, cls.FIXED.size, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = cls.FIXED.unpack_from(payload)
        extra = payload[cls.FIXED.size :]
        data = flags & wire.IRQ_SET_DATA_MASK
        action = flags & wire.IRQ_SET_ACTION_MASK_ALL
        if flags & ~(wire.IRQ_SET_DATA_MASK | wire.IRQ_SET_ACTION_MASK_ALL):
            raise _bad("DEVICE_SET_IRQS: unknown flags", flags=flags)
        if data.bit_count() != 1 or action.bit_count() != 1:
            raise _bad("DEVICE_SET_IRQS: need exactly one DATA and one ACTION flag", flags=flags)
        _argsz_covers(argsz, cls.FIXED.size, "DEVICE_SET_IRQS")
        if start + count > 0xFFFFFFFF:
            raise _bad("DEVICE_SET_IRQS: start+count wraps", start=start, count=count)
        bools: tuple[bool, ...] = ()
        if data == wire.IRQ_SET_DATA_BOOL:
            _no_fds(fds, "DEVICE_SET_IRQS(DATA_BOOL)")
            if len(extra) != count:
                raise _bad("DEVICE_SET_IRQS: bool array length differs from count", count=count)
            if any(b > 1 for b in extra):
                raise _bad("DEVICE_SET_IRQS: bool bytes must be 0 or 1")
            bools = tuple(bool(b) for b in extra)
        elif extra:
            raise _bad("DEVICE_SET_IRQS: trailing data without DATA_BOOL", extra=len(extra))
        elif data == wire.IRQ_SET_DATA_NONE:
            _no_fds(fds, "DEVICE_SET_IRQS(DATA_NONE)")
        elif fds and len(fds) != count:
            raise _bad("DEVICE_SET_IRQS: eventfd count differs from count", nfds=len(fds), count=count)
        return cls(flags, index, start, count, bools, tuple(fds))


# --------------------------------------------------------------------------- region access


# REGION_READ / REGION_WRITE, command and reply alike: offset u64, region u32, count u32, then
# ``count`` data bytes where the message carries data (VFIOUserRegionRW in hw/vfio-user/protocol.h).
REGION_RW = struct.Struct("<QII")


def _unpack_region_data(payload: bytes, what: str) -> tuple[int, int, bytes]:
    """``(region, offset, data)`` of a REGION_RW with data; ``count`` must cover the rest exactly."""
    _at_least(payload, REGION_RW.size, what)
    offset, region, count = REGION_RW.unpack_from(payload)
    _exact(payload, REGION_RW.size + count, what)
    return region, offset, bytes(payload[REGION_RW.size :])


@dataclass(frozen=True)
class RegionRead:
    COMMAND: ClassVar[Command] = Command.REGION_READ
    FIXED: ClassVar[struct.Struct] = REGION_RW

    region: int
    offset: int
    count: int

    def pack(self) -> bytes:
        return self.FIXED.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> RegionRead:
        _no_fds(fds, "REGION_READ")
        _exact(payload, cls.FIXED.size, "REGION_READ")
        offset, region, count = cls.FIXED.unpack(payload)
        return cls(region, offset, count)


@dataclass(frozen=True)
class RegionReadReply:
    COMMAND: ClassVar[Command] = Command.REGION_READ
    FIXED: ClassVar[struct.Struct] = REGION_RW

    region: int
    offset: int
    data: bytes

    def pack(self) -> bytes:
        return self.FIXED.pack(self.offset, self.region, len(self.data)) + self.data

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> RegionReadReply:
        _no_fds(fds, "REGION_READ reply")
        return cls(*_unpack_region_data(payload, "REGION_READ reply"))


@dataclass(frozen=True)
class RegionWrite:
    COMMAND: ClassVar[Command] = Command.REGION_WRITE
    FIXED: ClassVar[struct.Struct] = REGION_RW

    region: int
    offset: int
    data: bytes

    def pack(self) -> bytes:
        return self.FIXED.pack(self.offset, self.region, len(self.data)) + self.data

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> RegionWrite:
        _no_fds(fds, "REGION_WRITE")
        return cls(*_unpack_region_data(payload, "REGION_WRITE"))


@dataclass(frozen=True)
class RegionWriteReply:
    COMMAND: ClassVar[Command] = Command.REGION_WRITE
    FIXED: ClassVar[struct.Struct] = REGION_RW

    region: int
    offset: int
    count: int

    def pack(self) -> bytes:
        return self.FIXED.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> RegionWriteReply:
        _no_fds(fds, "REGION_WRITE reply")
        _exact(payload, cls.FIXED.size, "REGION_WRITE reply")
        offset, region, count = cls.FIXED.unpack(payload)
        return cls(region, offset, count)


@dataclass(frozen=True)
class RegionWriteMulti:
    """REGION_WRITE_MULTI: coalesced posted writes of at most 8 bytes each (VFIOUserWRMulti)."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI
    COUNT: ClassVar[struct.Struct] = struct.Struct("<Q")
    ONE: ClassVar[struct.Struct] = struct.Struct("<QII8s")  # offset region count data[8]
    MAX: ClassVar[int] = 200  # VFIO_USER_MULTI_MAX

    writes: tuple[RegionWrite, ...]

    def pack(self) -> bytes:
        parts = [self.COUNT.pack(len(self.writes))]
        parts += [self.ONE.pack(w.offset, w.region, len(w.data), w.data) for w in self.writes]
        return b"".join(parts)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> RegionWriteMulti:
        _no_fds(fds, "REGION_WRITE_MULTI")
        _at_least(payload, cls.COUNT.size, "REGION_WRITE_MULTI")
        (n,) = cls.COUNT.unpack_from(payload)
        if n > cls.MAX:
            raise _bad("REGION_WRITE_MULTI: too many writes", wr_cnt=n)
        _exact(payload, cls.COUNT.size + n * cls.ONE.size, "REGION_WRITE_MULTI")
        writes = []
        for i in range(n):
            offset, region, count, data = cls.ONE.unpack_from(payload, cls.COUNT.size + i * cls.ONE.size)
            if count > 8:
                raise _bad("REGION_WRITE_MULTI: entry over 8 bytes", count=count)
            writes.append(RegionWrite(region, offset, data[:count]))
        return cls(tuple(writes))


@dataclass(frozen=True)
class WriteMultiReply:
    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI

    wr_cnt: int

    def pack(self) -> bytes:
        return struct.pack("<Q", self.wr_cnt)


@dataclass(frozen=True)
class DeviceReset:
    COMMAND: ClassVar[Command] = Command.DEVICE_RESET

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> DeviceReset:
        _no_fds(fds, "DEVICE_RESET")
        _exact(payload, 0, "DEVICE_RESET")
        return cls()


@dataclass(frozen=True)
class Unsupported:
    """A well-formed command this server does not implement (answered with ENOTSUP)."""

    command: int
    payload: bytes = b""


@dataclass(frozen=True)
class Empty:
    """A reply without payload (DMA_MAP, SET_IRQS, DEVICE_RESET, DMA_WRITE)."""

    command: Command

    def pack(self) -> bytes:
        return b""


# --------------------------------------------------------------------------- server -> client DMA


# DMA_READ / DMA_WRITE (server -> client): address u64, count u64, data at payload byte 16, as
# vfio-user.rst documents. Verified against Debian's QEMU 11.1.3 binary: its DMA_READ reply
# carries the data at byte 16 and its DMA_WRITE reply echoes address and count (16 bytes). Some
# source snapshots of hw/vfio-user/protocol.h declare VFIOUserDMARW as {u64 offset; u32 count;
# char data[]} with a header-only DMA_WRITE reply; replies in that shape (no payload) are accepted.
DMA_RW = struct.Struct("<QQ")


def _unpack_dma_data(payload: bytes, what: str, errno: int) -> tuple[int, bytes]:
    """``(address, data)`` of a DMA_RW with data; bytes past ``count`` are not part of it."""
    _at_least(payload, DMA_RW.size, what)
    address, count = DMA_RW.unpack_from(payload)
    if count > len(payload) - DMA_RW.size:
        raise _bad(f"{what}: count beyond the message", errno=errno, count=count)
    return address, bytes(payload[DMA_RW.size : DMA_RW.size + count])


@dataclass(frozen=True)
class DmaRead:
    COMMAND: ClassVar[Command] = Command.DMA_READ

    address: int
    count: int

    def pack(self) -> bytes:
        return DMA_RW.pack(self.address, self.count)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> DmaRead:
        _no_fds(fds, "DMA_READ")
        _at_least(payload, DMA_RW.size, "DMA_READ")
        address, count = DMA_RW.unpack_from(payload)
        return cls(address, count)


@dataclass(frozen=True)
class DmaReadReply:
    COMMAND: ClassVar[Command] = Command.DMA_READ

    address: int
    data: bytes

    def pack(self) -> bytes:
        return DMA_RW.pack(self.address, len(self.data)) + self.data

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> DmaReadReply:
        _no_fds(fds, "DMA_READ reply")
        return cls(*_unpack_dma_data(payload, "DMA_READ reply", wire.EINVAL))


@dataclass(frozen=True)
class DmaWrite:
    COMMAND: ClassVar[Command] = Command.DMA_WRITE

    address: int
    data: bytes

    def pack(self) -> bytes:
        return DMA_RW.pack(self.address, len(self.data)) + self.data

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> DmaWrite:
        _no_fds(fds, "DMA_WRITE")
        return cls(*_unpack_dma_data(payload, "DMA_WRITE", wire.E2BIG))


@dataclass(frozen=True)
class DmaWriteReply:
    """DMA_WRITE reply: address and count echoed (QEMU 11.1), or nothing (older snapshots)."""

    COMMAND: ClassVar[Command] = Command.DMA_WRITE

    address: int | None = None
    count: int | None = None

    def pack(self) -> bytes:
        if self.address is None:
            return b""
        return DMA_RW.pack(self.address, self.count or 0)

    @classmethod
    def unpack(cls, payload: bytes, fds: tuple[int, ...] = ()) -> DmaWriteReply:
        _no_fds(fds, "DMA_WRITE reply")
        if not payload:
            return cls()
        _exact(payload, DMA_RW.size, "DMA_WRITE reply")
        address, count = DMA_RW.unpack(payload)
        return cls(address, count)


Request = (
    Version
    | DmaMap
    | DmaUnmap
    | DeviceInfoRequest
    | RegionInfoRequest
    | IrqInfoRequest
    | SetIrqs
    | RegionRead
    | RegionWrite
    | RegionWriteMulti
    | DeviceReset
    | Unsupported
)
Reply = (
    Version
    | DmaUnmap
    | DeviceInfo
    | RegionInfo
    | IrqInfo
    | RegionReadReply
    | RegionWriteReply
    | WriteMultiReply
    | DmaReadReply
    | DmaWriteReply
    | Empty
)
