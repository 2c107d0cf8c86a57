"""The split-ring layout both sides of a virtqueue agree on: where every field lives, in one place.

The device (:mod:`mpqemu_mgmt.devices.virtio.ring`) and the test driver
(:mod:`mpqemu_mgmt.testing.virtio_driver`) read and write the same three areas of guest RAM; the
struct formats, the offset of each field (:class:`SplitRing`), the legacy placement
(:func:`legacy_ring_layout`), the EVENT_IDX test (:func:`vring_need_event`) and the memory fence
they both need (:func:`full_barrier`) are defined here once, as Linux's
``include/uapi/linux/virtio_ring.h`` defines them for both of its sides.

This module is arithmetic and formats only: it must not read or write guest memory, keep queue
state, or know about PCI.
"""

from __future__ import annotations

import struct
import threading
from typing import NamedTuple

from mpqemu_mgmt.devices.virtio.constants import DESC_SIZE, USED_ELEM_SIZE, VRING_ALIGN

#: struct vring_desc: le64 addr, le32 len, le16 flags, le16 next
DESC = struct.Struct("<QIHH")
#: struct vring_used_elem: le32 id, le32 len
USED_ELEM = struct.Struct("<II")
#: every ring index and flags word (vring_avail / vring_used: le16)
U16 = struct.Struct("<H")

_BARRIER = threading.Lock()


class SplitRing(NamedTuple):
    """Guest addresses of the fields of one split ring with ``num`` entries.

    ``struct vring_avail`` is ``le16 flags, le16 idx, le16 ring[num], le16 used_event`` and
    ``struct vring_used`` is ``le16 flags, le16 idx, vring_used_elem ring[num],
    le16 avail_event`` (virtio 1.x §2.7.6 / §2.7.8; ``vring_used_event`` and
    ``vring_avail_event`` in virtio_ring.h).
    """

    desc: int
    avail: int
    used: int
    num: int

    @classmethod
    def legacy(cls, desc: int, num: int) -> SplitRing:
        """The ring a legacy driver places with one PFN (see :func:`legacy_ring_layout`)."""
        avail, used, _ = legacy_ring_layout(desc, num)
        return cls(desc, avail, used, num)

    def desc_entry(self, index: int) -> int:
        return self.desc + DESC_SIZE * index

    @property
    def avail_flags(self) -> int:
        return self.avail

    @property
    def avail_idx(self) -> int:
        return self.avail + 2

    def avail_slot(self, slot: int) -> int:
        """``avail->ring[slot]``; the caller reduces ``slot`` modulo ``num``."""
        return self.avail + 4 + 2 * slot

    @property
    def used_event(self) -> int:
        return self.avail + 4 + 2 * self.num

    @property
    def used_flags(self) -> int:
        return self.used

    @property
    def used_idx(self) -> int:
        return self.used + 2

    def used_slot(self, slot: int) -> int:
        """``used->ring[slot]``; the caller reduces ``slot`` modulo ``num``."""
        return self.used + 4 + USED_ELEM_SIZE * slot

    @property
    def avail_event(self) -> int:
        return self.used + 4 + USED_ELEM_SIZE * self.num


def legacy_ring_layout(desc_addr: int, num: int) -> tuple[int, int, int]:
    """``(avail, used, total_bytes)`` of a legacy ring at ``desc_addr`` with ``num`` entries.

    Mirrors ``virtio_queue_update_rings`` (hw/virtio/virtio.c): avail follows the descriptor
    table, used starts at the next VIRTIO_PCI_VRING_ALIGN (4096) boundary after
    ``avail.ring[num]``; ``total_bytes`` ends after ``used.avail_event``.
    """
    avail = desc_addr + DESC_SIZE * num
    used = (avail + 4 + 2 * num + VRING_ALIGN - 1) & ~(VRING_ALIGN - 1)
    end = used + 4 + USED_ELEM_SIZE * num + 2
    return avail, used, end - desc_addr


def vring_need_event(event: int, new: int, old: int) -> bool:
    """virtio_ring.h ``vring_need_event``: did ``new`` step past ``event`` since ``old``?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def full_barrier() -> None:
    """A full memory fence between a store to the ring and the next load from it.

    Both sides need one: the device between its used/avail_event stores and the next avail load
    (the ``smp_mb()`` in QEMU's ``virtio_queue_set_notification`` and ``virtio_should_notify``,
    hw/virtio/virtio.c), the driver between its used_event store and the used.idx re-read
    (``virtio_mb`` in Linux's ``virtqueue_poll``). x86 may reorder a store before a later
    load; a lock round trip is a locked instruction, which orders both.
    """
    _BARRIER.acquire()
    _BARRIER.release()
