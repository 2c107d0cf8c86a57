"""Differential test: our pci-testdev against QEMU 7.2's own, through ProxySim, result by result.

Both remotes get the same fixed and random mpqemu sequences (config reads and writes, BAR accesses
of every width at absolute addresses, test selection, counters, resets, bad sizes); every RET
value is compared. The stock remote is settled first (protocol.md §4.x: 7.2 serves before its
initial machine reset, which would undo early config writes). Sequences avoid what makes the
stock remote shut itself down (config accesses with addr + 4 > 256, memory accesses outside its
BARs): those are checked separately against our remote only.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpqemu_mgmt.devices.pci_testdev import PciTestDev
from mpqemu_mgmt.protocol import UINT64_MAX, BarRead, BarWrite, PciConfigRead, PciConfigWrite
from mpqemu_mgmt.testing.builtin_remote import BuiltinRemote
from mpqemu_mgmt.testing.proxysim import ProxySim
from mpqemu_mgmt.testing.stock_remote import StockRemote, settle

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 (7.2) is not installed"
)

MEM_BASE = 0xFEB00000
IO_BASE = 0xC000


@dataclass
class Pair:
    stock: ProxySim
    ours: ProxySim

    def both(self, op: Callable[[ProxySim], object]) -> tuple[object, object]:
        return op(self.stock), op(self.ours)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    with (
        StockRemote.pair("pci-testdev", workdir=tmp_path, qmp=True) as (stock, s_sock),
        BuiltinRemote.pair("pci-testdev", workdir=tmp_path) as (_ours, o_sock),
    ):
        settle(stock)
        with ProxySim(s_sock, timeout=10) as ps, ProxySim(o_sock, timeout=10) as po:
            yield Pair(ps, po)
        assert stock.alive() or stock.proc.returncode == 0, stock.log_text()
        assert "Bad address" not in stock.log_text()


class Log:
    """Run one operation on both remotes and record any difference."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.diffs: list[str] = []
        self.count = 0

    def req(self, msg: object) -> None:
        self.count += 1
        a = self.pair.stock.request(msg).value  # type: ignore[arg-type]
        b = self.pair.ours.request(msg).value  # type: ignore[arg-type]
        if a != b:
            self.diffs.append(f"#{self.count} {msg}: stock={a:#x} ours={b:#x}")

    def check(self) -> None:
        assert self.count > 0
        assert not self.diffs, f"{len(self.diffs)} differences, first: " + "\n".join(self.diffs[:20])


def program_bars(log: Log) -> None:
    log.req(PciConfigWrite(0x10, MEM_BASE, 4))
    log.req(PciConfigWrite(0x14, IO_BASE, 4))
    log.req(PciConfigWrite(0x04, 0x0003, 2))


def bar_addr(bar: int, offset: int) -> tuple[int, bool]:
    return (MEM_BASE + offset, True) if bar == 0 else (IO_BASE + offset, False)


def test_probe_identical(pair: Pair) -> None:
    a, b = pair.both(lambda p: p.probe())
    assert a == b
    assert b.vendor_id == 0x1B36 and b.device_id == 0x0005  # type: ignore[attr-defined]


def test_config_space_dump_and_writes(pair: Pair) -> None:
    log = Log(pair)
    for size in (1, 2, 4, 3):
        for off in range(0, 253):
            log.req(PciConfigRead(off, size))
    # every dword of the config space with three patterns, then a full read-back
    for pattern in (0xFFFFFFFF, 0x00000000, 0xA55A5AA5):
        for off in range(0, 256, 4):
            log.req(PciConfigWrite(off, pattern, 4))
            log.req(PciConfigRead(off, 4))
        for off in range(0, 253):
            log.req(PciConfigRead(off, 1))
    # byte and word writes on the header (masks per byte), status W1C
    for off in range(0, 0x40):
        log.req(PciConfigWrite(off, 0xFF, 1))
        log.req(PciConfigRead(off & ~3, 4))
        log.req(PciConfigWrite(off & ~1, 0xFFFF, 2))
        log.req(PciConfigRead(off & ~3, 4))
    log.check()


