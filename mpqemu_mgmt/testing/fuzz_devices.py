"""Guest-controlled fuzz campaign for the in-tree device models, through the mpqemu dispatcher.

    python -m mpqemu_mgmt.testing.fuzz_devices [--model M ...] [--accesses N] [--seed S]

For each model (default: every model in the catalogue), ``N`` (default 100,000) random accesses go
through :class:`~mpqemu_mgmt.remote.dispatch.MpqemuDispatcher` exactly as decoded mpqemu messages
would: config reads and writes (any offset, any length, BARs and the command register included),
BAR reads and writes at absolute addresses (mostly inside the programmed windows, sometimes
anywhere), every access size including invalid ones, device resets, re-syncs of guest RAM
(including regions that claim more than their memfd holds), and — for edu — DMA programming with
random addresses and counts biased to the edges of guest RAM and of the device buffer. A manual
clock runs the models' timers so DMA completes.

Checked after every access:

* no exception escapes a model (the dispatcher reports any non-MpqemuError as "device model bug");
* every guest-RAM access the model makes lies inside a mapped region (checked before it happens);
* the bytes *around* every region, in the same memfd, are never modified (canary pages, checked
  every 64 accesses and at the end);
* the identity registers and the interrupt pin never change; every RET fits in 64 bits.

The test suite runs a slice (a few thousand accesses per model). This module is a test tool: it
may create memfds and temporary files, and must not be imported by production code.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mpqemu_mgmt.devices import catalogue
from mpqemu_mgmt.devices.base import DeviceHost, PciDeviceModel
from mpqemu_mgmt.errors import MpqemuError
from mpqemu_mgmt.pci import regs
from mpqemu_mgmt.protocol import (
    UINT64_MAX,
    BarRead,
    BarWrite,
    DeviceReset,
    Message,
    OwnedFd,
    PciConfigRead,
    PciConfigWrite,
    SyncSysmem,
    SysmemRegion,
)
from mpqemu_mgmt.remote.dispatch import MpqemuDispatcher
from mpqemu_mgmt.remote.memory import MappedGuestMemory
from mpqemu_mgmt.remote.timers import TimerQueue

GUARD = 4096  # canary bytes before and after each region, inside the same memfd
CANARY = bytes((i * 7 + 0x5A) & 0xFF for i in range(GUARD))
RAM_LAYOUT = ((0x0, 0xA0000), (0x100000, 0x300000))  # a small "pc": low RAM, a hole, high RAM
MEM_BASE, IO_BASE = 0xFE000000, 0xC000
# Register offsets worth hitting often: every dword of the first 0xa0 bytes (edu's registers,
# pci-testdev's header) and pci-testdev's counting offsets (2048 + t, 128 + t).
_INTERESTING = [
    *range(0, 0xA0, 4),
    *range(0, 0x20),
    *(2048 + t for t in range(3)),
    *(128 + t for t in range(3, 6)),
]


class FuzzFailure(AssertionError):
    """An invariant was broken (the campaign's only failure type)."""


class _Memfd:
    """One guest-RAM region in its own memfd, framed by canary pages."""

    def __init__(self, gpa: int, size: int) -> None:
        self.gpa, self.size = gpa, size
        self.fd = os.memfd_create(f"fuzz-ram-{gpa:x}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, GUARD + size + GUARD)
        os.pwrite(self.fd, CANARY, 0)
        os.pwrite(self.fd, CANARY, GUARD + size)

    def region(self) -> SysmemRegion:
        return SysmemRegion(self.gpa, self.size, GUARD, OwnedFd(os.dup(self.fd), os.close))

    def canaries_intact(self) -> bool:
        return os.pread(self.fd, GUARD, 0) == CANARY and os.pread(self.fd, GUARD, GUARD + self.size) == CANARY

    def close(self) -> None:
        os.close(self.fd)


class CheckedMemory:
    """GuestMemory that refuses to let a model reach past guest RAM, checked before the access."""

    def __init__(self, inner: MappedGuestMemory) -> None:
        self.inner = inner
        self.accesses = 0

    def _check(self, gpa: int, length: int) -> None:
        # The model may ask for anything; the memory must refuse what is outside (DmaError). This
        # re-checks independently that whatever is *allowed* lies inside one of the known regions.
        if length == 0:
            return
        for start, size in RAM_LAYOUT:
            if start <= gpa and gpa + length <= start + size:
                return
        if self.inner.contains(gpa, length):
            raise FuzzFailure(f"guest memory allowed {gpa:#x}+{length:#x} outside guest RAM")

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        self.accesses += 1
        return self.inner.read(gpa, length)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._check(gpa, len(data))
        self.accesses += 1
        self.inner.write(gpa, data)

    def view(self, gpa: int, length: int) -> memoryview:
        self._check(gpa, length)
        self.accesses += 1
        return self.inner.view(gpa, length)


class _NullIrq:
    def __init__(self) -> None:
        self.level = False
        self.edges = 0
        self.resample_fileno = None
        self.attached = False

    def set_level(self, level: bool) -> None:
        if level and not self.level:
            self.edges += 1
        self.level = level

    def attach(self, irqfd: OwnedFd, resamplefd: OwnedFd) -> None:
        irqfd.close()
        resamplefd.close()


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Result:
    model: str
    accesses: int = 0
    dma_accesses: int = 0
    model_errors: int = 0
    irq_edges: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"{self.model}: {self.accesses} accesses, {self.dma_accesses} guest-RAM accesses by the model, "
            f"{self.model_errors} refused accesses, {self.irq_edges} IRQ edges, {self.seconds:.1f} s"
            + (f", DMA {self.status['dma']}" if "dma" in self.status else "")
            + ": OK"
        )


def _edge_values(rng: random.Random, edges: list[int]) -> int:
    base = rng.choice(edges)
    return max(0, base + rng.choice((-4096, -16, -8, -1, 0, 0, 1, 8, 4095)))


def _messages(rng: random.Random, model: PciDeviceModel, ram: list[_Memfd]) -> Iterator[Message | str]:
    bars = model.config.bars
    ram_edges = [0, 0xA0000, 0x100000, 0x400000, 1 << 28, (1 << 28) - 1, 1 << 32, UINT64_MAX]
    while True:
        r = rng.random()
        if r < 0.12:
            yield PciConfigRead(rng.randrange(0, 0x110), rng.choice((1, 2, 4, 4, 3, 0, 8)))
        elif r < 0.24:
            off = rng.choice((regs.COMMAND, 0x10, 0x14, 0x18, 0x30, rng.randrange(0, 0x110)))
            val = rng.choice((0xFFFFFFFF, 0, 0x7, 0x407, MEM_BASE, IO_BASE, rng.getrandbits(32)))
            yield PciConfigWrite(off, val, rng.choice((1, 2, 4, 4, 3, 0)))
        elif r < 0.25:
            yield "reset"
        elif r < 0.26:
            yield "sync"
        elif r < 0.29:
            yield "restore"  # program the BARs and decode again so BAR traffic keeps flowing
        elif r < 0.34:
            yield "tick"
        elif r < 0.37 and bars and bars.get(0) is not None and bars[0].kind.is_memory:
            # a whole DMA programming sequence (edu's 0x80 src, 0x88 dst, 0x90 count, 0x98 cmd),
            # addresses at the edges of guest RAM and of the device buffer, then time passes
            ram_side = _edge_values(rng, ram_edges) if rng.random() < 0.5 else rng.randrange(0, 0x400000)
            dev_side = _edge_values(rng, [0x40000, 0x40800, 0x41000])
            to_ram = rng.random() < 0.5
            src, dst = (dev_side, ram_side) if to_ram else (ram_side, dev_side)
            cnt = rng.choice((0, 1, 16, 2048, 4096, 4097, rng.randrange(0, 0x2000), rng.getrandbits(64)))
            cmd = rng.choice((1, 5)) | (2 if to_ram else 0)
            for off, val in ((0x80, src), (0x88, dst), (0x90, cnt), (0x98, cmd)):
                yield BarWrite(MEM_BASE + off, val, 8, True)
            yield "tick100"
        else:
            size = rng.choice((1, 2, 4, 4, 4, 8, 3, 0, 16))
            if bars and rng.random() < 0.95:
                spec = bars[rng.choice(list(bars))]
                mem = spec.kind.is_memory
                base = MEM_BASE + spec.index * 0x100000 if mem else IO_BASE + spec.index * 0x100
                pick = rng.random()
                if pick < 0.6:
                    off = rng.choice(_INTERESTING) & ~(max(1, min(size, 8)) - 1)
                elif pick < 0.8:
                    off = rng.randrange(0, min(spec.size, 0x1000))
                else:
                    off = rng.randrange(0, spec.size)
                off = min(off, spec.size - 1)
                addr = base + off
            else:
                mem = rng.random() < 0.5
                addr = rng.getrandbits(rng.choice((16, 32, 64)))
            if rng.random() < 0.45:
                yield BarRead(addr, size, mem)
            else:
                val = rng.choice(
                    (
                        rng.getrandbits(64),
                        0,
                        1,
                        0xFA,
                        _edge_values(rng, ram_edges),
                        _edge_values(rng, [0x40000, 0x41000]),
                        rng.randrange(0, 0x2000),
                        7,
                        5,
                        3,
                    )
                )
                yield BarWrite(addr, val, size, mem)


def _program(disp: MpqemuDispatcher, model: PciDeviceModel) -> None:
    for spec in model.config.bars.values():
        base = MEM_BASE + spec.index * 0x100000 if spec.kind.is_memory else IO_BASE + spec.index * 0x100
        disp.handle(PciConfigWrite(regs.bar_offset(spec.index), base, 4))
    disp.handle(PciConfigWrite(regs.COMMAND, 0x7, 2))


def fuzz_model(name: str, accesses: int, seed: int) -> Result:
    rng = random.Random(f"{name}:{seed}")
    ram = [_Memfd(gpa, size) for gpa, size in RAM_LAYOUT]
    problems: list[str] = []
    memory = MappedGuestMemory()
    checked = CheckedMemory(memory)
    irq = _NullIrq()
    clock = _Clock()
    timers = TimerQueue(clock, on_error=lambda exc: problems.append(f"device model bug in a timer: {exc!r}"))
    backing = tempfile.TemporaryFile() if name == "virtio-blk" else None  # noqa: SIM115 - closed below
    if backing is not None:
        backing.truncate(1 << 20)
    guest_errors = [0]

    def guest_error(_m: str) -> None:
        guest_errors[0] += 1

    def log(message: str) -> None:
        if "device model bug" in message:
            problems.append(message)

    try:
        host = DeviceHost(memory=checked, irq=irq, timers=timers, backing=backing, guest_error=guest_error)
        model = catalogue.create(name, host)
        disp = MpqemuDispatcher(model, memory, irq, log)  # type: ignore[arg-type]
        ident = model.config_read(0, 4), model.config_read(regs.INTERRUPT_PIN, 1)
        disp.handle(SyncSysmem(tuple(m.region() for m in ram)))
        _program(disp, model)
        result = Result(name)
        start = time.monotonic()
        gen = _messages(rng, model, ram)
        i = 0
        while result.accesses < accesses:
            i += 1
            op = next(gen)
            if op == "reset":
                msg: Message = DeviceReset()
            elif op in ("tick", "tick100"):
                clock.now += 0.1 if op == "tick100" else rng.choice((0.0, 0.05, 0.1, 0.2))
                timers.run_due()
                continue
            elif op == "restore":
                _program(disp, model)
                continue
            elif op == "sync":
                regions = [m.region() for m in ram]
                if rng.random() < 0.3:
                    # claims more than the memfd holds: must be refused, never mapped (SIGBUS)
                    good = regions[0]
                    regions[0] = SysmemRegion(good.gpa, good.size + 0x100000, good.offset, good.fd)
                    for extra in regions[1:]:
                        extra.fd.close()
                    regions = regions[:1]
                msg = SyncSysmem(tuple(regions))
            else:
                assert not isinstance(op, str)
                msg = op
            ret = disp.handle(msg)
            if ret is not None and not 0 <= ret.value <= UINT64_MAX:
                raise FuzzFailure(f"{name}: RET out of range for {msg}")
            if op == "sync":
                # put the real map back so DMA keeps finding RAM
                disp.handle(SyncSysmem(tuple(m.region() for m in ram)))
            if problems:
                raise FuzzFailure(f"{name}: access #{i} {msg}: {problems[0]}")
            if i % 64 == 0 or isinstance(msg, BarWrite):
                if i % 64 == 0 and not all(m.canaries_intact() for m in ram):
                    raise FuzzFailure(f"{name}: bytes outside guest RAM changed by access #{i} {msg}")
                if (model.config_read(0, 4), model.config_read(regs.INTERRUPT_PIN, 1)) != ident:
                    raise FuzzFailure(f"{name}: identity registers changed by access #{i} {msg}")
            result.accesses += 1
        clock.now += 1.0
        timers.run_due()
        if problems:
            raise FuzzFailure(f"{name}: {problems[0]}")
        if not all(m.canaries_intact() for m in ram):
            raise FuzzFailure(f"{name}: bytes outside guest RAM changed")
        result.seconds = time.monotonic() - start
        result.dma_accesses = checked.accesses
        result.model_errors = disp.errors
        result.irq_edges = irq.edges
        result.counts = disp.message_counts()
        result.status = model.status()
        return result
    finally:
        memory.close()
        for m in ram:
            m.close()
        if backing is not None:
            backing.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mpqemu_mgmt.testing.fuzz_devices", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", action="append", help="model to fuzz (repeatable; default: all)")
    p.add_argument("--accesses", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    models = args.model or catalogue.names()
    failed = 0
    for name in models:
        try:
            res = fuzz_model(name, args.accesses, args.seed)
        except (FuzzFailure, MpqemuError) as exc:
            print(f"{name}: FAILED: {exc}")
            failed += 1
            continue
        print(res.line())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
