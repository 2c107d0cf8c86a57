"""virtio-blk model + legacy virtio-pci transport, driven in-process by the Python virtio driver.

Pure: the backing store is an in-memory BlockBackend and guest RAM a bytearray; the same driver
runs over mpqemu in tests/integration/test_virtio_blk_*.py.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpqemu_mgmt.devices import catalogue
from mpqemu_mgmt.devices.base import DeviceHost
from mpqemu_mgmt.devices.virtio.constants import (
    BLK_S_IOERR,
    BLK_S_OK,
    BLK_S_UNSUPP,
    BLK_T_FLUSH,
    BLK_T_IN,
    BLK_T_OUT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    ISR_CONFIG,
    BlkFeature,
    Feature,
    LegacyReg,
    Status,
)
from mpqemu_mgmt.devices.virtio_blk import VirtioBlk
from mpqemu_mgmt.errors import UsageError
from mpqemu_mgmt.pci import regs
from mpqemu_mgmt.testing.virtio_driver import (
    DirectBus,
    FlatGuestMemory,
    GuestRam,
    IrqRecorder,
    Request,
    VirtioBlkDriver,
)


def _examples(default: int) -> int:
    """Suite slice by default; ``VIRTIO_FUZZ_EXAMPLES=N`` runs the long campaign."""
    return int(os.environ.get("VIRTIO_FUZZ_EXAMPLES", default))


DISK = 1 << 20
SECTORS = DISK // 512


class MemBackend:
    """An in-memory disk with the BlockBackend protocol (tests only)."""

    def __init__(self, size: int = DISK, readonly: bool = False, fail: bool = False) -> None:
        self.data = bytearray(size)
        self._ro = readonly
        self.fail = fail
        self.flushes = 0
        self.calls: list[tuple[str, int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def readonly(self) -> bool:
        return self._ro

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.calls.append(("r", offset, sum(b.nbytes for b in buffers)))
        if self.fail:
            raise OSError(5, "EIO")
        for b in buffers:
            b[:] = self.data[offset : offset + b.nbytes]
            offset += b.nbytes

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.calls.append(("w", offset, sum(b.nbytes for b in buffers)))
        if self.fail:
            raise OSError(5, "EIO")
        for b in buffers:
            self.data[offset : offset + b.nbytes] = b
            offset += b.nbytes

    def flush(self) -> None:
        if self.fail:
            raise OSError(5, "EIO")
        self.flushes += 1


class ManualTimers:
    """A timer queue the test runs by hand (the remote's TimerQueue runs them after each reply)."""

    def __init__(self) -> None:
        self.due: list[Callable[[], None]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        self.due.append(callback)
        return len(self.due)

    def cancel(self, handle: object) -> None:
        raise AssertionError("not used")

    def run(self) -> int:
        ran, self.due = self.due, []
        for cb in ran:
            cb()
        return len(ran)


class Rig:
    def __init__(
        self,
        backend: MemBackend | None = None,
        serial: str = "",
        want: int | None = None,
        timers: ManualTimers | None = None,
    ) -> None:
        self.buf = bytearray(4 << 20)
        self.mem = FlatGuestMemory(self.buf)
        self.irq = IrqRecorder()
        self.errors: list[str] = []
        self.backend = backend or MemBackend()
        host = DeviceHost(memory=self.mem, irq=self.irq, guest_error=self.errors.append)
        if timers is not None:
            host.timers = timers
        self.dev = VirtioBlk(host, backend=self.backend, serial=serial)
        self.dev.config_write(regs.bar_offset(0), 4, 0xC000)
        self.dev.config_write(regs.COMMAND, 2, regs.COMMAND_IO | regs.COMMAND_MASTER)
        self.drv = VirtioBlkDriver(DirectBus(self.dev, self.irq), GuestRam(self.buf), timeout=0.2)
        self.info = self.drv.init(want)


def test_pci_identity_matches_qemu_virtio_blk_pci() -> None:
    dev = VirtioBlk(DeviceHost(), backend=MemBackend())
    cfg = dev.config
    assert (cfg.read(0, 2), cfg.read(2, 2)) == (0x1AF4, 0x1001)
    assert (cfg.read(0x2C, 2), cfg.read(0x2E, 2)) == (0x1AF4, 0x0002)
    assert cfg.read(0x09, 1) | cfg.read(0x0A, 2) << 8 == 0x010000
    assert cfg.read(0x08, 1) == 0  # revision: VIRTIO_PCI_ABI_VERSION
    assert cfg.read(0x3D, 1) == 1  # INTA
    cfg.write(0x10, 4, 0xFFFFFFFF)
    assert cfg.read(0x10, 4) == 0xFFFFFF81  # 128-byte I/O BAR
    for slot in range(1, 6):
        cfg.write(0x10 + 4 * slot, 4, 0xFFFFFFFF)
        assert cfg.read(0x10 + 4 * slot, 4) == 0
    assert cfg.read(0x28, 4) == 0 and cfg.read(0x30, 4) == 0


def test_catalogue_builds_virtio_blk_and_needs_a_backing() -> None:
    assert catalogue.model_class("virtio-blk") is VirtioBlk
    with pytest.raises(UsageError, match="backing"):
        catalogue.create("virtio-blk", DeviceHost())


def test_features_and_config() -> None:
    r = Rig()
    offered = r.info.host_features
    for bit in (BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH):
        assert offered & (1 << bit)
    for bit in (
        Feature.RING_INDIRECT_DESC,
        Feature.RING_EVENT_IDX,
        Feature.NOTIFY_ON_EMPTY,
        Feature.ANY_LAYOUT,
    ):
        assert offered & (1 << bit)
    assert not offered & (1 << BlkFeature.RO)
    assert (r.info.capacity, r.info.queue_size, r.info.seg_max, r.info.blk_size) == (SECTORS, 256, 254, 512)
    bus = r.drv.bus
    # Only offered bits stick; reads past the 60-byte config are all-ones.
    bus.write(LegacyReg.STATUS, 1, 0)
    assert offered & (1 << Feature.BAD_FEATURE)  # legacy QEMU offers it too
    bus.write(LegacyReg.GUEST_FEATURES, 4, 0xFFFFFFFF & ~(1 << Feature.BAD_FEATURE))
    assert bus.read(LegacyReg.GUEST_FEATURES, 4) == offered & ~(1 << Feature.BAD_FEATURE)
    # A driver acking VIRTIO_F_BAD_FEATURE gets the device's "bad features" (none).
    bus.write(LegacyReg.GUEST_FEATURES, 4, 0xFFFFFFFF)
    assert bus.read(LegacyReg.GUEST_FEATURES, 4) == 0
    assert bus.read(LegacyReg.CONFIG + 60, 1) == 0xFF
    assert bus.read(LegacyReg.CONFIG + 58, 4) == 0xFFFFFFFF
    assert bus.read(0x01, 1) == 0xFF  # no register starts there


def test_readonly_backing_offers_ro_and_fails_writes() -> None:
    r = Rig(MemBackend(readonly=True))
    assert r.info.host_features & (1 << BlkFeature.RO)
    assert r.drv.write(0, b"x" * 512).status == BLK_S_IOERR
    assert r.backend.data[:512] == bytes(512)
    assert r.drv.read(0, 512).status == BLK_S_OK


def test_read_write_flush_get_id() -> None:
    r = Rig(serial="disk-serial-0123456789ABC")
    data = bytes(range(256)) * 8
    done = r.drv.write(10, data)
    assert (done.status, done.used_len) == (BLK_S_OK, 1)
    assert r.backend.data[10 * 512 : 10 * 512 + 2048] == data
    got = r.drv.read(10, 2048, seg_size=512, indirect=True)
    assert (got.status, got.used_len, got.data) == (BLK_S_OK, 2049, data)
    assert r.drv.flush().status == BLK_S_OK and r.backend.flushes == 1
    ident = r.drv.get_id()
    # 20 bytes, not NUL-terminated when the serial fills them (virtio-blk.c GET_ID)
    assert (ident.status, ident.used_len, ident.data) == (BLK_S_OK, 21, b"disk-serial-01234567")
    assert r.drv.get_id(8).data == b"disk-ser"


@pytest.mark.parametrize(
    ("req", "status"),
    [
        (Request(BLK_T_IN, SECTORS - 1, read_len=1024), BLK_S_IOERR),  # runs past the end
        (Request(BLK_T_IN, 2**63, read_len=512), BLK_S_IOERR),
        (Request(BLK_T_IN, 0, read_len=100), BLK_S_IOERR),  # not a multiple of 512
        (Request(BLK_T_OUT, SECTORS, data=b"x" * 512), BLK_S_IOERR),
        (Request(BLK_T_OUT, 0, data=b"x" * 511), BLK_S_IOERR),
        (Request(99, 0, read_len=512), BLK_S_UNSUPP),
        (Request(BLK_T_IN, SECTORS, read_len=0), BLK_S_OK),  # empty read at the end: allowed
        (Request(BLK_T_FLUSH | 0x80000000), BLK_S_OK),  # BARRIER bit ignored
    ],
)
def test_request_status(req: Request, status: int) -> None:
    r = Rig()
    assert r.drv.run([req])[0].status == status
    assert r.dev.transport.status & Status.NEEDS_RESET == 0
    assert r.backend.data == bytes(DISK)


def test_backend_error_is_ioerr() -> None:
    r = Rig(MemBackend(fail=True))
    assert r.drv.read(0, 512).status == BLK_S_IOERR
    assert r.drv.write(0, b"a" * 512).status == BLK_S_IOERR
    assert r.drv.flush().status == BLK_S_IOERR


@pytest.mark.parametrize(
    "chain",
    [
        [(0x300000, 16, 0)],  # no device-writable buffer at all (no status byte)
        [(0x300000, 8, DESC_F_WRITE)],  # no header
        [(0x300000, 8, 0), (0x300100, 1, DESC_F_WRITE)],  # header too short
    ],
    ids=["no-status", "no-header", "short-header"],
)
def test_malformed_request_sets_needs_reset(chain: list[tuple[int, int, int]]) -> None:
    r = Rig()
    for i, (a, n, f) in enumerate(chain):
        more = i + 1 < len(chain)
        r.drv.put_desc(i, a, n, f | (DESC_F_NEXT if more else 0), i + 1 if more else 0)
    r.irq.take()
    r.drv.publish(0)
    r.drv.kick(force=True)
    assert r.drv.status() & Status.NEEDS_RESET
    assert r.errors and "needs reset" in r.errors[0]
    assert r.irq.take()  # config-change interrupt
    assert r.drv.bus.read(LegacyReg.ISR, 1) == ISR_CONFIG
    # Nothing more is served until the driver resets the device ...
    r.drv.publish(0)
    r.drv.kick(force=True)
    assert r.drv.used_idx() == 0
    # ... after which it works again.
    r.drv.init()
    assert r.drv.status() & Status.NEEDS_RESET == 0
    assert r.drv.write(0, b"z" * 512).status == BLK_S_OK


def test_isr_read_clears_and_lowers_intx() -> None:
    r = Rig()
    r.drv.submit(Request(BLK_T_FLUSH))
    r.drv.kick(force=True)
    assert r.irq.level and r.dev.config.status & regs.STATUS_INTERRUPT
    assert r.drv.bus.read(LegacyReg.ISR, 1) == 1
    assert not r.irq.level and not r.dev.config.status & regs.STATUS_INTERRUPT
    assert r.drv.bus.read(LegacyReg.ISR, 1) == 0


def test_intx_disable_masks_the_wire() -> None:
    r = Rig()
    r.dev.config_write(regs.COMMAND, 2, regs.COMMAND_IO | regs.COMMAND_MASTER | regs.COMMAND_INTX_DISABLE)
    r.drv.submit(Request(BLK_T_FLUSH))
    r.drv.kick(force=True)
    assert not r.irq.level  # masked on the wire ...
    assert r.dev.config.status & regs.STATUS_INTERRUPT  # ... but visible in status bit 3
    r.dev.config_write(regs.COMMAND, 2, regs.COMMAND_IO | regs.COMMAND_MASTER)
    assert r.irq.level


def test_no_dma_without_bus_master() -> None:
    r = Rig()
    r.dev.config_write(regs.COMMAND, 2, regs.COMMAND_IO)
    r.drv.submit(Request(BLK_T_OUT, 0, data=b"q" * 512))
    r.drv.kick(force=True)
    assert r.drv.used_idx() == 0 and r.backend.data[:512] == bytes(512)
    # DRIVER_OK re-enables bus mastering (the virtio_ioport_write work-around) and a new kick serves it.
    r.drv.bus.write(LegacyReg.STATUS, 1, Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)
    assert r.dev.config.bus_master
    r.drv.kick(force=True)
    assert r.drv.used_idx() == 1 and r.backend.data[:512] == b"q" * 512


def test_device_reset_and_pfn_zero_reset() -> None:
    r = Rig()
    assert r.drv.bus.read(LegacyReg.QUEUE_PFN, 4) == r.drv.desc >> 12
    r.dev.reset()
    assert r.drv.status() == 0 and r.drv.bus.read(LegacyReg.QUEUE_PFN, 4) == 0
    r.drv.init()
    r.drv.bus.write(LegacyReg.QUEUE_PFN, 4, 0)  # legacy: PFN 0 resets the whole device
    assert r.drv.status() == 0 and r.drv.bus.read(LegacyReg.GUEST_FEATURES, 4) == 0


def test_event_idx_suppresses_interrupts() -> None:
    # Like Linux (vring_transport_features), do not ack NOTIFY_ON_EMPTY: it would force a
    # notification whenever the queue runs empty, whatever used_event says.
    r = Rig(want=~(1 << Feature.NOTIFY_ON_EMPTY) & 0xFFFFFFFF)
    r.drv.set_used_event(1000)  # driver does not want an interrupt for a while
    r.irq.take()
    r.drv.submit(Request(BLK_T_FLUSH))
    r.drv.kick(force=True)
    first = r.irq.take()  # the first notification is never suppressed (signalled_used invalid)
    r.drv.bus.read(LegacyReg.ISR, 1)
    r.drv.submit(Request(BLK_T_FLUSH))
    r.drv.kick(force=True)
    assert first and not r.irq.take()
    assert r.drv.used_idx() == 2
    # Without EVENT_IDX the same sequence interrupts every time.
    r2 = Rig(want=~(1 << Feature.RING_EVENT_IDX) & 0xFFFFFFFF)
    for _ in range(2):
        r2.drv.submit(Request(BLK_T_FLUSH))
        r2.drv.kick(force=True)
        assert r2.irq.take()
        r2.drv.bus.read(LegacyReg.ISR, 1)


def test_kick_suppression_with_event_idx() -> None:
    r = Rig()
    r.drv.write(0, b"a" * 512)
    # after serving, the device asks to be kicked at the next avail index
    assert r.drv.avail_event() == r.drv.used_idx()


def test_status_report_is_json_ready() -> None:
    import json

    r = Rig()
    r.drv.flush()
    report = json.loads(json.dumps(r.dev.status()))
    assert report["model"] == "virtio-blk" and report["counters"]["flush"] == 1


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("w"),
            st.integers(0, SECTORS - 1),
            st.integers(1, 16),
            st.integers(0, 255),
            st.integers(0, 3),
        ),
        st.tuples(
            st.just("r"),
            st.integers(0, SECTORS - 1),
            st.integers(1, 16),
            st.integers(0, 0),
            st.integers(0, 3),
        ),
        st.tuples(st.just("f"), st.just(0), st.just(0), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=_examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.booleans())
def test_random_request_batches_match_a_model(
    batch: list[tuple[str, int, int, int, int]], indirect: bool
) -> None:
    """Any batch of reads, writes and flushes behaves like a flat byte array."""
    r = Rig()
    model = bytearray(DISK)
    reqs: list[Request] = []
    expect: list[tuple[int, bytes]] = []
    pending = bytearray(model)
    for kind, sector, count, fill, seg in batch:
        n = min(count, SECTORS - sector) * 512
        segsz = [0, 512, 1024, 4096][seg]
        if kind == "w":
            data = bytes([fill]) * n
            reqs.append(Request(BLK_T_OUT, sector, data=data, seg_size=segsz, indirect=indirect))
            pending[sector * 512 : sector * 512 + n] = data
            expect.append((BLK_S_OK, b""))
        elif kind == "r":
            reqs.append(Request(BLK_T_IN, sector, read_len=n, seg_size=segsz, indirect=indirect))
            expect.append((BLK_S_OK, bytes(pending[sector * 512 : sector * 512 + n])))
        else:
            reqs.append(Request(BLK_T_FLUSH))
            expect.append((BLK_S_OK, b""))
    done = r.drv.run(reqs)
    # Requests of one kick are served in ring order, so reads see earlier writes of the batch.
    assert [(c.status, c.data) for c in done] == expect
    assert r.backend.data == pending


@settings(max_examples=_examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chain=st.lists(
        st.tuples(
            st.one_of(st.integers(0, (4 << 20) + 64), st.integers(0, 2**64 - 1)),
            st.one_of(st.integers(0, 1024), st.integers(0, 2**32 - 1)),
            st.integers(0, 7),
        ),
        min_size=1,
        max_size=5,
    ),
    header=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
)
def test_hostile_requests_never_crash(chain: list[tuple[int, int, int]], header: tuple[int, int]) -> None:
    """Arbitrary chains and headers end as a status byte or NEEDS_RESET, never an exception."""
    r = Rig()
    hdr_gpa = 0x200000
    r.buf[hdr_gpa : hdr_gpa + 16] = struct.pack("<IIQ", header[0], 0, header[1])
    for i, (a, n, f) in enumerate(chain):
        addr = hdr_gpa if i == 0 and a % 2 else a
        r.drv.put_desc(i, addr, n, f & ~DESC_F_NEXT | (DESC_F_NEXT if i + 1 < len(chain) else 0), i + 1)
    r.drv.publish(0)
    r.drv.kick(force=True)
    status = r.drv.status()
    if status & Status.NEEDS_RESET:
        assert r.drv.used_idx() == 0
    else:
        assert r.drv.used_idx() == 1
    # The device still answers its registers and can be brought back.
    r.drv.init()
    assert r.drv.write(1, b"k" * 512).status == BLK_S_OK


def test_back_to_back_requests_become_one_backend_call() -> None:
    """virtio_blk_submit_multireq: neighbours in ring order merge; direction or FLUSH splits."""
    r = Rig()
    reqs = [Request(BLK_T_OUT, 8 * i, data=bytes([i]) * 4096, seg_size=1024) for i in range(4)]
    reqs += [Request(BLK_T_IN, 8 * i, read_len=4096) for i in range(4)]
    reqs += [Request(BLK_T_IN, 100, read_len=512), Request(BLK_T_FLUSH), Request(BLK_T_IN, 101, read_len=512)]
    done = r.drv.run(reqs)
    assert [c.status for c in done] == [BLK_S_OK] * len(reqs)
    assert [c.data for c in done[4:8]] == [bytes([i]) * 4096 for i in range(4)]
    assert r.backend.calls == [("w", 0, 16384), ("r", 0, 16384), ("r", 51200, 512), ("r", 51712, 512)]
    assert r.backend.flushes == 1


def test_merged_request_failure_fails_every_member() -> None:
    r = Rig(MemBackend(fail=True))
    done = r.drv.run([Request(BLK_T_IN, 8 * i, read_len=4096) for i in range(3)])
    assert [c.status for c in done] == [BLK_S_IOERR] * 3
    assert len(r.backend.calls) == 1
    assert r.dev.requests.counters["ioerr"] == 3


def test_kick_defers_a_batch_and_serves_a_lone_request_inline() -> None:
    """A batch is served after the BAR write, all of it in one run; a QD1 request inside the write."""
    timers = ManualTimers()
    r = Rig(timers=timers)
    reqs = [Request(BLK_T_IN, 256 * i, read_len=128 << 10) for i in range(5)]
    for req in reqs:
        r.drv.submit(req)
    r.irq.take()
    r.drv.kick(force=True)
    assert r.drv.used_idx() == 0 and len(timers.due) == 1  # answered first, as QEMU's ioeventfd
    assert not r.irq.take()  # no interrupt yet: the continuation will send one for all five
    r.drv.kick(force=True)  # a second kick while the continuation is pending coalesces
    assert len(timers.due) == 1
    assert timers.run() == 1
    assert r.drv.used_idx() == 5 and not timers.due
    assert r.irq.take() and r.irq.edges == 1
    # a lone request is served inside its kick (no second wake-up for QD1)
    r.drv.submit(Request(BLK_T_IN, 0, read_len=128 << 10))
    r.drv.kick(force=True)
    assert r.drv.used_idx() == 6 and not timers.due
    # one small request is served entirely inside its kick, nothing is deferred
    r.drv.run([Request(BLK_T_FLUSH)])
    assert not timers.due


def test_a_lone_request_that_spends_the_inline_budget_rearms_kicks() -> None:
    """Regression: a lone request of >= INLINE_BYTES served inside its kick left avail_event
    behind (the budget branch skipped enable_notification); with EVENT_IDX the guest's driver
    then never kicked again and its I/O hung (bench/vfio_user.py dd bs=1M)."""
    from mpqemu_mgmt.devices.virtio.legacy_pci import INLINE_BYTES

    timers = ManualTimers()
    r = Rig(timers=timers)
    assert r.drv.event_idx
    for n in range(1, 4):
        r.drv.submit(Request(BLK_T_IN, 0, read_len=INLINE_BYTES))
        assert r.drv.kick(), f"request {n}: the driver was not asked to kick (avail_event lags)"
        timers.run()
        assert r.drv.used_idx() == n
        assert r.drv.avail_event() == n  # kick me at the next avail index
