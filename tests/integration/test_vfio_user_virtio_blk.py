"""Our virtio-blk over vfio-user: the Python legacy virtio-blk driver (the guest's part) speaks to the
server through vfio-user region accesses, guest RAM is a memfd shared by DMA_MAP, and completions
arrive as INTx on the trigger eventfd with QEMU's EOI-then-unmask cycle. The backing file is checked
on the host."""

from __future__ import annotations

import mmap
import os
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpqemu_mgmt.remote.vfio_user_serve import serve_vfio_user
from mpqemu_mgmt.testing.vfio_user_client import VfioUserClient
from mpqemu_mgmt.testing.virtio_driver import GuestRam, VirtioBlkDriver

RAM = 4 << 20
DISK = 8 << 20


class VfioUserBus:
    """The LegacyBus of the test driver over vfio-user BAR0, INTx EOI as QEMU does it.

    hw/vfio/pci.c: every region access first runs vfio_pci_intx_eoi, which (if an interrupt is
    pending) deasserts the pin and sends SET_IRQS(UNMASK).
    """

    def __init__(self, client: VfioUserClient, efd: int) -> None:
        self.c = client
        self.efd = efd
        self.pending = False
        self.interrupts = 0

    def _eoi(self) -> None:
        if self.pending:
            self.pending = False
            self.c.unmask_intx()

    def read(self, offset: int, size: int) -> int:
        self._eoi()
        return self.c.read(0, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._eoi()
        self.c.write(0, offset, size, value, posted=True)  # QEMU posts BAR writes by default

    def wait_interrupt(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.efd], [], [], timeout)
        if not ready:
            return False
        os.read(self.efd, 8)
        self.pending = True
        self.interrupts += 1
        return True


@pytest.fixture
def blk(tmp_path: Path) -> Iterator[tuple[VirtioBlkDriver, VfioUserBus, Path]]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * DISK)
    backing = open(disk, "r+b", buffering=0)  # noqa: SIM115 - handed to the server, closed below
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["rc"] = serve_vfio_user(ours, "virtio-blk", backing=backing)
        except Exception as exc:
            result["exc"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    theirs.settimeout(10)
    client = VfioUserClient(theirs)
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(memfd, RAM)
    ram = mmap.mmap(memfd, RAM, mmap.MAP_SHARED)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    gram: GuestRam | None = None
    try:
        client.handshake()
        assert client.config_read(0, 4) == 0x10011AF4  # 1af4:1001 legacy virtio-blk
        assert client.region_info(0).size == 128
        client.map_fd(0, RAM, memfd)
        client.set_intx_eventfd(efd)
        client.config_write(0x04, 2, 0x1 | 0x4)  # I/O decode + bus master
        bus = VfioUserBus(client, efd)
        gram = GuestRam(ram)
        driver = VirtioBlkDriver(bus, gram)
        driver.init()
        yield driver, bus, disk
    finally:
        client.close()
        thread.join(10)
        assert not thread.is_alive() and result.get("rc") == 0, result
        ours.close()
        backing.close()
        os.close(efd)
        os.close(memfd)
        if gram is not None:
            gram.release()
        ram.close()


def test_write_read_flush_reach_the_backing_file(blk: tuple[VirtioBlkDriver, VfioUserBus, Path]) -> None:
    driver, bus, disk = blk
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(64 * 1024))
    assert driver.write(2048, pattern).status == 0
    assert driver.flush().status == 0
    got = driver.read(2048, len(pattern))
    assert got.status == 0 and got.data == pattern
    with open(disk, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(len(pattern)) == pattern
    # completions may be reaped before their interrupt is waited for; at least one must come
    assert bus.interrupts >= 1 and driver.interrupts == bus.interrupts


def test_many_requests_keep_interrupts_flowing(blk: tuple[VirtioBlkDriver, VfioUserBus, Path]) -> None:
    driver, bus, disk = blk
    for i in range(50):
        data = bytes([i]) * 4096
        assert driver.write(i * 8, data).status == 0
        assert driver.read(i * 8, 4096).data == data
    # a broken automask/unmask cycle would stop after the first interrupt
    assert bus.interrupts >= 10, bus.interrupts
    raw = disk.read_bytes()
    assert all(raw[i * 4096 : (i + 1) * 4096] == bytes([i]) * 4096 for i in range(50))
