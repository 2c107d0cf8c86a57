"""pci-testdev: QEMU's PCI test device, observable behaviour for behaviour (hw/misc/pci-testdev.c).

IDs 1b36:0005 rev 0, class 0x00ff, no interrupt pin; BAR0 4 KiB memory, BAR1 256 bytes I/O. Six
tests (MMIO/port I/O × no-eventfd/wildcard-eventfd/datamatch-eventfd); a write to offset 0 of a BAR
selects one, reads show its header, matching writes bump its counter.

Two details of QEMU's memory core are part of what a guest observes, so they are modelled here:

* the device is byte-wide (``impl.max_access_size = 1``): ``access_with_adjusted_size`` splits
  every access into bytes, each handled on its own;
* the eventfd tests register an ioeventfd on the test's own region; without KVM,
  ``memory_region_dispatch_write`` (softmmu/memory.c) first offers each *dispatched piece* to
  ``memory_region_dispatch_write_eventfds``, which swallows a piece whose offset and size equal the
  eventfd's (offset, 1) — and, for datamatch, whose value is 0xFA — before the device sees it.
  Pieces are cut by ``memory_access_size`` (at most 4 bytes, naturally aligned). That is why a
  1-byte hit never counts for tests 1 and 2, while a wider write covering the offset does.

Pure: no IO.
"""

from __future__ import annotations

import struct
from typing import Any

from mpqemu_mgmt.devices.base import DeviceHost
from mpqemu_mgmt.devices.function import PciFunction
from mpqemu_mgmt.pci import regs
from mpqemu_mgmt.pci.config import BarKind, BarSpec, ConfigSpace

IOTEST_DATAMATCH = 0xFA
IOTEST_NOMATCH = 0xCE
IOTEST_IOSIZE = 128
IOTEST_MEMSIZE = 2048
_TESTS = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
_TYPES = ("mmio", "portio")
_HDR = struct.Struct("<BB2xIB3xI")  # PCITestDevHdr without the name


class _IoTest:
    __slots__ = ("bufsize", "count", "data", "has_notifier", "index", "match_data", "name", "offset", "type")

    def __init__(self, index: int) -> None:
        self.index = index
        self.type = index // len(_TESTS)  # 0 = MMIO (BAR0), 1 = port I/O (BAR1)
        kind = _TESTS[index % len(_TESTS)]
        self.name = f"{_TYPES[self.type]}-{kind}".encode()
        self.bufsize = _HDR.size + len(self.name) + 1
        self.offset = (IOTEST_MEMSIZE if self.type == 0 else IOTEST_IOSIZE) + index
        self.match_data = kind != "wildcard-eventfd"
        self.data = IOTEST_DATAMATCH if self.match_data else IOTEST_NOMATCH
        self.has_notifier = kind != "no-eventfd"
        self.count = 0

    def header(self) -> bytes:
        return _HDR.pack(self.index, 1, self.offset, self.data, self.count) + self.name + b"\0"


def dispatch_pieces(offset: int, size: int) -> list[tuple[int, int]]:
    """How QEMU's flatview cuts an access for a region without its own valid sizes.

    mirrors memory_access_size in softmmu/physmem.c: at most 4 bytes (``valid.max_access_size``
    unset), no wider than the offset's natural alignment, rounded down to a power of two.
    """
    pieces = []
    while size > 0:
        n = min(size, 4)
        align = offset & -offset
        if align and align < n:
            n = align
        n = 1 << (n.bit_length() - 1)
        pieces.append((offset, n))
        offset += n
        size -= n
    return pieces


class PciTestDev(PciFunction):
    model = "pci-testdev"

    def __init__(self, host: DeviceHost | None = None) -> None:
        config = ConfigSpace(
            vendor_id=0x1B36,  # PCI_VENDOR_ID_REDHAT
            device_id=0x0005,  # PCI_DEVICE_ID_REDHAT_TEST
            class_code=regs.CLASS_OTHERS,
            revision=0,
            interrupt_pin=0,
            bars=(
                BarSpec(0, IOTEST_MEMSIZE * 2, BarKind.MEM32),
                BarSpec(1, IOTEST_IOSIZE * 2, BarKind.IO),
            ),
        )
        super().__init__(host or DeviceHost(), config)
        self.tests = [_IoTest(i) for i in range(len(_TESTS) * len(_TYPES))]
        self.current = -1
        self._hdr_cache: bytes | None = None

    # -- BARs ----------------------------------------------------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if self.current < 0:
            return 0
        test = self.tests[self.current]
        hdr = self._hdr_cache
        if hdr is None:
            hdr = self._hdr_cache = test.header()
        value = 0
        for i in range(size):
            a = offset + i
            # pci_testdev_read: "if (addr + size >= test->bufsize) return 0" with size 1
            if a + 1 < test.bufsize:
                value |= hdr[a] << (8 * i)
        return value

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        for piece_off, piece_size in dispatch_pieces(offset, size):
            piece_val = (value >> (8 * (piece_off - offset))) & ((1 << (8 * piece_size)) - 1)
            if self._swallowed_by_eventfd(bar, piece_off, piece_size, piece_val):
                continue
            for i in range(piece_size):
                self._write_byte(bar, piece_off + i, (piece_val >> (8 * i)) & 0xFF)

    def _swallowed_by_eventfd(self, bar: int, offset: int, size: int, value: int) -> bool:
        if self.current < 0:
            return False
        test = self.tests[self.current]
        if not test.has_notifier or test.type != bar or offset != test.offset or size != 1:
            return False
        return not test.match_data or value == test.data

    def _write_byte(self, bar: int, addr: int, val: int) -> None:
        # mirrors pci_testdev_write (type = the BAR: 0 MMIO, 1 port I/O)
        if addr == 0:
            self._stop()
            if val >= len(_TESTS):
                return
            t = bar * len(_TESTS) + val
            self.tests[t].count = 0
            self.current = t
            self._hdr_cache = None
            return
        if self.current < 0:
            return
        test = self.tests[self.current]
        if addr != test.offset:
            return
        if test.match_data and val != test.data:
            return
        test.count = (test.count + 1) & 0xFFFFFFFF
        self._hdr_cache = None

    def _stop(self) -> None:
        self.current = -1
        self._hdr_cache = None

    def reset(self) -> None:
        """qdev_pci_testdev_reset: stop the current test; config space is not touched."""
        self._stop()

    def status(self) -> dict[str, Any]:
        out = super().status()
        cur = self.tests[self.current] if self.current >= 0 else None
        out["test"] = None if cur is None else {"name": cur.name.decode(), "count": cur.count}
        return out
