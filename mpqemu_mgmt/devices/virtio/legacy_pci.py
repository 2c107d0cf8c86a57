"""The legacy virtio-pci transport: the I/O BAR register file, feature negotiation, status, ISR.

What it is: the register block of virtio 0.9.5 / "legacy interface" virtio-pci with no MSI-X
(QEMU ``-device virtio-*-pci,vectors=0``), as QEMU 7.2 implements it in hw/virtio/virtio-pci.c
``virtio_ioport_read``/``virtio_ioport_write``/``virtio_pci_config_read``/``_write``:

======  =====  ==================================================
offset  width  register
======  =====  ==================================================
0x00    32     host (device) features, read-only
0x04    32     guest (driver) features
0x08    32     queue PFN (ring address >> 12); writing 0 resets the device
0x0c    16     queue size, read-only
0x0e    16     queue select
0x10    16     queue notify (a kick)
0x12    8      device status; writing 0 resets the device
0x13    8      ISR: bit 0 used-ring update, bit 1 config change; a read clears it and lowers INTx
0x14    …      device-specific config
======  =====  ==================================================

A kick (QUEUE_NOTIFY) serves up to ``INLINE_BYTES`` (256 KiB) of requests inside the BAR write
— a single small request then completes with no second wake-up — and hands the rest to the
``defer`` hook the device passes in: the remote runs it from its timer queue right after the BAR
write has been answered, so a big batch does not hold the proxy's vCPU for its whole I/O (QEMU
gets that from ioeventfd + AIO). Kicks that arrive meanwhile coalesce. Without a hook (tests)
the whole kick is served inside the write.

It owns the :class:`~.ring.SplitQueue` objects, drives the INTx pin through
:class:`~mpqemu_mgmt.pci.IntxPin` and hands popped chains to a :class:`VirtioDeviceLogic`
(e.g. the virtio-blk request handler). A guest that breaks the ring contract gets
``NEEDS_RESET`` in the status byte and a config-change interrupt, and nothing more is processed
until it resets the device.

What it must not do: IO, or interpret buffers; it never raises on guest input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from mpqemu_mgmt.devices.base import GuestMemory
from mpqemu_mgmt.devices.virtio.constants import (
    ISR_CONFIG,
    ISR_QUEUE,
    QUEUE_ADDR_SHIFT,
    VIRTIO_QUEUE_MAX,
    Feature,
    LegacyReg,
    Status,
)
from mpqemu_mgmt.devices.virtio.ring import Chain, SplitQueue
from mpqemu_mgmt.errors import VirtqueueError
from mpqemu_mgmt.pci import ConfigSpace, IntxPin, regs

#: Transport features every legacy device here offers (QEMU's virtio-pci defaults:
#: indirect_desc, event_idx, notify_on_empty, any_layout all "true" in ``info qtree``), plus
#: VIRTIO_F_BAD_FEATURE, which virtio_pci_device_plugged offers on the legacy interface so that a
#: driver acking every bit can be recognised.
TRANSPORT_FEATURES = (
    1 << Feature.NOTIFY_ON_EMPTY
    | 1 << Feature.ANY_LAYOUT
    | 1 << Feature.RING_INDIRECT_DESC
    | 1 << Feature.RING_EVENT_IDX
    | 1 << Feature.BAD_FEATURE
)


#: chains handed to the device logic at once (so it can merge neighbouring requests)
_BATCH = 64
#: bytes of requests served inside the kick's BAR write before the rest is deferred
INLINE_BYTES = 256 << 10


class VirtioDeviceLogic(Protocol):
    """The device-type half of a virtio device (what QEMU's ``VirtioDeviceClass`` provides)."""

    #: device feature bits (low 32; the legacy interface cannot show more)
    features: int
    #: bytes of device-specific config behind the common registers
    config_len: int

    def config_read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes of device config at ``offset`` (already bounds-checked)."""
        ...

    def config_write(self, offset: int, size: int, value: int) -> None: ...

    def handle_batch(self, queue: int, chains: list[Chain]) -> tuple[list[int], VirtqueueError | None]:
        """Serve popped chains in order; return the used lengths of the ones served.

        If a chain is malformed, serve those before it and return the error with their lengths
        (the device then needs a reset).
        """
        ...

    def set_features(self, features: int) -> None: ...

    def reset(self) -> None: ...


class LegacyVirtioPci:
    """Register file + queues + ISR of one legacy virtio-pci function."""

    def __init__(
        self,
        logic: VirtioDeviceLogic,
        config: ConfigSpace,
        intx: IntxPin,
        queue_sizes: tuple[int, ...],
        *,
        memory: Callable[[], GuestMemory | None],
        on_error: Callable[[str], None] | None = None,
        defer: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.logic = logic
        self._config = config
        self._intx = intx
        self._memory = memory
        self._on_error = on_error
        # Where kicks are served: at once (None), or after the host has answered the BAR write
        # (the remote's timer queue), so the proxy's vCPU is not held for the I/O — what
        # QEMU's ioeventfd + AIO achieve for its own virtio-blk.
        self._defer = defer
        self._kick_pending = [False] * len(queue_sizes)
        self.queues = [SplitQueue(n) for n in queue_sizes]
        self.host_features = (logic.features | TRANSPORT_FEATURES) & 0xFFFFFFFF
        self.guest_features = 0
        self.status = 0
        self.queue_sel = 0
        self.isr = 0
        self.error = ""
        self.kicks = 0
        self.requests = 0

    @property
    def region_size(self) -> int:
        """I/O BAR size: pow2ceil(0x14 + config_len), as ``virtio_pci_device_plugged``."""
        need = LegacyReg.CONFIG + self.logic.config_len
        size = 4
        while size < need:
            size <<= 1
        return size

    @property
    def broken(self) -> bool:
        return bool(self.status & Status.NEEDS_RESET)

    # -- reset ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Mirrors ``virtio_reset``: status, features, selector, ISR and every queue to zero."""
        self.logic.reset()
        self.status = 0
        self.guest_features = 0
        self.queue_sel = 0
        self.isr = 0
        self.error = ""
        for q in self.queues:
            q.reset()
        self._intx.set_level(False)

    # -- register access --------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """A guest read of ``size`` bytes at ``offset`` in the I/O BAR."""
        if size == 8:
            # Only TCG issues 8-byte port accesses; QEMU's memory core splits them (impl max 4).
            return self.read(offset, 4) | self.read(offset + 4, 4) << 32
        mask = (1 << (8 * size)) - 1
        if offset >= LegacyReg.CONFIG:
            return self._config_read(offset - LegacyReg.CONFIG, size) & mask
        return self._reg_read(offset) & mask

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write of ``size`` bytes at ``offset`` in the I/O BAR."""
        if size == 8:
            self.write(offset, 4, value & 0xFFFFFFFF)
            self.write(offset + 4, 4, value >> 32)
            return
        value &= (1 << (8 * size)) - 1
        if offset >= LegacyReg.CONFIG:
            self._config_write(offset - LegacyReg.CONFIG, size, value)
        else:
            self._reg_write(offset, value)

    def _queue(self) -> SplitQueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _reg_read(self, offset: int) -> int:
        # mirrors virtio_ioport_read: the value of the register starting at ``offset``, and
        # 0xFFFFFFFF for an offset where no register starts; the access size only truncates.
        q = self._queue()
        if offset == LegacyReg.HOST_FEATURES:
            return self.host_features
        if offset == LegacyReg.GUEST_FEATURES:
            return self.guest_features
        if offset == LegacyReg.QUEUE_PFN:
            return (q.desc_addr >> QUEUE_ADDR_SHIFT) if q is not None else 0
        if offset == LegacyReg.QUEUE_NUM:
            return q.num if q is not None else 0
        if offset == LegacyReg.QUEUE_SEL:
            return self.queue_sel
        if offset == LegacyReg.STATUS:
            return self.status
        if offset == LegacyReg.ISR:
            isr, self.isr = self.isr, 0
            self._intx.set_level(False)
            return isr
        return 0xFFFFFFFF

    def _reg_write(self, offset: int, value: int) -> None:
        # mirrors virtio_ioport_write
        if offset == LegacyReg.GUEST_FEATURES:
            self._set_features(value)
        elif offset == LegacyReg.QUEUE_PFN:
            if value == 0:
                self.reset()
            else:
                q = self._queue()
                if q is not None:
                    q.set_legacy_address(value << QUEUE_ADDR_SHIFT)
        elif offset == LegacyReg.QUEUE_SEL:
            if value < VIRTIO_QUEUE_MAX:
                self.queue_sel = value
        elif offset == LegacyReg.QUEUE_NOTIFY:
            if value < len(self.queues):
                self.kick(value)
        elif offset == LegacyReg.STATUS:
            self._set_status(value & 0xFF)
        # Writes to read-only or absent registers are ignored (QEMU logs a guest error).

    def _set_features(self, value: int) -> None:
        # mirrors virtio_set_features: refused once FEATURES_OK is set; unknown bits dropped.
        if self.status & Status.FEATURES_OK:
            return
        if value & (1 << Feature.BAD_FEATURE):
            # A driver that acks BAD_FEATURE is broken; QEMU falls back to the device's
            # "bad features" (none for virtio-blk).
            value = 0
        acked = value & self.host_features & ~(1 << Feature.BAD_FEATURE)
        self.guest_features = acked
        for q in self.queues:
            q.event_idx = bool(acked & (1 << Feature.RING_EVENT_IDX))
            q.notify_on_empty = bool(acked & (1 << Feature.NOTIFY_ON_EMPTY))
        self.logic.set_features(acked)

    def _set_status(self, value: int) -> None:
        # NEEDS_RESET is the device's bit: keep it until the driver resets the device.
        self.status = int(value | (self.status & Status.NEEDS_RESET))
        if value == 0:
            self.reset()
            return
        if value & Status.DRIVER_OK and not self._config.bus_master:
            # mirrors the "Linux before 2.6.34 drives the device without enabling the PCI
            # device bus master bit" work-around in virtio_ioport_write.
            self._config.set_u16(regs.COMMAND, self._config.command | regs.COMMAND_MASTER)

    def _config_read(self, offset: int, size: int) -> int:
        # mirrors virtio_config_readb/w/l: all-ones past the end of the device config.
        if size not in (1, 2, 4) or offset + size > self.logic.config_len:
            return 0xFFFFFFFF
        return self.logic.config_read(offset, size)

    def _config_write(self, offset: int, size: int, value: int) -> None:
        if size in (1, 2, 4) and offset + size <= self.logic.config_len:
            self.logic.config_write(offset, size, value)

    # -- the data path ----------------------------------------------------------------------

    def kick(self, index: int) -> None:
        """A QUEUE_NOTIFY write: serve a little now, the rest once the write is answered.

        With one request waiting, up to :data:`INLINE_BYTES` of it is served inside the BAR
        write (a QD1 request then completes without another wake-up); with more, or whatever
        is left, the work goes to the ``defer`` hook,
        so a large batch does not hold the proxy's vCPU for its whole I/O. Kicks that arrive
        while a continuation is pending coalesce, as eventfd kicks do in QEMU.
        """
        if self._defer is None:
            self.notify(index)
            return
        if self._kick_pending[index]:
            return

        def run() -> None:
            self._kick_pending[index] = False
            self.notify(index)

        # More than one request queued (a batch): answer the write first and serve them all
        # afterwards in one session, as QEMU's ioeventfd does for every kick; the used ring
        # and the interrupt are then updated once and neighbouring requests merge into one
        # preadv/pwritev. A lone request is served inline (no extra wake-up for QD1).
        mem = self._memory()
        waiting = (
            self.queues[index].waiting(mem)
            if mem is not None and self._config.bus_master and not self.broken
            else 0
        )
        if waiting > 1 or self.notify(index, budget=INLINE_BYTES):
            self._kick_pending[index] = True
            self._defer(run)

    def notify(self, index: int, budget: int | None = None) -> bool:
        """Serve available chains on queue ``index``, then maybe interrupt.

        Mirrors ``virtio_queue_notify`` → ``virtio_blk_handle_vq``: pop until empty, re-arm
        notifications, re-check, and interrupt once if the suppression rules allow it. With a
        ``budget`` (bytes of buffers), stop once it is spent; returns True if chains remain.
        """
        q = self.queues[index]
        mem = self._memory()
        if not q.ready or self.broken or mem is None:
            return False
        if not self._config.bus_master:
            # Bus mastering off: the function may not touch guest memory at all.
            return False
        self.kicks += 1
        pushed = 0
        more = False
        left = budget if budget is not None else -1
        try:
            with q.session(mem) as ring:
                try:
                    while True:
                        batch: list[Chain] = []
                        pop_error: VirtqueueError | None = None
                        try:
                            while len(batch) < _BATCH and left != 0 and (chain := ring.pop()) is not None:
                                batch.append(chain)
                                if budget is not None:
                                    left = max(0, left - chain.readable_len - chain.writable_len)
                        except VirtqueueError as exc:
                            pop_error = exc
                        if batch:
                            lens, error = self.logic.handle_batch(index, batch)
                            ring.push_many(batch, lens)  # one used.idx store per batch
                            pushed += len(lens)
                            if error is not None:
                                raise error
                        if pop_error is not None:
                            raise pop_error
                        if left == 0:
                            # Budget spent. If the ring is empty, nothing will be deferred, so
                            # re-arm kicks here (and re-check): pop leaves avail_event behind,
                            # and with EVENT_IDX a driver whose avail_event lags never kicks
                            # again — the guest hangs (virtio_blk_handle_vq always ends with
                            # virtio_queue_set_notification(vq, 1) + virtio_queue_empty).
                            more = not ring.empty() or ring.enable_notification()
                            break
                        if len(batch) < _BATCH and not ring.enable_notification():
                            break
                finally:
                    self.requests += pushed
                    # When the rest of the batch is deferred, its run interrupts once for all
                    # of it (should_notify covers every push since the last signal): one
                    # interrupt, and one ISR read by the guest, per kick instead of two.
                    if pushed and not q.broken and not more and ring.should_notify():
                        self._raise(ISR_QUEUE)
        except VirtqueueError as exc:
            self._needs_reset(exc)
            return False
        return more

    def _needs_reset(self, exc: VirtqueueError) -> None:
        """mirrors ``virtio_error``: mark the device broken and tell the driver."""
        self.error = exc.message
        self.status = int(self.status | Status.NEEDS_RESET)
        if self._on_error is not None:
            self._on_error(f"virtio: {exc.message}; device needs reset")
        self._raise(ISR_CONFIG)

    def _raise(self, bits: int) -> None:
        # mirrors virtio_set_isr + virtio_pci_notify: INTx follows ISR bit 0 for the queue
        # interrupt; a config change also asserts it (virtio_notify_config).
        self.isr |= bits
        self._intx.set_level(True)

    def status_report(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "host_features": self.host_features,
            "guest_features": self.guest_features,
            "isr": self.isr,
            "kicks": self.kicks,
            "requests": self.requests,
            "error": self.error,
            "queues": [
                {
                    "num": q.num,
                    "desc": q.desc_addr,
                    "last_avail_idx": q.last_avail_idx,
                    "used_idx": q.used_idx,
                    "broken": q.broken,
                }
                for q in self.queues
            ],
        }
