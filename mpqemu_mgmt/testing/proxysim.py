"""ProxySim: a synchronous proxy-role mpqemu client, i.e. what ``x-pci-proxy-dev`` does, in Python.

For tests and benchmarks only. It speaks over a connected socket to any remote (stock x-remote or
ours) through :class:`~mpqemu_mgmt.remote.transport.Transport` in the proxy role, so it inherits
the one-request-outstanding rule. It probes and sizes BARs exactly as ``probe_pci_info`` in
hw/remote/proxy.c does (4 ID reads, then for BAR slots 0..6 at 0x10..0x28: read, write all-ones,
read, write back: 32 config messages), keeps track of where it programmed each BAR, and makes BAR
accesses at absolute guest addresses as ``send_bar_access_msg`` does. It must not hide failures:
a timeout or a closed remote raises :class:`~mpqemu_mgmt.errors.ProcessFailed`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from mpqemu_mgmt.closing import ClosedOnExit
from mpqemu_mgmt.errors import ProcessFailed, ProtocolError
from mpqemu_mgmt.protocol import (
    UINT64_MAX,
    BarRead,
    BarWrite,
    DeviceReset,
    Message,
    OwnedFd,
    PciConfigRead,
    PciConfigWrite,
    Ret,
    SetIrqfd,
    SyncSysmem,
    SysmemRegion,
)
from mpqemu_mgmt.remote.transport import Transport

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_CLASS_DEVICE = 0x0A
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_ID = 0x2E
PCI_NUM_REGIONS = 7  # proxy.c loops over PCI_NUM_REGIONS: slot 6 is 0x28 (CardBus CIS), not the ROM
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2


@dataclass(frozen=True, slots=True)
class ProbedBar:
    index: int
    size: int
    io: bool

    @property
    def register(self) -> int:
        return PCI_BASE_ADDRESS_0 + 4 * self.index


@dataclass(frozen=True, slots=True)
class ProbeResult:
    vendor_id: int
    device_id: int
    class_id: int
    subsystem_id: int
    bars: tuple[ProbedBar, ...]


def bar_size_from_readback(readback: int) -> int:
    """``size = (~(new_val & 0xFFFFFFF0)) + 1`` in 32-bit arithmetic (probe_pci_info)."""
    return ((~(readback & 0xFFFFFFF0)) + 1) & 0xFFFFFFFF


class ProxySim(ClosedOnExit):
    """A proxy-role client over one connected socket. Not thread-safe (neither is mpqemu)."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self.timeout = timeout
        self.transport = Transport(sock, role="proxy")
        self.bars: dict[int, ProbedBar] = {}
        self.bar_bases: dict[int, int] = {}
        self.messages = 0

    # -- one round trip --------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        """Send a message that gets no reply (SYNC_SYSMEM, SET_IRQFD)."""
        try:
            self.transport.send_message(msg)
        except OSError as exc:
            raise ProcessFailed(f"sending {msg.cmd.name} failed: {exc}") from exc
        self.messages += 1

    def request(self, msg: Message) -> Ret:
        """Send one request and block (up to ``timeout``) for its RET."""
        self.send(msg)
        try:
            reply = self.transport.read_reply()
        except TimeoutError as exc:
            raise ProcessFailed(f"remote did not answer {msg.cmd.name} within {self.timeout} s") from exc
        except OSError as exc:
            raise ProcessFailed(f"reading the reply to {msg.cmd.name} failed: {exc}") from exc
        if reply is None:
            raise ProcessFailed(f"remote closed the connection instead of answering {msg.cmd.name}")
        return reply.reply

    # -- config space --------------------------------------------------------------------------

    def config_read(self, addr: int, length: int) -> int:
        """What the proxy returns to the guest: the low 32 bits of RET (pci_proxy_read_config)."""
        return self.request(PciConfigRead(addr, length)).value & 0xFFFFFFFF

    def config_write(self, addr: int, value: int, length: int) -> Ret:
        ret = self.request(PciConfigWrite(addr, value, length))
        self._note_bar_write(addr, value, length)
        return ret

    def _note_bar_write(self, addr: int, value: int, length: int) -> None:
        if length != 4 or not PCI_BASE_ADDRESS_0 <= addr < PCI_BASE_ADDRESS_0 + 4 * PCI_NUM_REGIONS:
            return
        index = (addr - PCI_BASE_ADDRESS_0) // 4
        bar = self.bars.get(index)
        if bar is None or value == 0xFFFFFFFF:
            return
        self.bar_bases[index] = value & (0xFFFFFFFC if bar.io else 0xFFFFFFF0)

    def probe(self) -> ProbeResult:
        """Exactly the 32 config messages of probe_pci_info (hw/remote/proxy.c)."""
        vendor = self.config_read(PCI_VENDOR_ID, 2) & 0xFFFF
        device = self.config_read(PCI_DEVICE_ID, 2) & 0xFFFF
        class_id = self.config_read(PCI_CLASS_DEVICE, 2) & 0xFFFF
        subsystem = self.config_read(PCI_SUBSYSTEM_ID, 2) & 0xFFFF
        bars: list[ProbedBar] = []
        for i in range(PCI_NUM_REGIONS):
            reg = PCI_BASE_ADDRESS_0 + 4 * i
            orig = self.config_read(reg, 4)
            self.request(PciConfigWrite(reg, 0xFFFFFFFF, 4))
            readback = self.config_read(reg, 4)
            self.request(PciConfigWrite(reg, orig, 4))
            size = bar_size_from_readback(readback)
            if size:
                bars.append(ProbedBar(i, size, bool(readback & 1)))
        self.bars = {b.index: b for b in bars}
        return ProbeResult(vendor, device, class_id, subsystem, tuple(bars))

    def map_bars(self, base_mem: int = 0xFE000000, base_io: int = 0xC000) -> dict[int, int]:
        """Program every probed BAR at a naturally aligned address, then enable I/O+memory decode.

        Call :meth:`probe` first. Returns ``{bar index: base}``.
        """
        if not self.bars:
            self.probe()
        mem, io = base_mem, base_io
        for bar in sorted(self.bars.values(), key=lambda b: -b.size):
            cursor = io if bar.io else mem
            base = (cursor + bar.size - 1) // bar.size * bar.size
            self.config_write(bar.register, base, 4)
            if bar.io:
                io = base + bar.size
            else:
                mem = base + bar.size
        command = self.config_read(PCI_COMMAND, 2)
        self.config_write(PCI_COMMAND, command | PCI_COMMAND_IO | PCI_COMMAND_MEMORY, 2)
        return dict(self.bar_bases)

    # -- BARs ---------------------------------------------------------------------------------

    def bar_address(self, index: int, offset: int = 0) -> tuple[int, bool]:
        """``(absolute address, memory?)`` of ``offset`` inside BAR ``index`` as last programmed."""
        if index not in self.bar_bases:
            raise ProtocolError(f"BAR {index} was never programmed through this ProxySim", bar=index)
        return self.bar_bases[index] + offset, not self.bars[index].io

    def bar_read(self, addr: int, size: int, memory: bool = True) -> int:
        """Raw RET value of a BAR_READ at absolute ``addr`` (the guest sees it truncated to size)."""
        return self.request(BarRead(addr, size, memory)).value

    def bar_write(self, addr: int, value: int, size: int, memory: bool = True) -> Ret:
        return self.request(BarWrite(addr, value, size, memory))

    def bar_read_at(self, index: int, offset: int, size: int) -> int:
        addr, memory = self.bar_address(index, offset)
        return self.bar_read(addr, size, memory)

    def bar_write_at(self, index: int, offset: int, value: int, size: int) -> Ret:
        addr, memory = self.bar_address(index, offset)
        return self.bar_write(addr, value, size, memory)

    # -- memory, interrupts, reset ----------------------------------------------------------

    def sync_sysmem(self, regions: Sequence[SysmemRegion]) -> None:
        """Send SYNC_SYSMEM; the caller keeps owning the region fds (the peer gets duplicates)."""
        self.send(SyncSysmem(tuple(regions)))

    def set_irqfd(self) -> tuple[OwnedFd, OwnedFd]:
        """Send SET_IRQFD with two fresh eventfds; return ``(irqfd, resamplefd)``, owned by the caller."""
        irq = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), os.close)
        resample = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), os.close)
        try:
            self.send(SetIrqfd(irq, resample))
        except BaseException:
            irq.close()
            resample.close()
            raise
        return irq, resample

    def device_reset(self) -> Ret:
        return self.request(DeviceReset())

    def close(self) -> None:
        """Close the socket (the remote sees EOF and exits) and the transport's held fds."""
        self.transport.close()
        self.sock.close()


def memfd_region(size: int, gpa: int = 0, offset: int = 0, name: str = "proxysim-ram") -> SysmemRegion:
    """A fresh memfd of ``size + offset`` bytes as one SYNC_SYSMEM region at ``gpa``."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size + offset)
    except BaseException:
        os.close(fd)
        raise
    return SysmemRegion(gpa, size, offset, OwnedFd(fd, os.close))


FAILED = UINT64_MAX
