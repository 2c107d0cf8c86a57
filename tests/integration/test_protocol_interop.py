"""ProxySim against stock QEMU 7.2 ``-machine x-remote`` (pci-testdev, lsi53c895a).

Config space, BAR probing (the 32 messages of probe_pci_info), BAR reads/writes (pci-testdev's
test header and counter), SYNC_SYSMEM/SET_IRQFD acceptance, reset, and the stock remote's own
shutdown behaviour on bad input (which our remote must answer instead).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpqemu_mgmt.errors import ProcessFailed
from mpqemu_mgmt.protocol import UINT64_MAX, PciConfigRead
from mpqemu_mgmt.testing.proxysim import ProbedBar, ProxySim, memfd_region
from mpqemu_mgmt.testing.stock_remote import StockRemote, settle

pytestmark = pytest.mark.timeout(60)

if shutil.which("qemu-system-x86_64") is None:  # pragma: no cover - the dev image has it
    pytest.skip("qemu-system-x86_64 (7.2) is not installed", allow_module_level=True)


def spawn(device: str, tmp_path: Path) -> Iterator[tuple[StockRemote, ProxySim]]:
    with StockRemote.pair(device, workdir=tmp_path, qmp=True) as (remote, sock):
        settle(remote)
        sim = ProxySim(sock, timeout=10)
        yield remote, sim
        sim.close()


@pytest.fixture
def testdev(tmp_path: Path) -> Iterator[tuple[StockRemote, ProxySim]]:
    yield from spawn("pci-testdev,id=t0", tmp_path)


@pytest.fixture
def lsi(tmp_path: Path) -> Iterator[tuple[StockRemote, ProxySim]]:
    yield from spawn("lsi53c895a,id=lsi0", tmp_path)


def test_pci_testdev_probe_config_and_reset(testdev: tuple[StockRemote, ProxySim]) -> None:
    remote, sim = testdev
    probe = sim.probe()
    assert sim.messages == 32  # 4 ID reads + 7 BAR slots x 4 (probe_pci_info)
    ids = (probe.vendor_id, probe.device_id, probe.class_id, probe.subsystem_id)
    assert ids == (0x1B36, 0x0005, 0x00FF, 0x1100)
    assert probe.bars == (ProbedBar(0, 4096, False), ProbedBar(1, 256, True))
    # The probe wrote the original values back: BARs read 0 again.
    assert sim.config_read(0x10, 4) == 0 and sim.config_read(0x14, 4) == 1
    bases = sim.map_bars(base_mem=0xFE000000, base_io=0xC000)
    assert bases == {0: 0xFE000000, 1: 0xC000}
    assert sim.config_read(0x10, 4) == 0xFE000000
    assert sim.config_read(0x14, 4) == 0xC001
    assert sim.config_read(0x04, 2) & 0x3 == 0x3
    assert sim.config_read(0x3D, 1) == 0  # pci-testdev has no interrupt pin
    # A 3-byte read is served (len is not checked by QEMU): low three bytes of vendor+device.
    assert sim.config_read(0x00, 3) == 0x051B36
    assert sim.device_reset().value == 0
    assert remote.alive()


def test_pci_testdev_bar_header_and_counter(testdev: tuple[StockRemote, ProxySim]) -> None:
    remote, sim = testdev
    sim.map_bars()
    assert sim.bar_read_at(0, 0, 4) == 0  # no test selected
    sim.bar_write_at(0, 0, 0, 1)  # BAR0 offset 0 <- 0: select test 0 (mmio-no-eventfd)
    header = bytes(sim.bar_read_at(0, i, 1) for i in range(32))
    assert header[0] == 0 and header[1] == 1
    assert int.from_bytes(header[4:8], "little") == 2048
    assert header[8] == 0xFA
    assert header[16:32] == b"mmio-no-eventfd\0"
    # Wider reads are assembled from bytes by the device (impl 1..1), little-endian.
    assert sim.bar_read_at(0, 4, 4) == 2048
    sim.bar_write_at(0, 2048, 0xFA, 1)
    sim.bar_write_at(0, 2048, 0x11, 1)  # wrong data: not counted
    sim.bar_write_at(0, 2048, 0xFA, 1)
    assert sim.bar_read_at(0, 12, 4) == 2
    # The selected test is global: BAR1 shows it too.
    assert sim.bar_read_at(1, 16, 1) == ord("m")
    # Port I/O test 3 through BAR1.
    sim.bar_write_at(1, 0, 0, 1)
    assert sim.bar_read_at(1, 0, 1) == 3
    assert sim.bar_read_at(1, 4, 4) == 128 + 3
    sim.device_reset()
    assert sim.bar_read_at(0, 0, 4) == 0  # reset stops the test
    assert remote.alive()


def test_stock_remote_accepts_memory_and_irqfds(testdev: tuple[StockRemote, ProxySim]) -> None:
    remote, sim = testdev
    region = memfd_region(1 << 20)
    sim.sync_sysmem([region])
    region.fd.close()
    irq, resample = sim.set_irqfd()
    assert sim.config_read(0x00, 2) == 0x1B36  # still serving after the two notices
    mtree = remote.qmp_command("human-monitor-command", **{"command-line": "info mtree -f"})
    assert "remote-mem-0" in mtree
    irq.close()
    resample.close()


def test_lsi53c895a_probe_and_registers(lsi: tuple[StockRemote, ProxySim]) -> None:
    remote, sim = lsi
    probe = sim.probe()
    assert (probe.vendor_id, probe.device_id) == (0x1000, 0x0012)
    assert probe.class_id == 0x0100  # SCSI storage
    assert probe.bars == (ProbedBar(0, 256, True), ProbedBar(1, 1024, False), ProbedBar(2, 8192, False))
    assert sim.config_read(0x3D, 1) == 1  # INTA
    bases = sim.map_bars()
    # The same register file through the I/O BAR and the MMIO BAR: SCNTL0 resets to 0xc0 and
    # CTEST1 reads 0xf0 (hw/scsi/lsi53c895a.c).
    assert sim.bar_read(bases[0] + 0x00, 1, memory=False) == 0xC0
    assert sim.bar_read(bases[1] + 0x00, 1, memory=True) == 0xC0
    # A scratch register round-trips (SCRATCHA at 0x34).
    sim.bar_write(bases[1] + 0x34, 0xA5A5A5A5, 4, memory=True)
    assert sim.bar_read(bases[1] + 0x34, 4, memory=True) == 0xA5A5A5A5
    sim.device_reset()
    assert sim.bar_read(bases[1] + 0x34, 4, memory=True) == 0
    assert remote.alive()


def test_stock_remote_shuts_down_on_a_bad_bar_address(testdev: tuple[StockRemote, ProxySim]) -> None:
    # protocol.md §3.4: unassigned memory answers UINT64_MAX and the stock remote exits.
    remote, sim = testdev
    assert sim.bar_read(0xDEAD0000, 4, memory=True) == UINT64_MAX
    assert remote.wait(10) == 0
    assert "Bad address" in remote.log_text()


def test_stock_remote_exits_on_eof(tmp_path: Path) -> None:
    with StockRemote.pair("pci-testdev", workdir=tmp_path) as (remote, sock):
        sim = ProxySim(sock)
        assert sim.config_read(0, 2) == 0x1B36
        sim.close()
        assert remote.wait(10) == 0


def test_stock_remote_rejects_config_beyond_256_minus_4(testdev: tuple[StockRemote, ProxySim]) -> None:
    # Stock quirk (protocol.md §3.3): addr + 4 > 256 fails even for a 1-byte read, then it exits.
    remote, sim = testdev
    assert sim.request(PciConfigRead(0xFD, 1)).value == UINT64_MAX
    assert remote.wait(10) == 0
    with pytest.raises(ProcessFailed):
        sim.config_read(0, 2)
