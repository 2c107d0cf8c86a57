"""A legacy virtio-blk *driver* in Python, for tests and benchmarks only.

It plays the guest: it owns a flat piece of guest RAM, lays out a legacy split ring there,
negotiates features, queues requests (direct or indirect descriptor chains), kicks, waits for the
interrupt and reaps the used ring. The register accesses and the interrupt go through a
:class:`LegacyBus`, so the very same driver runs

* in-process against :class:`~mpqemu_mgmt.devices.virtio_blk.VirtioBlk` (:class:`DirectBus`,
  with :class:`FlatGuestMemory` as the device's GuestMemory over the same buffer),
* over the mpqemu socket through :class:`~mpqemu_mgmt.testing.proxysim.ProxySim`
  (:class:`ProxySimBus`: I/O BAR accesses at absolute ports, completions from the irqfd
  eventfd, guest RAM a shared memfd) against our remote or a stock ``x-remote`` virtio-blk-pci.

It also exposes raw ring access (:meth:`VirtioBlkDriver.put_desc`, :meth:`~VirtioBlkDriver.publish`)
for hostile-guest tests. It must not be used by production code.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mpqemu_mgmt.devices.virtio.constants import (
    AVAIL_F_NO_INTERRUPT,
    BLK_ID_BYTES,
    BLK_T_FLUSH,
    BLK_T_GET_ID,
    BLK_T_IN,
    BLK_T_OUT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    QUEUE_ADDR_SHIFT,
    SECTOR_SIZE,
    USED_F_NO_NOTIFY,
    Feature,
    LegacyReg,
    Status,
)
from mpqemu_mgmt.devices.virtio.vring import (
    DESC,
    USED_ELEM,
    SplitRing,
    full_barrier,
    legacy_ring_layout,
    vring_need_event,
)
from mpqemu_mgmt.errors import DeviceError, DmaError, ProcessFailed

_OUTHDR = struct.Struct("<IIQ")


# -- guest RAM ----------------------------------------------------------------------------------


class FlatGuestMemory:
    """GuestMemory over one flat buffer at ``base`` (what the device sees in in-process tests)."""

    def __init__(self, buf: bytearray | mmap.mmap, base: int = 0) -> None:
        self._buf = memoryview(buf)
        self.base = base
        self.size = len(buf)
        self.accesses = 0

    def _off(self, gpa: int, length: int) -> int:
        self.accesses += 1
        off = gpa - self.base
        if length < 0 or off < 0 or off + length > self.size:
            raise DmaError(f"DMA {length} bytes at {gpa:#x} outside guest RAM", gpa=gpa, length=length)
        return off

    def read(self, gpa: int, length: int) -> bytes:
        off = self._off(gpa, length)
        return bytes(self._buf[off : off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        off = self._off(gpa, len(data))
        self._buf[off : off + len(data)] = data

    def view(self, gpa: int, length: int) -> memoryview:
        off = self._off(gpa, length)
        return self._buf[off : off + length]

    def release(self) -> None:
        self._buf.release()


class GuestRam:
    """The driver's side of guest RAM: a buffer at ``base`` plus a bump allocator."""

    def __init__(self, buf: bytearray | mmap.mmap, base: int = 0) -> None:
        self.buf = buf
        self.mv = memoryview(buf)
        # Ring indices are shared with a device on another CPU: 16-bit aligned accesses only.
        self.mv16 = self.mv[: len(buf) & ~1].cast("H")
        self.base = base
        self.size = len(buf)
        # Page 0 stays unused: a ring at guest address 0 would be PFN 0, which means "reset".
        self._next = 4096
        self._mark = 4096

    def alloc(self, length: int, align: int = 16) -> int:
        start = (self._next + align - 1) & ~(align - 1)
        if start + length > self.size:
            raise DeviceError(f"driver RAM exhausted ({length} bytes wanted)")
        self._next = start + length
        return self.base + start

    def mark(self) -> None:
        """Everything allocated so far is permanent (rings); :meth:`rewind` frees the rest."""
        self._mark = self._next

    def rewind(self) -> None:
        self._next = self._mark

    def reset(self) -> None:
        """Forget every allocation, rings included (a driver re-initialising the device)."""
        self._next = self._mark = 4096

    def read(self, gpa: int, length: int) -> bytes:
        off = gpa - self.base
        return bytes(self.mv[off : off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        off = gpa - self.base
        self.mv[off : off + len(data)] = data

    def view(self, gpa: int, length: int) -> memoryview:
        off = gpa - self.base
        return self.mv[off : off + length]

    def u16(self, gpa: int) -> int:
        return int(self.mv16[(gpa - self.base) >> 1])

    def put_u16(self, gpa: int, value: int) -> None:
        self.mv16[(gpa - self.base) >> 1] = value & 0xFFFF

    def release(self) -> None:
        self.mv16.release()
        self.mv.release()


# -- register bus ---------------------------------------------------------------------------------


class LegacyBus(Protocol):
    """How the driver reaches the legacy I/O BAR and learns about interrupts."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...

    def wait_interrupt(self, timeout: float) -> bool:
        """True once an interrupt arrived since the last call (waits up to ``timeout``)."""
        ...


class IrqRecorder:
    """An IrqLine that remembers rising edges (the in-process stand-in for the irqfd)."""

    def __init__(self) -> None:
        self.level = False
        self.edges = 0
        self._pending = False

    def set_level(self, level: bool) -> None:
        if level and not self.level:
            self.edges += 1
            self._pending = True
        self.level = level

    def take(self) -> bool:
        pending, self._pending = self._pending, False
        return pending


class _BarDevice(Protocol):
    def bar_read(self, bar: int, offset: int, size: int) -> int: ...

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None: ...


class DirectBus:
    """Registers by direct calls into an in-process device; the device runs inside the kick."""

    def __init__(self, device: _BarDevice, irq: IrqRecorder) -> None:
        self.device = device
        self.irq = irq

    def read(self, offset: int, size: int) -> int:
        return self.device.bar_read(0, offset, size) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.device.bar_write(0, offset, size, value)

    def wait_interrupt(self, timeout: float) -> bool:
        return self.irq.take()


class _Sim(Protocol):
    def bar_read_at(self, index: int, offset: int, size: int) -> int: ...

    def bar_write_at(self, index: int, offset: int, value: int, size: int) -> object: ...


class ProxySimBus:
    """Registers over mpqemu BAR messages; interrupts from the irqfd eventfd (INTx via irqfd)."""

    def __init__(self, sim: _Sim, irqfd: int, bar: int = 0) -> None:
        self.sim = sim
        self.irqfd = irqfd
        self.bar = bar

    def read(self, offset: int, size: int) -> int:
        return self.sim.bar_read_at(self.bar, offset, size) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.sim.bar_write_at(self.bar, offset, value, size)

    def wait_interrupt(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.irqfd], [], [], timeout)
        if not ready:
            return False
        try:
            os.read(self.irqfd, 8)
        except BlockingIOError:
            return False
        return True


# -- requests -------------------------------------------------------------------------------------


@dataclass
class Request:
    """One virtio-blk request as the driver lays it out."""

    type: int
    sector: int = 0
    #: device-readable payload (OUT)
    data: bytes | memoryview = b""
    #: device-writable payload bytes (IN, GET_ID)
    read_len: int = 0
    #: split the payload into buffers of at most this many bytes (0: one buffer)
    seg_size: int = 0
    indirect: bool = False
    # filled in by the driver
    head: int = -1
    status_gpa: int = 0
    data_gpas: list[tuple[int, int]] = field(default_factory=list)
    descs: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    status: int
    used_len: int
    data: bytes


@dataclass(frozen=True)
class DeviceInfo:
    host_features: int
    guest_features: int
    queue_size: int
    capacity: int
    size_max: int
    seg_max: int
    blk_size: int


class VirtioBlkDriver:
    """A minimal legacy virtio-blk driver (Linux virtio_pci_legacy + virtio_blk, simplified)."""

    def __init__(
        self, bus: LegacyBus, ram: GuestRam, *, timeout: float = 10.0, zero_fill: bool = True
    ) -> None:
        self.bus = bus
        self.ram = ram
        self.timeout = timeout
        #: clear device-writable buffers before queueing (so two devices compare byte for byte)
        self.zero_fill = zero_fill
        #: copy read data out of guest RAM into each Completion (benchmarks turn it off)
        self.collect = True
        self.num = 0
        self.event_idx = False
        self.indirect_ok = False
        self._free: list[int] = []
        self._avail_idx = 0
        self._kicked_idx = 0
        self._last_used = 0
        self._inflight: dict[int, Request] = {}
        self.kicks = 0
        self.interrupts = 0
        #: waits that ended without an interrupt (a lost or suppressed one would show here)
        self.idle_waits = 0
        self.info: DeviceInfo | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def init(self, want: int | None = None) -> DeviceInfo:
        """Reset, negotiate ``want`` (default: everything offered), place queue 0, DRIVER_OK."""
        b = self.bus
        b.write(LegacyReg.STATUS, 1, 0)
        b.write(LegacyReg.STATUS, 1, Status.ACKNOWLEDGE)
        b.write(LegacyReg.STATUS, 1, Status.ACKNOWLEDGE | Status.DRIVER)
        host = b.read(LegacyReg.HOST_FEATURES, 4)
        # Never ack VIRTIO_F_BAD_FEATURE: legacy QEMU offers it to catch drivers that ack all.
        acked = (host if want is None else host & want) & ~(1 << Feature.BAD_FEATURE)
        b.write(LegacyReg.GUEST_FEATURES, 4, acked)
        self.event_idx = bool(acked & (1 << Feature.RING_EVENT_IDX))
        self.indirect_ok = bool(acked & (1 << Feature.RING_INDIRECT_DESC))
        b.write(LegacyReg.QUEUE_SEL, 2, 0)
        self.num = b.read(LegacyReg.QUEUE_NUM, 2)
        if self.num == 0:
            raise DeviceError("queue 0 has size 0")
        _, _, total = legacy_ring_layout(0, self.num)
        self.ram.reset()
        self.desc = self.ram.alloc(total, align=4096)
        self.ram.write(self.desc, bytes(total))
        self.ring = SplitRing.legacy(self.desc, self.num)
        self.avail, self.used = self.ring.avail, self.ring.used
        self.ram.mark()
        b.write(LegacyReg.QUEUE_PFN, 4, self.desc >> QUEUE_ADDR_SHIFT)
        b.write(LegacyReg.STATUS, 1, Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)
        self._free = list(range(self.num))
        self._avail_idx = self._kicked_idx = self._last_used = 0
        self._inflight.clear()
        cfg = LegacyReg.CONFIG
        capacity = b.read(cfg + 0, 4) | b.read(cfg + 4, 4) << 32
        self.info = DeviceInfo(
            host_features=host,
            guest_features=acked,
            queue_size=self.num,
            capacity=capacity,
            size_max=b.read(cfg + 8, 4),
            seg_max=b.read(cfg + 12, 4),
            blk_size=b.read(cfg + 20, 4),
        )
        return self.info

    def status(self) -> int:
        return self.bus.read(LegacyReg.STATUS, 1)

    def config_bytes(self, length: int) -> bytes:
        return bytes(self.bus.read(LegacyReg.CONFIG + i, 1) for i in range(length))

    # -- raw ring access (hostile tests) --------------------------------------------------------

    def put_desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.ram.write(self.ring.desc_entry(index), DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        """Put ``head`` in the next avail slot and advance avail.idx."""
        slot = self._avail_idx % self.num
        self.ram.put_u16(self.ring.avail_slot(slot), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.ram.put_u16(self.ring.avail_idx, self._avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self._avail_idx = value & 0xFFFF
        self.ram.put_u16(self.ring.avail_idx, self._avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.ram.put_u16(self.ring.avail_flags, flags)

    def used_idx(self) -> int:
        return self.ram.u16(self.ring.used_idx)

    def used_elem(self, slot: int) -> tuple[int, int]:
        gpa = self.ring.used_slot(slot % self.num)
        id_, ln = USED_ELEM.unpack(self.ram.read(gpa, USED_ELEM.size))
        return int(id_), int(ln)

    def avail_event(self) -> int:
        return self.ram.u16(self.ring.avail_event)

    def set_used_event(self, value: int) -> None:
        self.ram.put_u16(self.ring.used_event, value)

    # -- request queueing -----------------------------------------------------------------------

    def _segments(self, gpa: int, length: int, seg: int) -> list[tuple[int, int]]:
        if seg <= 0 or seg >= length:
            return [(gpa, length)] if length else []
        return [(gpa + o, min(seg, length - o)) for o in range(0, length, seg)]

    def submit(self, req: Request) -> None:
        """Lay ``req`` out in RAM and in the descriptor table and make it available (no kick)."""
        ram = self.ram
        hdr = ram.alloc(16)
        ram.write(hdr, _OUTHDR.pack(req.type, 0, req.sector))
        bufs: list[tuple[int, int, int]] = [(hdr, 16, 0)]
        if req.data:
            gpa = ram.alloc(len(req.data), align=512)
            ram.write(gpa, req.data)
            bufs += [(a, n, 0) for a, n in self._segments(gpa, len(req.data), req.seg_size)]
        if req.read_len:
            gpa = ram.alloc(req.read_len, align=512)
            if self.zero_fill:
                ram.write(gpa, bytes(req.read_len))
            req.data_gpas = self._segments(gpa, req.read_len, req.seg_size)
            bufs += [(a, n, DESC_F_WRITE) for a, n in req.data_gpas]
        req.status_gpa = ram.alloc(1, align=1)
        ram.write(req.status_gpa, b"\xff")
        bufs.append((req.status_gpa, 1, DESC_F_WRITE))
        if req.indirect:
            table = ram.alloc(DESC_SIZE * len(bufs))
            for i, (a, n, fl) in enumerate(bufs):
                more = DESC_F_NEXT if i + 1 < len(bufs) else 0
                ram.write(table + DESC_SIZE * i, DESC.pack(a, n, fl | more, i + 1 if more else 0))
            bufs = [(table, DESC_SIZE * len(bufs), DESC_F_INDIRECT)]
        if len(bufs) > len(self._free):
            raise DeviceError("descriptor table full")
        idx = [self._free.pop() for _ in bufs]
        for i, (a, n, fl) in enumerate(bufs):
            more = i + 1 < len(bufs)
            self.put_desc(idx[i], a, n, fl | (DESC_F_NEXT if more else 0), idx[i + 1] if more else 0)
        req.head = idx[0]
        req.descs = idx
        self._inflight[req.head] = req
        self.publish(req.head)

    def kick(self, force: bool = False) -> bool:
        """Notify the device if the suppression rules ask for it (Linux virtqueue_kick_prepare)."""
        new, old = self._avail_idx, self._kicked_idx
        self._kicked_idx = new
        if not force:
            if self.event_idx:
                if not vring_need_event(self.avail_event(), new, old):
                    return False
            elif self.ram.u16(self.ring.used_flags) & USED_F_NO_NOTIFY:
                return False
        self.kicks += 1
        self.bus.write(LegacyReg.QUEUE_NOTIFY, 2, 0)
        return True

    def reap(self) -> list[tuple[Request, Completion]]:
        """Take every used element the device published since the last call.

        Like Linux's ``virtqueue_enable_cb`` + ``virtqueue_poll``: after asking for the next
        interrupt (used_event) it looks at used.idx once more, so a completion that landed
        just before used_event moved is reaped now instead of waiting for an interrupt the
        device rightly suppressed.
        """
        done: list[tuple[Request, Completion]] = []
        while True:
            used = self.used_idx()
            if used == self._last_used:
                if not self.event_idx:
                    return done
                self.set_used_event(self._last_used)
                full_barrier()
                if self.used_idx() == self._last_used:
                    return done
                continue
            while self._last_used != used:
                head, length = self.used_elem(self._last_used)
                self._last_used = (self._last_used + 1) & 0xFFFF
                req = self._inflight.pop(head, None)
                if req is None:
                    raise DeviceError(f"device returned descriptor {head}, which is not in flight")
                self._free.extend(req.descs)
                status = self.ram.read(req.status_gpa, 1)[0]
                data = b"".join(self.ram.read(a, n) for a, n in req.data_gpas) if self.collect else b""
                done.append((req, Completion(status, length, data)))

    def wait(self, count: int) -> list[tuple[Request, Completion]]:
        """Wait until ``count`` requests completed, in used order.

        Completions are learnt from the interrupt, as a Linux guest does (vp_interrupt): wait
        for the irqfd, read (and so clear) the ISR, then reap. The used ring is never polled
        right after a kick, so a device that completes inside the kick gets no advantage from
        it. A wait that times out without an interrupt reaps anyway and is counted in
        :attr:`idle_waits` (a lost interrupt would show there).
        """
        out: list[tuple[Request, Completion]] = []
        deadline = time.monotonic() + self.timeout
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcessFailed(f"virtio-blk: {len(out)} of {count} requests completed in time")
            if self.bus.wait_interrupt(min(left, 0.5)):
                self.interrupts += 1
                # ISR before reaping: a completion landing after the reap raises the line again.
                self.bus.read(LegacyReg.ISR, 1)
            else:
                self.idle_waits += 1
            out += self.reap()
        if not self._inflight:
            self.ram.rewind()
        return out

    def run(self, requests: Sequence[Request]) -> list[Completion]:
        """Submit a batch, kick once, wait for all; completions in submission order."""
        for r in requests:
            self.submit(r)
        self.kick()
        done = dict((id(r), c) for r, c in self.wait(len(requests)))
        return [done[id(r)] for r in requests]

    # -- conveniences -----------------------------------------------------------------------------

    def read(self, sector: int, length: int, **kw: int | bool) -> Completion:
        return self.run([Request(BLK_T_IN, sector, read_len=length, **kw)])[0]  # type: ignore[arg-type]

    def write(self, sector: int, data: bytes, **kw: int | bool) -> Completion:
        return self.run([Request(BLK_T_OUT, sector, data=data, **kw)])[0]  # type: ignore[arg-type]

    def flush(self) -> Completion:
        return self.run([Request(BLK_T_FLUSH)])[0]

    def get_id(self, length: int = BLK_ID_BYTES) -> Completion:
        return self.run([Request(BLK_T_GET_ID, read_len=length)])[0]

    def interrupts_off(self) -> None:
        self.set_avail_flags(AVAIL_F_NO_INTERRUPT)


__all__ = [
    "SECTOR_SIZE",
    "Completion",
    "DeviceInfo",
    "DirectBus",
    "FlatGuestMemory",
    "GuestRam",
    "IrqRecorder",
    "LegacyBus",
    "ProxySimBus",
    "Request",
    "VirtioBlkDriver",
]
