"""Unit tests for the pure PCI model: masks, BAR sizing and decode, effects, capabilities, INTx."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpqemu_mgmt.errors import DeviceError, UsageError
from mpqemu_mgmt.pci import BarKind, BarMap, BarSpec, ConfigSpace, IntxPin, PciAddress, regs


def make(bars: tuple[BarSpec, ...] = (), pin: int = 0) -> ConfigSpace:
    return ConfigSpace(
        vendor_id=0x1B36, device_id=0x0005, class_code=0x00FF, revision=0x10, interrupt_pin=pin, bars=bars
    )


TESTDEV_BARS = (BarSpec(0, 4096, BarKind.MEM32), BarSpec(1, 256, BarKind.IO))


def test_ids_and_defaults() -> None:
    cs = make(TESTDEV_BARS)
    assert cs.read(0, 4) == 0x00051B36
    assert cs.read(regs.REVISION_ID, 1) == 0x10
    assert cs.read(regs.CLASS_DEVICE, 2) == 0x00FF
    assert cs.read(regs.SUBSYSTEM_VENDOR_ID, 4) == 0x11001AF4
    assert cs.read(regs.bar_offset(0), 4) == 0
    assert cs.read(regs.bar_offset(1), 4) == 1  # I/O space bit
    assert cs.read(regs.CARDBUS_CIS, 4) == 0
    assert cs.read(regs.ROM_ADDRESS, 4) == 0
    assert cs.read(0, 3) == 0x051B36  # 3-byte reads are plain copies, as in QEMU


@pytest.mark.parametrize(
    ("spec", "readback"),
    [
        (BarSpec(0, 4096, BarKind.MEM32), 0xFFFFF000),
        (BarSpec(0, 1 << 20, BarKind.MEM32), 0xFFF00000),
        (BarSpec(0, 256, BarKind.IO), 0xFFFFFF01),
        (BarSpec(0, 16, BarKind.MEM32, prefetchable=True), 0xFFFFFFF8),
    ],
)
def test_bar_sizing_by_all_ones(spec: BarSpec, readback: int) -> None:
    cs = make((spec,))
    cs.write(regs.bar_offset(0), 4, 0xFFFFFFFF)
    assert cs.read(regs.bar_offset(0), 4) == readback


def test_bar64_sizing_and_decode() -> None:
    cs = make((BarSpec(2, 1 << 16, BarKind.MEM64),))
    lo, hi = regs.bar_offset(2), regs.bar_offset(3)
    assert cs.read(lo, 4) == 0x4
    cs.write(lo, 4, 0xFFFFFFFF)
    cs.write(hi, 4, 0xFFFFFFFF)
    assert cs.read(lo, 4) == 0xFFFF0004
    assert cs.read(hi, 4) == 0xFFFFFFFF
    cs.write(lo, 4, 0x0)
    cs.write(hi, 4, 0x1)
    fx = cs.write(regs.COMMAND, 2, regs.COMMAND_MEMORY)
    assert fx.bar_changes and fx.bar_changes[0].new is not None
    assert fx.bar_changes[0].new.base == 1 << 32
    assert BarMap(cs).resolve((1 << 32) + 0x10, 4, True) == (2, 0x10)


def test_readonly_header_and_masks() -> None:
    cs = make(TESTDEV_BARS)
    cs.write(0, 4, 0xFFFFFFFF)
    assert cs.read(0, 4) == 0x00051B36
    cs.write(regs.COMMAND, 2, 0xFFFF)
    assert cs.command == 0x0507  # IO|MEM|MASTER|SERR|INTX_DISABLE (pci_init_wmask)
    cs.write(regs.INTERRUPT_LINE, 1, 0x0B)
    assert cs.read(regs.INTERRUPT_LINE, 1) == 0x0B
    cs.write(regs.INTERRUPT_PIN, 1, 0x04)
    assert cs.read(regs.INTERRUPT_PIN, 1) == 0
    cs.write(0x40, 4, 0xDEADBEEF)  # device-specific space is writable in QEMU's core
    assert cs.read(0x40, 4) == 0xDEADBEEF


def test_status_w1c() -> None:
    cs = make()
    cs.set_u16(regs.STATUS, regs.STATUS_REC_MASTER_ABORT | regs.STATUS_INTERRUPT)
    cs.write(regs.STATUS, 2, 0xFFFF)
    assert cs.status == regs.STATUS_INTERRUPT


def test_decode_follows_command_and_effects() -> None:
    cs = make(TESTDEV_BARS)
    bm = BarMap(cs)
    assert cs.write(regs.bar_offset(0), 4, 0xFEB00000).bar_changes == ()
    cs.write(regs.bar_offset(1), 4, 0xC000)
    assert bm.resolve(0xFEB00000, 4, True) is None
    fx = cs.write(regs.COMMAND, 2, regs.COMMAND_MEMORY | regs.COMMAND_IO)
    assert [c.index for c in fx.bar_changes] == [0, 1]
    assert bm.resolve(0xFEB00FFC, 4, True) == (0, 0xFFC)
    assert bm.resolve(0xFEB00FFD, 4, True) is None  # runs past the end
    assert bm.resolve(0xFEB00000, 4, False) is None  # wrong space
    assert bm.resolve(0xC0FF, 1, False) == (1, 0xFF)
    fx = cs.write(regs.bar_offset(0), 4, 0xFEC00000)
    assert fx.bar_changes[0].old is not None and fx.bar_changes[0].old.base == 0xFEB00000
    assert fx.bar_changes[0].new is not None and fx.bar_changes[0].new.base == 0xFEC00000
    fx = cs.write(regs.COMMAND, 2, regs.COMMAND_IO)
    assert fx.bar_changes[0].new is None
    assert bm.resolve(0xFEC00000, 4, True) is None
    assert bm.check_region(0, 0xFFC, 4) and not bm.check_region(0, 0xFFD, 4)
    assert not bm.check_region(3, 0, 1)


def test_bar_at_zero_or_wrapping_is_not_decoded() -> None:
    cs = make(TESTDEV_BARS)
    cs.write(regs.COMMAND, 2, regs.COMMAND_MEMORY | regs.COMMAND_IO)
    assert cs.windows == ()
    cs.write(regs.bar_offset(0), 4, 0xFFFFF000)  # last byte would be 0xffffffff
    assert cs.window(0) is None


def test_reset_restores_values() -> None:
    cs = make(TESTDEV_BARS)
    cs.write(regs.bar_offset(0), 4, 0xFEB00000)
    cs.write(regs.COMMAND, 2, regs.COMMAND_MEMORY)
    fx = cs.reset()
    assert cs.read(regs.bar_offset(0), 4) == 0 and cs.command == 0 and cs.windows == ()
    assert fx.bar_changes[0].new is None


def test_capability_chain() -> None:
    cs = make()
    a = cs.add_capability(regs.CAP_ID_VNDR, 8)
    b = cs.add_capability(regs.CAP_ID_PM, 8)
    assert cs.status & regs.STATUS_CAP_LIST
    assert cs.read(regs.CAPABILITY_LIST, 1) == b
    assert cs.capabilities() == [(regs.CAP_ID_PM, b), (regs.CAP_ID_VNDR, a)]
    cs.write(a, 4, 0xFFFFFFFF)
    assert cs.read(a, 2) == regs.CAP_ID_VNDR  # header read-only
    with pytest.raises(DeviceError):
        cs.add_capability(regs.CAP_ID_MSI, 4, offset=a)


def test_bad_declarations_and_accesses() -> None:
    with pytest.raises(DeviceError):
        BarSpec(0, 3000)
    with pytest.raises(DeviceError):
        BarSpec(5, 4096, BarKind.MEM64)
    with pytest.raises(DeviceError):
        make((BarSpec(0, 4096, BarKind.MEM64), BarSpec(1, 16)))
    with pytest.raises(DeviceError):
        make(pin=2)
    cs = make()
    for off, size in [(0xFE, 4), (0, 0), (0, 5), (-1, 1), (256, 1)]:
        with pytest.raises(DeviceError):
            cs.read(off, size)
    assert cs.read(0xFF, 1) == 0  # the real extent is checked, not addr + 4


class Wire:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.levels.append(level)


def test_intx_disable_and_status_bit() -> None:
    cs = make(pin=1)
    wire = Wire()
    pin = IntxPin(cs, wire)
    pin.set_level(True)
    assert wire.levels == [True] and cs.status & regs.STATUS_INTERRUPT
    pin.on_config(cs.write(regs.COMMAND, 2, regs.COMMAND_INTX_DISABLE))
    assert wire.levels == [True, False] and cs.status & regs.STATUS_INTERRUPT
    pin.set_level(False)
    assert wire.levels == [True, False] and not cs.status & regs.STATUS_INTERRUPT
    pin.set_level(True)
    assert wire.levels == [True, False]
    pin.on_config(cs.write(regs.COMMAND, 2, 0))
    assert wire.levels == [True, False, True]


def test_pci_address() -> None:
    assert str(PciAddress.parse("00:03.0")) == "0000:00:03.0"
    assert PciAddress.parse("0001:02:1f.7").devfn == 0xFF
    with pytest.raises(UsageError):
        PciAddress.parse("00:20.0")


@given(st.lists(st.tuples(st.integers(0, 255), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1))))
def test_random_writes_keep_invariants(ops: list[tuple[int, int, int]]) -> None:
    cs = make(TESTDEV_BARS, pin=1)
    for off, size, val in ops:
        if off + size > 256:
            with pytest.raises(DeviceError):
                cs.write(off, size, val)
            continue
        cs.write(off, size, val)
        assert cs.read(0, 4) == 0x00051B36
        assert cs.read(regs.bar_offset(0), 4) & 0xFFF == 0
        assert cs.read(regs.bar_offset(1), 4) & 0xFF == 1
        assert cs.read(regs.INTERRUPT_PIN, 1) == 1
        for w in cs.windows:
            assert w.base % w.size == 0 and w.base != 0


def test_io_bar_above_64k_decodes_nowhere() -> None:
    cs = make(TESTDEV_BARS)
    cs.write(regs.bar_offset(1), 4, 0x10000)
    cs.write(regs.COMMAND, 2, regs.COMMAND_IO)
    assert cs.window(1) is not None  # the config space decodes it, as QEMU's PCI core does
    assert BarMap(cs).resolve(0x10000, 1, False) is None  # but there is no port there
    assert not BarMap.port_exists(0xFFFF, 2) and BarMap.port_exists(0xFFFF, 1)
