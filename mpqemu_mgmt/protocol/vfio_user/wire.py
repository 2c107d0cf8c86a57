"""vfio-user wire constants and the 16-byte message header (pure data and two pure functions).

The numbers are those of ``docs/interop/vfio-user.rst`` and of QEMU's client headers
(``hw/vfio-user/protocol.h``, and ``<linux/vfio.h>`` for the VFIO structures it imports). All
fields are host-endian; this package only targets little-endian x86_64 hosts, so every layout
is spelled ``<`` explicitly.

This module must not do IO, import socket/os/asyncio, or hold state.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from mpqemu_mgmt.errors import InvalidMessage, TruncatedMessage


class Command(enum.IntEnum):
    """Message commands (vfio-user.rst "Commands"; hw/vfio-user/protocol.h ``vfio_user_command``)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14  # obsolete; QEMU's enum still lists it
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# Header flags (hw/vfio-user/protocol.h VFIO_USER_REQUEST/REPLY/TYPE/NO_REPLY/ERROR)
FLAG_TYPE_MASK: Final = 0x0F
TYPE_COMMAND: Final = 0x0
TYPE_REPLY: Final = 0x1
FLAG_NO_REPLY: Final = 0x10
FLAG_ERROR: Final = 0x20
FLAGS_KNOWN: Final = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR

HEADER = struct.Struct("<HHIII")  # msg_id, command, msg_size (incl. header), flags, error
HEADER_SIZE: Final = HEADER.size  # 16

# Protocol version. QEMU's client proposes 0.0 (VFIO_USER_MAJOR_VER/MINOR_VER in
# hw/vfio-user/protocol.h) and refuses a reply with another major or a larger minor
# (vfio_user_validate_version in hw/vfio-user/proxy.c).
VERSION_MAJOR: Final = 0
VERSION_MINOR: Final = 0

# Capability defaults (vfio-user.rst "Version"; VFIO_USER_DEF_* in hw/vfio-user/protocol.h)
DEFAULT_MAX_MSG_FDS: Final = 1  # what a receiver must assume when the sender names none
DEFAULT_MAX_DATA_XFER: Final = 1024 * 1024
DEFAULT_MAX_DMA_MAPS: Final = 65535
DEFAULT_PGSIZES: Final = 4096
MAX_MAX_DATA_XFER: Final = 64 * 1024 * 1024  # VFIO_USER_MAX_MAX_XFER: QEMU refuses more
MAX_MAX_MSG_FDS: Final = 16  # VFIO_USER_MAX_MAX_FDS

# Largest message this server accepts: the biggest legal one is a REGION_WRITE or DMA reply
# carrying max_data_xfer_size bytes behind a 16-byte header and a 16-byte fixed part; QEMU's client
# applies the same bound to requests it receives (vfio_user_recv_one: max_xfer_size +
# sizeof(VFIOUserDMARW)). A larger msg_size is a framing error: the stream cannot be trusted.
FIXED_PART_MAX: Final = 32

# <linux/vfio.h> VFIO_DEVICE_FLAGS_*
DEVICE_FLAGS_RESET: Final = 1 << 0
DEVICE_FLAGS_PCI: Final = 1 << 1

# <linux/vfio.h> PCI region indexes (VFIO_PCI_*_REGION_INDEX)
REGION_BAR0: Final = 0
REGION_ROM: Final = 6
REGION_CONFIG: Final = 7
REGION_VGA: Final = 8
PCI_NUM_REGIONS: Final = 9

# <linux/vfio.h> VFIO_REGION_INFO_FLAG_*
REGION_FLAG_READ: Final = 1 << 0
REGION_FLAG_WRITE: Final = 1 << 1
REGION_FLAG_MMAP: Final = 1 << 2
REGION_FLAG_CAPS: Final = 1 << 3

# <linux/vfio.h> PCI IRQ indexes (VFIO_PCI_*_IRQ_INDEX)
IRQ_INTX: Final = 0
IRQ_MSI: Final = 1
IRQ_MSIX: Final = 2
IRQ_ERR: Final = 3
IRQ_REQ: Final = 4
PCI_NUM_IRQS: Final = 5

# <linux/vfio.h> VFIO_IRQ_INFO_*
IRQ_INFO_EVENTFD: Final = 1 << 0
IRQ_INFO_MASKABLE: Final = 1 << 1
IRQ_INFO_AUTOMASKED: Final = 1 << 2
IRQ_INFO_NORESIZE: Final = 1 << 3

# <linux/vfio.h> VFIO_IRQ_SET_*
IRQ_SET_DATA_NONE: Final = 1 << 0
IRQ_SET_DATA_BOOL: Final = 1 << 1
IRQ_SET_DATA_EVENTFD: Final = 1 << 2
IRQ_SET_ACTION_MASK: Final = 1 << 3
IRQ_SET_ACTION_UNMASK: Final = 1 << 4
IRQ_SET_ACTION_TRIGGER: Final = 1 << 5
IRQ_SET_DATA_MASK: Final = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK_ALL: Final = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER

# DMA_MAP flags (vfio-user.rst; VFIO_DMA_MAP_FLAG_READ/WRITE)
DMA_FLAG_READ: Final = 1 << 0
DMA_FLAG_WRITE: Final = 1 << 1

# errno values sent in error replies (Linux x86_64); the codec must not import os/errno users
# only for numbers, so they are spelled here once.
EPERM: Final = 1
ENOENT: Final = 2
EIO: Final = 5
E2BIG: Final = 7
EBADF: Final = 9
ENOMEM: Final = 12
EFAULT: Final = 14
EBUSY: Final = 16
EEXIST: Final = 17
ENODEV: Final = 19
EINVAL: Final = 22
ENOSPC: Final = 28
ENOSYS: Final = 38
ENOTSUP: Final = 95


@dataclass(frozen=True, slots=True)
class Header:
    """The 16-byte header every vfio-user message starts with."""

    msg_id: int
    command: int
    size: int  # the whole message, header included
    flags: int
    error: int = 0

    @property
    def is_reply(self) -> bool:
        return (self.flags & FLAG_TYPE_MASK) == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def payload_size(self) -> int:
        return self.size - HEADER_SIZE

    def pack(self) -> bytes:
        return HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)


def max_message_size(max_data_xfer: int) -> int:
    """The largest ``msg_size`` a peer that negotiated ``max_data_xfer`` may legally send."""
    return HEADER_SIZE + FIXED_PART_MAX + max_data_xfer


def unpack_header(data: bytes | bytearray | memoryview, max_size: int) -> Header:
    """Decode and frame-check a header; any failure here means the stream is unusable.

    Mirrors the checks QEMU's client runs before it trusts a message (vfio_user_recv_one in
    hw/vfio-user/proxy.c): the size covers at least the header, is bounded, and the type is
    command or reply. Raises TruncatedMessage for a short header and InvalidMessage otherwise,
    both with ``fatal=True`` in their details.
    """
    if len(data) < HEADER_SIZE:
        raise TruncatedMessage("short vfio-user header", got=len(data), fatal=True)
    msg_id, command, size, flags, error = HEADER.unpack_from(data, 0)
    if size < HEADER_SIZE:
        raise InvalidMessage("msg_size smaller than the header", size=size, fatal=True)
    if size > max_size:
        raise InvalidMessage("msg_size over the negotiated maximum", size=size, limit=max_size, fatal=True)
    kind = flags & FLAG_TYPE_MASK
    if kind not in (TYPE_COMMAND, TYPE_REPLY):
        raise InvalidMessage("unknown message type", flags=flags, fatal=True)
    return Header(msg_id, command, size, flags, error)
