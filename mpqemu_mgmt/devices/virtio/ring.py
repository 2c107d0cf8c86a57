"""One split virtqueue (virtio 1.x §2.7 / legacy §2.7.x) over the GuestMemory protocol.

The queue keeps only the device-side indices; the rings live in guest RAM and are read and
written through :class:`~mpqemu_mgmt.devices.base.GuestMemory`. Work happens inside a
:class:`RingSession` (``with queue.session(mem) as ring:``) that maps the ring once as a
zero-copy view, pops descriptor chains as lists of zero-copy buffer views, pushes used
elements and decides whether the driver must be interrupted. Every view a session hands out is
released when it closes, so the host may remap guest RAM (SYNC_SYSMEM) between sessions.

Guest mistakes (bad indices, loops, zero-length or out-of-RAM buffers, bad indirect tables)
raise :class:`~mpqemu_mgmt.errors.VirtqueueError` and mark the queue broken, as QEMU's
``virtio_error`` does; they never raise anything else and never touch memory outside guest RAM.

This module must not do IO of its own, know about PCI, or know what the buffers mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from mpqemu_mgmt.closing import ClosedOnExit
from mpqemu_mgmt.devices.base import GuestMemory
from mpqemu_mgmt.devices.virtio.constants import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    VIRTQUEUE_MAX_SIZE,
)
from mpqemu_mgmt.devices.virtio.vring import (
    DESC,
    U16,
    USED_ELEM,
    SplitRing,
    full_barrier,
    legacy_ring_layout,
    vring_need_event,
)
from mpqemu_mgmt.errors import DmaError, VirtqueueError

#: granularity of the cached guest-RAM windows buffers are sliced from
_WINDOW = 1 << 21
_MISSING = object()


class Chain(NamedTuple):
    """One popped descriptor chain: ``head`` index and its buffers, in ring order.

    ``readable`` are the driver-written buffers (QEMU's ``out_sg``), ``writable`` the
    device-written ones (``in_sg``); each is a zero-copy view of guest RAM valid only until the
    session closes. (A NamedTuple: one is built per request on the hot path.)
    """

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    #: total bytes of ``readable`` / ``writable`` (summed once, while walking)
    readable_len: int = 0
    writable_len: int = 0


class _Ring:
    """Accessors for the three ring areas, either over one view or through GuestMemory.

    The 16-bit ring indices and flags are shared with a driver running at the same time on
    another CPU, so they are read and stored with single aligned 16-bit accesses (memoryview
    casts to ``H``), like QEMU's ``lduw``/``stw`` — never byte by byte as ``struct`` does, which
    would let the driver see half of a new ``used.idx``. Legacy virtio is guest-endian: these
    native accesses assume a little-endian host serving x86 guests.
    """

    def __init__(self, mem: GuestMemory, q: SplitQueue) -> None:
        self._mem = mem
        self.layout = lay = q.layout()
        self._desc = lay.desc
        # the fixed fields' addresses, looked up once per session rather than once per access
        self._avail_flags = lay.avail_flags
        self._avail_idx = lay.avail_idx
        self._used_event = lay.used_event
        self._used_idx = lay.used_idx
        self._avail_event = lay.avail_event
        self._view: memoryview | None = None
        self._v16: memoryview | None = None
        self._u32: memoryview | None = None
        if q.legacy:
            _, _, total = legacy_ring_layout(q.desc_addr, q.num)
            try:
                view = mem.view(q.desc_addr, total)
            except DmaError:
                # Part of the ring is outside RAM or straddles two regions: fall back to
                # checked copies, which raise DmaError on the offending access only.
                return
            self._view = view
            self._v16 = view.cast("H")
            # used.flags/idx, then used.ring[] as 32-bit words (see put_used)
            self._u32 = view[lay.used - lay.desc : lay.avail_event - lay.desc].cast("I")

    def close(self) -> None:
        for v in (self._u32, self._v16, self._view):
            if v is not None:
                v.release()
        self._view = self._v16 = self._u32 = None

    def _u16(self, gpa: int) -> int:
        if self._v16 is not None:
            return int(self._v16[(gpa - self._desc) >> 1])
        return int(U16.unpack(self._mem.read(gpa, 2))[0])

    def _put_u16(self, gpa: int, value: int) -> None:
        if self._v16 is not None:
            self._v16[(gpa - self._desc) >> 1] = value & 0xFFFF
        else:
            self._mem.write(gpa, U16.pack(value & 0xFFFF))

    def avail_flags(self) -> int:
        return self._u16(self._avail_flags)

    def avail_idx(self) -> int:
        return self._u16(self._avail_idx)

    def avail_ring(self, slot: int) -> int:
        return self._u16(self.layout.avail_slot(slot))

    def used_event(self) -> int:
        return self._u16(self._used_event)

    def set_avail_event(self, value: int) -> None:
        self._put_u16(self._avail_event, value)

    def v16(self) -> memoryview | None:
        """The ring as 16-bit words (aligned single accesses), or None without a ring view."""
        return self._v16

    def desc_view(self) -> memoryview | None:
        """The descriptor table as a view (it starts the ring), or None without a ring view."""
        return self._view

    def desc(self, index: int) -> tuple[int, int, int, int]:
        # Descriptors are written before they are published and not touched while in flight,
        # so a plain (byte-wise) unpack is safe here.
        gpa = self.layout.desc_entry(index)
        if self._view is not None:
            return DESC.unpack_from(self._view, gpa - self._desc)
        return DESC.unpack(self._mem.read(gpa, DESC_SIZE))

    def used_words(self) -> memoryview | None:
        """used.flags/idx then used.ring[] as 32-bit words, or None without a ring view."""
        return self._u32

    def put_used(self, slot: int, head: int, length: int) -> None:
        if self._u32 is not None:
            # word 0 is used.flags + used.idx; each vring_used_elem is two words after it
            i = 1 + 2 * slot
            self._u32[i] = head
            self._u32[i + 1] = length
        else:
            self._mem.write(self.layout.used_slot(slot), USED_ELEM.pack(head, length))

    def set_used_idx(self, value: int) -> None:
        self._put_u16(self._used_idx, value)


@dataclass
class SplitQueue:
    """Device-side state of one split virtqueue (QEMU ``VirtQueue``, split fields only)."""

    #: queue size; legacy drivers cannot change it (QUEUE_NUM is read-only)
    num: int
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    #: the ring was placed by the legacy PFN register (contiguous, 4 KiB aligned)
    legacy: bool = True
    last_avail_idx: int = 0
    used_idx: int = 0
    inuse: int = 0
    signalled_used: int = 0
    signalled_used_valid: bool = False
    broken: bool = False
    #: negotiated ring features, set by the transport when the driver acknowledges them
    event_idx: bool = False
    notify_on_empty: bool = False
    #: why the queue broke, for status reports
    error: str = field(default="")

    def __post_init__(self) -> None:
        if self.num <= 0 or self.num & (self.num - 1) or self.num > 32768:
            raise ValueError(f"queue size {self.num} is not a power of two in 1..32768")

    @property
    def ready(self) -> bool:
        return self.desc_addr != 0

    def reset(self) -> None:
        """Mirrors ``__virtio_queue_reset`` (hw/virtio/virtio.c)."""
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.last_avail_idx = self.used_idx = self.inuse = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.broken = False
        self.error = ""

    def set_legacy_address(self, desc_addr: int) -> None:
        """Place the rings as the legacy PFN register does (``virtio_queue_set_addr``)."""
        self.desc_addr = desc_addr
        self.avail_addr, self.used_addr, _ = legacy_ring_layout(desc_addr, self.num)
        self.legacy = True
        # A new ring means the last signalled index means nothing any more.
        self.signalled_used_valid = False

    def layout(self) -> SplitRing:
        """Where this queue's ring fields are in guest memory (as last placed)."""
        return SplitRing(self.desc_addr, self.avail_addr, self.used_addr, self.num)

    def waiting(self, mem: GuestMemory) -> int:
        """How many heads the driver has made available (a peek: changes nothing).

        One bounds-checked read of ``avail.idx``; 0 when the queue is not usable or the read
        fails (the pop that follows judges the ring and fails the queue if it must).
        """
        if self.broken or not self.ready:
            return 0
        try:
            avail = int(U16.unpack(mem.read(self.avail_addr + 2, 2))[0])
        except DmaError:
            return 0
        return (avail - self.last_avail_idx) & 0xFFFF

    def session(self, mem: GuestMemory) -> RingSession:
        return RingSession(self, mem)

    def fail(self, reason: str) -> VirtqueueError:
        """Mark the queue broken (``virtio_error``) and return the error to raise."""
        self.broken = True
        self.error = reason
        return VirtqueueError(reason, last_avail_idx=self.last_avail_idx)


class RingSession(ClosedOnExit):
    """One batch of work on a queue: pop chains, push used elements, decide on an interrupt."""

    def __init__(self, queue: SplitQueue, mem: GuestMemory) -> None:
        self.queue = queue
        self._mem = mem
        self._ring = _Ring(mem, queue)
        # fast path for the avail ring entries: 16-bit index of avail.ring[0] in the ring view
        self._v16 = self._ring.v16()
        self._slot0 = (self._ring.layout.avail_slot(0) - queue.desc_addr) >> 1
        self._desc_src = self._ring.desc_view()
        self._held: list[memoryview] = []
        self._windows: dict[int, memoryview | None] = {}
        #: avail.idx as last read (QEMU's shadow_avail_idx): re-read only when caught up
        self._shadow_avail = queue.last_avail_idx
        self._pushed = 0

    def close(self) -> None:
        """Release every view this session handed out, then the windows and the ring view."""
        for v in self._held:
            v.release()
        self._held.clear()
        for w in self._windows.values():
            if w is not None:
                w.release()
        self._windows.clear()
        self._ring.close()

    def _buffer(self, gpa: int, length: int) -> memoryview:
        """A view of guest RAM ``[gpa, gpa + length)``; DmaError if it is not all RAM.

        Buffers are sliced from a cached, GuestMemory-checked 2 MiB window when they fit in one
        (a slice of a checked view cannot leave it), which saves the region lookup per buffer on
        the hot path; anything else asks GuestMemory directly.
        """
        base = gpa & ~(_WINDOW - 1)
        if gpa + length <= base + _WINDOW:
            try:
                win = self._windows[base]
            except KeyError:
                try:
                    win = self._mem.view(base, _WINDOW)
                except DmaError:
                    win = None
                self._windows[base] = win
            if win is not None:
                off = gpa - base
                v = win[off : off + length]
                self._held.append(v)
                return v
        v = self._mem.view(gpa, length)
        self._held.append(v)
        return v

    # -- avail side -------------------------------------------------------------------------

    def _num_heads(self) -> int:
        q = self.queue
        try:
            avail = self._ring.avail_idx()
        except DmaError as exc:
            raise q.fail("avail ring outside guest RAM") from exc
        heads = (avail - q.last_avail_idx) & 0xFFFF
        if heads > q.num:
            # mirrors virtqueue_num_heads: "Guest moved used index from %u to %u"
            raise q.fail(f"guest moved avail index from {q.last_avail_idx} to {avail}")
        self._shadow_avail = avail
        return heads

    def empty(self) -> bool:
        return self._num_heads() == 0

    def pop(self) -> Chain | None:
        """The next available chain, or None when the ring is empty.

        Mirrors ``virtqueue_split_pop`` (hw/virtio/virtio.c), check for check.
        """
        q = self.queue
        if q.broken or not q.desc_addr:  # (q.ready, without the property call)
            return None
        last = q.last_avail_idx
        num = q.num
        # mirrors virtio_queue_empty_rcu: only look at avail.idx again once caught up with it
        if self._shadow_avail == last and self._num_heads() == 0:
            return None
        if q.inuse >= num:
            raise q.fail("virtqueue size exceeded")
        v16 = self._v16
        if v16 is not None:
            head = v16[self._slot0 + last % num]
        else:
            try:
                head = self._ring.avail_ring(last % num)
            except DmaError as exc:
                raise q.fail("avail ring outside guest RAM") from exc
        q.last_avail_idx = (last + 1) & 0xFFFF
        if head >= num:
            raise q.fail(f"guest says index {head} is available")
        # QEMU also moves avail_event on every pop; we leave it behind while the batch runs,
        # which (vring_need_event) spares the driver its kicks, and catch up in
        # enable_notification, which re-checks the ring after publishing it.
        try:
            return self._walk(head)
        except DmaError as exc:
            raise q.fail(f"descriptor table outside guest RAM: {exc.message}") from exc

    def _walk(self, head: int) -> Chain:
        # The hot path of the device: written for CPython speed (locals, no helper calls for
        # the common case), check for check the same as virtqueue_split_pop.
        q = self.queue
        ring = self._ring
        src = self._desc_src  # the descriptor table, or None: read through GuestMemory
        unpack = DESC.unpack_from
        max_entries = q.num
        if src is not None:
            addr, length, flags, nxt = unpack(src, DESC_SIZE * head)
        else:
            addr, length, flags, nxt = ring.desc(head)
        # Like QEMU, honour INDIRECT on the head whether or not the feature was acked.
        if flags & DESC_F_INDIRECT:
            if length == 0 or length % DESC_SIZE:
                raise q.fail("invalid size for indirect buffer table")
            try:
                src = self._buffer(addr, length)
            except DmaError as exc:
                raise q.fail("cannot map indirect buffer") from exc
            max_entries = length // DESC_SIZE
            addr, length, flags, nxt = unpack(src, 0)
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        entries = 0
        windows = self._windows
        held = self._held
        while True:
            if length == 0:
                raise q.fail("zero sized buffers are not allowed")
            if entries >= VIRTQUEUE_MAX_SIZE:
                raise q.fail("too many descriptors in one chain")
            base = addr & ~(_WINDOW - 1)
            win = windows.get(base, _MISSING)
            if win is not None and win is not _MISSING and addr + length <= base + _WINDOW:
                off = addr - base
                view = win[off : off + length]  # type: ignore[index]
                held.append(view)
            else:
                try:
                    view = self._buffer(addr, length)
                except DmaError as exc:
                    raise q.fail(f"bogus descriptor: {length} bytes at {addr:#x}") from exc
            if flags & DESC_F_WRITE:
                writable.append(view)
                wlen += length
            else:
                if writable:
                    raise q.fail("incorrect order for descriptors")
                readable.append(view)
                rlen += length
            entries += 1
            if entries > max_entries:
                raise q.fail("looped descriptor")
            if not flags & DESC_F_NEXT:
                break
            if nxt >= max_entries:
                raise q.fail(f"desc next is {nxt}")
            if src is not None:
                addr, length, flags, nxt = unpack(src, DESC_SIZE * nxt)
            else:
                addr, length, flags, nxt = ring.desc(nxt)
        q.inuse += 1
        return Chain(head, readable, writable, rlen, wlen)

    def _set_avail_event(self, value: int) -> None:
        try:
            self._ring.set_avail_event(value)
        except DmaError as exc:
            raise self.queue.fail("used ring outside guest RAM") from exc

    def enable_notification(self) -> bool:
        """Re-arm kicks and report whether more work arrived meanwhile.

        Mirrors ``virtio_queue_set_notification(vq, 1)`` followed by the
        ``virtio_queue_empty`` re-check in ``virtio_blk_handle_vq``: with EVENT_IDX the
        device asks to be kicked at the next avail index.
        """
        q = self.queue
        if q.broken or not q.ready:
            return False
        if q.event_idx:
            self._set_avail_event(self._ring.avail_idx())
        full_barrier()
        return not self.empty()

    # -- used side --------------------------------------------------------------------------

    def push(self, chain: Chain, written: int) -> None:
        """Return ``chain`` to the driver with ``written`` device-written bytes.

        Mirrors ``virtqueue_fill`` + ``virtqueue_flush`` for one element.
        """
        q = self.queue
        old = q.used_idx
        try:
            self._ring.put_used(old % q.num, chain.head, written & 0xFFFFFFFF)
            new = (old + 1) & 0xFFFF
            self._ring.set_used_idx(new)
        except DmaError as exc:
            raise q.fail("used ring outside guest RAM") from exc
        q.used_idx = new
        q.inuse -= 1
        self._pushed += 1
        # virtqueue_split_flush: "(int16_t)(new - signalled_used) < (uint16_t)(new - old)"
        # means the last signalled index is no longer behind us; forget it.
        since = (new - q.signalled_used) & 0xFFFF
        if since >= 0x8000:
            since -= 0x10000
        if since < ((new - old) & 0xFFFF):
            q.signalled_used_valid = False

    def push_many(self, chains: list[Chain], lens: list[int]) -> None:
        """Return the first ``len(lens)`` of ``chains``, in order, with those written lengths.

        Mirrors ``virtqueue_fill`` for each, then one ``virtqueue_flush(vq, count)``: every used
        element is stored first, ``used.idx`` once at the end (so the driver sees the whole
        batch at once, never a half-written element), and the signalled-index check is made
        once for the whole count, as virtqueue_split_flush does.
        """
        count = len(lens)
        if not count:
            return
        q = self.queue
        old = q.used_idx
        num = q.num
        ring = self._ring
        u32 = ring.used_words()
        try:
            if u32 is not None:
                # word 0 is used.flags + used.idx; each vring_used_elem is two words after it
                for k in range(count):
                    i = 1 + 2 * ((old + k) % num)
                    u32[i] = chains[k].head
                    u32[i + 1] = lens[k] & 0xFFFFFFFF
            else:
                for k in range(count):
                    ring.put_used((old + k) % num, chains[k].head, lens[k] & 0xFFFFFFFF)
            new = (old + count) & 0xFFFF
            ring.set_used_idx(new)
        except DmaError as exc:
            raise q.fail("used ring outside guest RAM") from exc
        q.used_idx = new
        q.inuse -= count
        self._pushed += count
        # virtqueue_split_flush: "(int16_t)(new - signalled_used) < (uint16_t)(new - old)"
        since = (new - q.signalled_used) & 0xFFFF
        if since >= 0x8000:
            since -= 0x10000
        if since < ((new - old) & 0xFFFF):
            q.signalled_used_valid = False

    def should_notify(self) -> bool:
        """Whether to interrupt the driver now; mirrors ``virtio_split_should_notify``."""
        q = self.queue
        if not q.ready:
            return False
        full_barrier()
        try:
            if q.notify_on_empty and q.inuse == 0 and self.empty():
                return True
            if not q.event_idx:
                return not self._ring.avail_flags() & AVAIL_F_NO_INTERRUPT
            valid = q.signalled_used_valid
            old = q.signalled_used
            new = q.used_idx
            q.signalled_used_valid = True
            q.signalled_used = new
            return not valid or vring_need_event(self._ring.used_event(), new, old)
        except DmaError as exc:
            raise q.fail("avail ring outside guest RAM") from exc
