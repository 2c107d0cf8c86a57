"""Pure tests of the device models: pci-testdev's byte-wise rules, edu's registers, DMA and timers."""

from __future__ import annotations

import pytest

from mpqemu_mgmt.devices import catalogue
from mpqemu_mgmt.devices.base import DeviceHost
from mpqemu_mgmt.devices.edu import DMA_DELAY, Edu, factorial_u32
from mpqemu_mgmt.devices.pci_testdev import PciTestDev, dispatch_pieces
from mpqemu_mgmt.errors import DmaError, UsageError
from mpqemu_mgmt.pci import regs
from mpqemu_mgmt.remote.timers import TimerQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Ram:
    """GuestMemory over one bytearray at gpa 0, recording every access."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.touched: list[tuple[str, int, int]] = []

    def _check(self, gpa: int, n: int) -> None:
        if gpa < 0 or gpa + n > len(self.buf):
            raise DmaError("outside", gpa=gpa, length=n)

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        self.touched.append(("r", gpa, length))
        return bytes(self.buf[gpa : gpa + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._check(gpa, len(data))
        self.touched.append(("w", gpa, len(data)))
        self.buf[gpa : gpa + len(data)] = data

    def view(self, gpa: int, length: int) -> memoryview:
        self._check(gpa, length)
        return memoryview(self.buf)[gpa : gpa + length]


class Wire:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.levels.append(level)


# -- pci-testdev ---------------------------------------------------------------------------------


def test_dispatch_pieces_follow_natural_alignment() -> None:
    assert dispatch_pieces(0, 8) == [(0, 4), (4, 4)]
    assert dispatch_pieces(2049, 4) == [(2049, 1), (2050, 2), (2052, 1)]
    assert dispatch_pieces(2050, 2) == [(2050, 2)]
    assert dispatch_pieces(3, 1) == [(3, 1)]


def test_testdev_header_and_counting() -> None:
    d = PciTestDev()
    assert d.config_read(0, 4) == 0x00051B36 and d.config_read(regs.INTERRUPT_PIN, 1) == 0
    assert d.bar_read(0, 0, 4) == 0  # nothing selected
    d.bar_write(0, 0, 1, 0)  # mmio-no-eventfd
    assert d.bar_read(0, 0, 4) == 0x00000100  # test 0, width 1
    assert d.bar_read(0, 4, 4) == 2048
    assert d.bar_read(0, 8, 1) == 0xFA
    name = bytes(d.bar_read(0, 16 + i, 1) for i in range(16))
    assert name.startswith(b"mmio-no-eventfd\0")
    assert d.bar_read(0, 16 + 15, 1) == 0  # addr + 1 >= bufsize reads 0 (the NUL, and beyond)
    d.bar_write(0, 2048, 1, 0xFA)
    d.bar_write(0, 2048, 1, 0x11)
    d.bar_write(0, 2048, 2, 0x00FA)  # two byte accesses; the low one matches
    assert d.bar_read(0, 12, 4) == 2
    d.bar_write(1, 0, 1, 1)  # portio-wildcard-eventfd (test 4)
    assert d.bar_read(1, 0, 1) == 4 and d.bar_read(0, 0, 1) == 4  # global selection
    d.bar_write(1, 132, 1, 0x99)  # swallowed by the ioeventfd: no count
    assert d.bar_read(1, 12, 4) == 0
    d.bar_write(1, 132, 2, 0x99)  # a 2-byte piece is not the eventfd's size: counted
    assert d.bar_read(1, 12, 4) == 1
    d.bar_write(1, 0, 1, 7)  # out of range: nothing selected
    assert d.bar_read(1, 0, 4) == 0
    d.bar_write(0, 0, 1, 0)
    d.reset()
    assert d.current == -1 and d.bar_read(0, 0, 4) == 0


# -- edu -------------------------------------------------------------------------------------------


def make_edu(ram_size: int = 1 << 20) -> tuple[Edu, Ram, Wire, Clock, TimerQueue, list[str]]:
    ram, wire, clock = Ram(ram_size), Wire(), Clock()
    timers = TimerQueue(clock)
    errors: list[str] = []
    edu = Edu(DeviceHost(memory=ram, irq=wire, timers=timers, guest_error=errors.append))
    edu.config_write(regs.COMMAND, 2, regs.COMMAND_MEMORY | regs.COMMAND_MASTER)
    return edu, ram, wire, clock, timers, errors


def test_factorial_u32() -> None:
    assert [factorial_u32(n) for n in range(6)] == [1, 1, 2, 6, 24, 120]
    assert factorial_u32(12) == 479001600
    assert factorial_u32(13) == 6227020800 & 0xFFFFFFFF
    assert factorial_u32(33) != 0 and factorial_u32(34) == 0 and factorial_u32(0xFFFFFFFF) == 0


def test_edu_registers_and_size_rules() -> None:
    edu, *_ = make_edu()
    assert edu.config_read(0, 4) == 0x11E81234 and edu.config_read(regs.REVISION_ID, 1) == 0x10
    assert edu.config_read(regs.INTERRUPT_PIN, 1) == 1
    assert not edu.config.status & regs.STATUS_CAP_LIST  # no MSI capability
    assert edu.bar_read(0, 0, 4) == 0x010000ED
    assert edu.bar_read(0, 0, 2) == 0xFFFF and edu.bar_read(0, 0, 8) == 0xFFFFFFFFFFFFFFFF
    assert edu.bar_read(0, 0x1000, 4) == 0xFFFFFFFF  # unlisted
    edu.bar_write(0, 4, 4, 0x12345678)
    assert edu.bar_read(0, 4, 4) == 0xEDCBA987
    edu.bar_write(0, 4, 2, 0)  # wrong size: ignored
    assert edu.bar_read(0, 4, 4) == 0xEDCBA987
    edu.bar_write(0, 0x80, 8, 0x1_2345_6789)
    assert edu.bar_read(0, 0x80, 8) == 0x1_2345_6789
    edu.bar_write(0, 0x80, 4, 0xFFFF_FFFF)  # 4-byte write replaces the whole register
    assert edu.bar_read(0, 0x80, 8) == 0xFFFF_FFFF


def test_edu_factorial_status_and_irq() -> None:
    edu, _, wire, _, timers, _ = make_edu()
    edu.bar_write(0, 0x08, 4, 10)
    assert edu.bar_read(0, 0x20, 4) & 1 and edu.bar_read(0, 0x08, 4) == 10
    edu.bar_write(0, 0x08, 4, 3)  # ignored while computing
    timers.run_due()
    assert edu.bar_read(0, 0x08, 4) == 3628800 and not edu.bar_read(0, 0x20, 4) & 1
    assert wire.levels == []
    edu.bar_write(0, 0x20, 4, 0x81)  # only 0x80 is writable
    assert edu.bar_read(0, 0x20, 4) == 0x80
    edu.bar_write(0, 0x08, 4, 4)
    timers.run_due()
    assert edu.bar_read(0, 0x24, 4) == 1 and wire.levels == [True]
    assert edu.config.status & regs.STATUS_INTERRUPT
    edu.bar_write(0, 0x64, 4, 1)
    assert wire.levels == [True, False] and not edu.config.status & regs.STATUS_INTERRUPT


def test_edu_dma_both_ways_after_100ms() -> None:
    edu, ram, wire, clock, timers, errors = make_edu()
    ram.buf[0x1000:0x1010] = bytes(range(16))
    for off, val in ((0x80, 0x1000), (0x88, 0x40010), (0x90, 16), (0x98, 1)):
        edu.bar_write(0, off, 4, val)
    edu.bar_write(0, 0x80, 4, 0x9999)  # frozen while running
    timers.run_due()
    assert edu.dma_buf[0x10:0x20] == bytes(16)  # not before 100 ms
    clock.now += DMA_DELAY
    timers.run_due()
    assert edu.dma_buf[0x10:0x20] == bytes(range(16)) and not edu.bar_read(0, 0x98, 4) & 1
    for off, val in ((0x80, 0x40010), (0x88, 0x2000), (0x90, 16), (0x98, 7)):
        edu.bar_write(0, off, 4, val)
    clock.now += DMA_DELAY
    timers.run_due()
    assert ram.buf[0x2000:0x2010] == bytes(range(16))
    assert edu.bar_read(0, 0x24, 4) == 0x100 and wire.levels == [True]
    assert not errors


@pytest.mark.parametrize(
    ("src", "dst", "cnt", "cmd", "why"),
    [
        (0x3FFFF, 0x1000, 16, 3, "out of bounds"),  # device side before the buffer
        (0x40FF0, 0x1000, 32, 3, "out of bounds"),  # runs past its end
        (0x40000, 0x1000, 1 << 64 - 1, 3, "out of bounds"),
        (0x40000, (1 << 20) - 8, 16, 3, "outside"),  # guest side past RAM
        (0x40000, 0x1000, 16, 3, "Bus Master"),
    ],
)
def test_edu_dma_refusals_touch_nothing(src: int, dst: int, cnt: int, cmd: int, why: str) -> None:
    edu, ram, _, clock, timers, errors = make_edu()
    if why == "Bus Master":
        edu.config_write(regs.COMMAND, 2, regs.COMMAND_MEMORY)
    for off, val in ((0x80, src), (0x88, dst), (0x90, cnt), (0x98, cmd)):
        edu.bar_write(0, off, 8, val)
    clock.now += DMA_DELAY
    timers.run_due()
    assert not any(kind == "w" for kind, _, _ in ram.touched)
    assert edu.dma_failed == 1 and any(why in e for e in errors)
    assert not edu.bar_read(0, 0x98, 4) & 1  # the command completes (and may raise its IRQ)


def test_edu_dma_mask_clamps() -> None:
    edu, ram, _, clock, timers, errors = make_edu()
    ram.buf[0x10:0x14] = b"abcd"
    for off, val in ((0x80, (1 << 28) | 0x10), (0x88, 0x40000), (0x90, 4), (0x98, 1)):
        edu.bar_write(0, off, 8, val)
    clock.now += DMA_DELAY
    timers.run_due()
    assert edu.dma_buf[:4] == b"abcd" and any("clamping" in e for e in errors)


def test_catalogue() -> None:
    assert {"pci-testdev", "edu", "virtio-blk"} <= set(catalogue.names())
    assert isinstance(catalogue.create("edu", DeviceHost()), Edu)
    with pytest.raises(UsageError):
        catalogue.create("nosuch", DeviceHost())
    catalogue.register("broken-test-model", "mpqemu_mgmt.nosuchmodule:X")
    with pytest.raises(UsageError):
        catalogue.model_class("broken-test-model")


def test_timer_queue_order_and_cancel() -> None:
    clock = Clock()
    tq = TimerQueue(clock)
    out: list[str] = []
    tq.call_later(2, lambda: out.append("b"))
    h = tq.call_later(1, lambda: out.append("x"))
    tq.call_later(1, lambda: out.append("a"))
    tq.cancel(h)
    assert tq.timeout() == 1
    clock.now = 5
    assert tq.run_due() == 2 and out == ["a", "b"] and tq.timeout() is None