def test_bar_tests_headers_and_counters(pair: Pair) -> None:
    log = Log(pair)
    program_bars(log)
    for bar in (0, 1):
        for sel in (0, 1, 2, 3, 0xFF, 0x100):
            addr, mem = bar_addr(bar, 0)
            log.req(BarWrite(addr, sel, 1, mem))
            for off in range(0, 48):
                for size in (1, 2, 4, 8):
                    a, m = bar_addr(bar, off)
                    log.req(BarRead(a, size, m))
            # the counting rules: each test offset, every width, matching and other data
            for t in range(6):
                target = (2048 if t < 3 else 128) + t
                for cbar in (0, 1):
                    if cbar == 1 and target >= 256:
                        continue
                    for size in (1, 2, 4):
                        for start in (target, target - 1, target - 2, target - 3):
                            if start < 1:
                                continue
                            for val in (0xFA, 0xCE, 0x11, 0xFAFAFAFA, 0xFA00, 0xFA0000):
                                a, m = bar_addr(cbar, start)
                                log.req(BarWrite(a, val, size, m))
            for off in (0, 4, 8, 12, 13, 14, 15, 16):
                a, m = bar_addr(bar, off)
                log.req(BarRead(a, 4, m))
    # reset stops the test; the config space is untouched (dc->reset only)
    log.req(BarWrite(MEM_BASE, 0, 1, True))
    log.req(BarWrite(MEM_BASE + 2048, 0xFA, 1, True))
    log.count += 1
    a, b = pair.both(lambda p: p.device_reset().value)
    assert a == b
    for off in (0x04, 0x10, 0x14):
        log.req(PciConfigRead(off, 4))
    log.req(BarRead(MEM_BASE, 4, True))
    log.req(BarRead(MEM_BASE + 12, 4, True))
    # bad sizes answer UINT64_MAX without effect
    for size in (0, 3, 5, 16):
        log.req(BarRead(MEM_BASE, size, True))
        log.req(BarWrite(MEM_BASE, 1, size, True))
    # unassigned I/O ports read as all-ones and swallow writes
    for size in (1, 2, 4):
        log.req(BarRead(0x5000, size, False))
        log.req(BarWrite(0x5000, 0x1234, size, False))
    log.check()


def random_ops(seed: int, n: int) -> Iterator[object]:
    rng = random.Random(seed)
    for _ in range(n):
        kind = rng.random()
        if kind < 0.15:
            size = rng.choice((1, 2, 4))
            yield PciConfigRead(rng.randrange(0, 253), size)
        elif kind < 0.25:
            # anywhere but the command register and the BARs, which would make the stock remote
            # shut down on its next memory access
            off = rng.choice([o for o in range(0, 253) if not (0x04 <= o < 0x08 or 0x0D <= o < 0x28)])
            size = rng.choice((1, 2, 4))
            if (off + size > 0x04 and off < 0x08) or (off + size > 0x10 and off < 0x28):
                size = 1
            yield PciConfigWrite(off, rng.getrandbits(32), size)
        elif kind < 0.27:
            yield "reset"
        else:
            bar = rng.choice((0, 1))
            bsize = 4096 if bar == 0 else 256
            size = rng.choice((1, 1, 2, 4, 8, 3))
            r = rng.random()
            if r < 0.2:
                off = 0
            elif r < 0.6:
                t = rng.randrange(6)
                off = (2048 if t < 3 else 128) + t - rng.randrange(0, 4)
            else:
                off = rng.randrange(0, bsize)
            if off + size > bsize or off < 0:
                off = max(0, bsize - 8)
            addr, mem = bar_addr(bar, off)
            if rng.random() < 0.5:
                yield BarRead(addr, size, mem)
            else:
                val = rng.choice((0, 1, 2, 3, 4, 0xFA, 0xCE, rng.getrandbits(8 * min(size, 8))))
                yield BarWrite(addr, val, size, mem)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_sequences(pair: Pair, seed: int) -> None:
    log = Log(pair)
    program_bars(log)
    for op in random_ops(seed, 1500):
        if op == "reset":
            log.count += 1
            a, b = pair.both(lambda p: p.device_reset().value)
            assert a == b
        else:
            log.req(op)
    log.check()


