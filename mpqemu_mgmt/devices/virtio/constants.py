"""Virtio wire numbers used by the legacy virtio-pci transport and the split ring.

Pure constants only; no logic. Values mirror QEMU 7.2's
``include/standard-headers/linux/virtio_config.h``, ``virtio_ring.h``, ``virtio_pci.h`` and
``virtio_blk.h`` (copied from Linux), and the legacy layout of the virtio 0.9.5 / 1.x
"Legacy Interfaces" section.
"""

from __future__ import annotations

import enum


class Status(enum.IntFlag):
    """Device status byte (virtio_config.h ``VIRTIO_CONFIG_S_*``)."""

    ACKNOWLEDGE = 0x01
    DRIVER = 0x02
    DRIVER_OK = 0x04
    FEATURES_OK = 0x08
    NEEDS_RESET = 0x40
    FAILED = 0x80


class Feature(enum.IntEnum):
    """Transport feature bit numbers (virtio_config.h / virtio_ring.h)."""

    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    BAD_FEATURE = 30


class BlkFeature(enum.IntEnum):
    """virtio-blk feature bit numbers (virtio_blk.h ``VIRTIO_BLK_F_*``)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


class LegacyReg(enum.IntEnum):
    """Offsets in the legacy virtio-pci I/O BAR (virtio_pci.h ``VIRTIO_PCI_*``).

    Without MSI-X (``vectors=0``) the device-specific config starts at 0x14
    (``VIRTIO_PCI_CONFIG_OFF(false)``); the MSI vector registers 0x14/0x16 do not exist.
    """

    HOST_FEATURES = 0x00  # 32-bit, read-only
    GUEST_FEATURES = 0x04  # 32-bit, read-write
    QUEUE_PFN = 0x08  # 32-bit, read-write: ring address >> 12
    QUEUE_NUM = 0x0C  # 16-bit, read-only
    QUEUE_SEL = 0x0E  # 16-bit, read-write
    QUEUE_NOTIFY = 0x10  # 16-bit, write
    STATUS = 0x12  # 8-bit, read-write
    ISR = 0x13  # 8-bit, read clears
    CONFIG = 0x14  # device config, no MSI-X


#: VIRTIO_PCI_QUEUE_ADDR_SHIFT: the legacy PFN register holds the ring address in 4 KiB pages.
QUEUE_ADDR_SHIFT = 12
#: VIRTIO_PCI_VRING_ALIGN: legacy rings put the used ring on the next 4 KiB boundary.
VRING_ALIGN = 4096
#: VIRTIO_QUEUE_MAX in hw/virtio/virtio.h: queue selectors at or above it are ignored.
VIRTIO_QUEUE_MAX = 1024
#: VIRTQUEUE_MAX_SIZE in include/hw/virtio/virtio.h: the most iovecs one element may map.
VIRTQUEUE_MAX_SIZE = 1024

ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

# Descriptor flags (virtio_ring.h VRING_DESC_F_*).
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
# avail->flags / used->flags (virtio_ring.h).
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

DESC_SIZE = 16  # struct vring_desc: le64 addr, le32 len, le16 flags, le16 next
USED_ELEM_SIZE = 8  # struct vring_used_elem: le32 id, le32 len

# virtio-blk request types and status bytes (virtio_blk.h).
BLK_T_IN = 0
BLK_T_OUT = 1
BLK_T_SCSI_CMD = 2
BLK_T_FLUSH = 4
BLK_T_GET_ID = 8
BLK_T_DISCARD = 11
BLK_T_WRITE_ZEROES = 13
BLK_T_BARRIER = 0x80000000

BLK_S_OK = 0
BLK_S_IOERR = 1
BLK_S_UNSUPP = 2

BLK_ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES
SECTOR_SIZE = 512  # BDRV_SECTOR_SIZE: virtio-blk sectors are always 512 bytes
BLK_OUTHDR_SIZE = 16  # struct virtio_blk_outhdr: le32 type, le32 ioprio, le64 sector
