"""Wire constants and struct layouts of QEMU 7.2's mpqemu protocol on x86_64.

Pure data: command numbers (enum MPQemuCmd in include/hw/remote/mpqemu-link.h, no explicit
initialisers, so 0..7 with MPQEMU_CMD_MAX = 8), the 16-byte header and the payload layouts as
``struct`` formats. All integers are host-native, i.e. little-endian on x86_64; the formats say
``<`` explicitly so the codec is exact on any host running the tests. Must not do IO.
"""

from __future__ import annotations

import enum
import struct
from typing import Final


class Cmd(enum.IntEnum):
    """MPQemuCmd (include/hw/remote/mpqemu-link.h)."""

    SYNC_SYSMEM = 0
    RET = 1
    PCI_CFGWRITE = 2
    PCI_CFGREAD = 3
    BAR_WRITE = 4
    BAR_READ = 5
    SET_IRQFD = 6
    DEVICE_RESET = 7


CMD_MAX: Final = 8  # MPQEMU_CMD_MAX; cmd >= MAX or < 0 fails mpqemu_msg_valid

# MPQemuMsg header: int cmd; (4 bytes padding); size_t size; then the data union.
# MPQEMU_MSG_HDR_SIZE = offsetof(MPQemuMsg, data.u64) = 16.
HEADER: Final = struct.Struct("<i4xQ")
HEADER_SIZE: Final = HEADER.size
assert HEADER_SIZE == 16

# REMOTE_MAX_FDS: the fds[] array in MPQemuMsg holds 8; mpqemu_msg_valid requires num_fds < 8.
REMOTE_MAX_FDS: Final = 8
# QIOChannelSocket receives at most SOCKET_MAX_FDS = 16 fds per recvmsg (io/channel-socket.c);
# the transport sizes its control buffer for that many so a 9..16-fd message is seen (and refused)
# rather than silently truncated.
SOCKET_MAX_FDS: Final = 16

# SyncSysmemMsg: hwaddr gpas[8]; uint64_t sizes[8]; off_t offsets[8].
SYNC_SYSMEM: Final = struct.Struct("<8Q8Q8q")
assert SYNC_SYSMEM.size == 192
# The data union's size is that of its largest member, SyncSysmemMsg (mpqemu_msg_recv refuses
# a larger size with "Invalid size for message").
MAX_PAYLOAD: Final = SYNC_SYSMEM.size

# PciConfDataMsg: uint32_t addr; uint32_t val; int len.
PCI_CONF: Final = struct.Struct("<IIi")
assert PCI_CONF.size == 12

# BarAccessMsg: hwaddr addr; uint64_t val; unsigned size; bool memory; (3 bytes padding).
BAR_ACCESS: Final = struct.Struct("<QQIB3x")
assert BAR_ACCESS.size == 24

# RET: data.u64.
RET_U64: Final = struct.Struct("<Q")
UINT64_MAX: Final = (1 << 64) - 1

# Commands the proxy sends that the remote answers with RET (hw/remote/message.c); SYNC_SYSMEM
# and SET_IRQFD get no reply.
REPLY_EXPECTED: Final = frozenset(
    {Cmd.PCI_CFGWRITE, Cmd.PCI_CFGREAD, Cmd.BAR_WRITE, Cmd.BAR_READ, Cmd.DEVICE_RESET}
)