def test_ours_survives_what_kills_stock(tmp_path: Path) -> None:
    """The accesses the stock remote answers with UINT64_MAX *and a shutdown*: ours keeps serving."""
    with BuiltinRemote.pair("pci-testdev", workdir=tmp_path) as (ours, sock), ProxySim(sock) as px:
        assert px.config_read(0xFF, 1) == 0  # stock: "Bad address for PCI config read"
        assert px.request(PciConfigRead(0xFE, 4)).value == UINT64_MAX
        assert px.request(BarRead(0xDEAD0000, 4, True)).value == UINT64_MAX  # stock: shuts down
        assert px.request(PciConfigRead(0, 9)).value == UINT64_MAX
        assert px.request(BarRead(0x10000, 1, False)).value == UINT64_MAX  # no port above 64 KiB
        assert px.config_read(0, 4) == 0x00051B36
        assert ours.alive()
    assert ours.wait(5) == 0


def moving_ops(seed: int, n: int) -> Iterator[object]:
    """Random sequences that also move BARs and flip decode bits.

    A pure mirror of the config space (our ConfigSpace, fed the same writes) says where each BAR
    decodes right now, so memory accesses only go where the stock remote has a BAR (anything else
    makes it shut down); whether we decode the same way is what the comparison then checks, through
    the BAR reads' results.
    """
    rng = random.Random(seed)
    mirror = PciTestDev()
    for op in (PciConfigWrite(0x10, MEM_BASE, 4), PciConfigWrite(0x14, IO_BASE, 4), PciConfigWrite(4, 3, 2)):
        mirror.config_write(op.addr, op.length, op.value)
        yield op
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            off = rng.choice((0x10, 0x14, 0x10, 0x14, 0x11, 0x15, 0x12))
            size = 4 if off in (0x10, 0x14) else 1
            val = rng.choice(
                (
                    rng.randrange(0xE0000000, 0xFEFFF000) & ~0xFFF,
                    rng.randrange(0x1000, 0xFF00) & ~0xFF,
                    0,
                    0xFFFFFFFF,
                    rng.getrandbits(32),
                )
            )
            op = PciConfigWrite(off, val, size)
        elif r < 0.15:
            op = PciConfigWrite(4, rng.choice((0, 1, 2, 3, 0x403, 0xFFFF)), rng.choice((1, 2)))
        elif r < 0.25:
            op = PciConfigRead(rng.choice((0x04, 0x06, 0x10, 0x14, 0x11, 0x16)), rng.choice((1, 2, 4)))
        else:
            bar = rng.choice((0, 1))
            win = mirror.config.window(bar)
            size = rng.choice((1, 2, 4))
            if win is not None and not win.memory and win.base + win.size > 0x10000:
                win = None  # an I/O BAR above 64 KiB decodes nowhere (QEMU's io region ends there)
            if win is None:
                if bar == 0:
                    continue  # memory that decodes nowhere: the stock remote would stop
                addr = IO_BASE + rng.randrange(0, 256 - 4)  # unassigned I/O reads all-ones
            else:
                t = rng.randrange(6)
                off = rng.choice((0, 4, 8, 12, rng.randrange(0, win.size - 4), (2048 if t < 3 else 128) + t))
                addr = win.base + min(off, win.size - size)
            mem = bar == 0
            if rng.random() < 0.5:
                op = BarRead(addr, size, mem)
            else:
                op = BarWrite(addr, rng.choice((0, 1, 2, 0xFA, 0xCE, rng.getrandbits(8 * size))), size, mem)
        if isinstance(op, PciConfigWrite):
            mirror.config_write(op.addr, op.length, op.value)
        yield op


@pytest.mark.parametrize("seed", [11, 12])
def test_random_sequences_with_bar_moves(pair: Pair, seed: int) -> None:
    log = Log(pair)
    for op in moving_ops(seed, 1500):
        log.req(op)
    log.check()
