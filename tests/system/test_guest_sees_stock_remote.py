"""The first real-guest test: a stock ``-machine x-remote -device pci-testdev`` behind
``x-pci-proxy-dev`` is seen by a Linux guest (TCG) as 1b36:0005 with BAR0 4 KiB memory and BAR1
256 B I/O, read from the guest's /sys/bus/pci (issue 2 item 6). Also: the same remote from QEMU 11.1
behind the 7.2 proxy, and what QEMU 11.1's own proxy does under TCG.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mpqemu_mgmt.errors import ProcessFailed
from mpqemu_mgmt.guestkit.boot import BootResult, boot_script
from mpqemu_mgmt.guestkit.kernel import Kernel
from mpqemu_mgmt.guestkit.pcilist import IORESOURCE_IO, IORESOURCE_MEM, by_ids, parse_pci_listing
from mpqemu_mgmt.guestkit.qemu11 import Qemu11
from mpqemu_mgmt.guestkit.qemu_argv import ProxyDevice
from mpqemu_mgmt.guestkit.scripts import guest_script
from mpqemu_mgmt.testing.stock_remote import StockRemote

BOOT_BUDGET_S = 10.0  # issue 2: boot to script completion under 10 s here


def _boot_behind_proxy(
    kernel: Kernel, remote_cmd: list[str] | str, workdir: Path, prefix: list[str] | None = None
) -> tuple[BootResult, str]:
    with StockRemote.pair("pci-testdev,id=t0", workdir=workdir, qemu_binary=remote_cmd) as (remote, sock):
        result = boot_script(
            kernel,
            guest_script("pci_list.sh"),
            proxies=[ProxyDevice("t0", sock.fileno())],
            qemu_argv_prefix=prefix or (),
            timeout=60,
        )
        log = remote.log_text()
    assert remote.proc.poll() is not None, "the remote outlived its proxy"
    return result, log


def _processes_with(needle: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(pid))
    return found


def _assert_pci_testdev_seen(result: BootResult) -> None:
    assert result.status == 0, result.transcript
    found = by_ids(parse_pci_listing(result.transcript), 0x1B36, 0x0005)
    assert len(found) == 1, result.transcript
    dev = found[0]
    assert dev.pci_class >> 8 == 0x00FF  # "other" (hw/misc/pci-testdev.c)
    assert set(dev.bars) == {0, 1}, dev.bars
    assert dev.bars[0].size == 4096 and dev.bars[0].flags & IORESOURCE_MEM
    assert not dev.bars[0].flags & IORESOURCE_IO
    assert dev.bars[1].size == 256 and dev.bars[1].flags & IORESOURCE_IO


def test_guest_sees_stock_pci_testdev(guest_kernel: Kernel, qemu72: str, tmp_path: Path) -> None:
    result, log = _boot_behind_proxy(guest_kernel, qemu72, tmp_path)
    _assert_pci_testdev_seen(result)
    print(f"boot to script completion: {result.elapsed:.2f} s (QEMU exited after {result.total:.2f} s)")
    assert result.elapsed < BOOT_BUDGET_S
    assert "Failed to perform PCI" not in result.stderr + log
    # boot() kills QEMU's whole process group on the way out; nothing with this boot's nonce remains.
    nonce = next(a for a in result.argv if "guestkit.nonce=" in a).split("guestkit.nonce=")[1].split()[0]
    assert _processes_with(nonce) == []


def test_guest_sees_qemu11_remote_behind_72_proxy(
    guest_kernel: Kernel, qemu72: str, qemu11: Qemu11, tmp_path: Path
) -> None:
    # The remote side of mpqemu on 11.1 speaks the same protocol as 7.2's (issue 9).
    result, log = _boot_behind_proxy(guest_kernel, qemu11.command(binds=[tmp_path]), tmp_path)
    _assert_pci_testdev_seen(result)
    assert "Failed to perform PCI" not in result.stderr + log


def test_qemu11_proxy_under_tcg(guest_kernel: Kernel, qemu11: Qemu11, tmp_path: Path) -> None:
    """QEMU 11.1.3's own x-pci-proxy-dev under TCG.

    Seen here: it dies with SIGSEGV while realizing the proxy (kernel log: "segfault at 38" in
    qemu-system-x86_64), with a 7.2 or an 11.1 remote, before the guest runs; with -accel kvm it
    does not. The proxy's setup_irqfd/proxy_intx_update call kvm_irqchip_add_irqfd_notifier_gsi(
    kvm_state, …) unconditionally (hw/remote/proxy.c); kvm_state is NULL under TCG (a reading of the
    source, not a backtrace). Marked xfail with
    that reason while it happens; it passes (and checks the device) once QEMU stops crashing.
    """
    try:
        result, _log = _boot_behind_proxy(
            guest_kernel, qemu11.command(binds=[tmp_path]), tmp_path, prefix=qemu11.argv_prefix([tmp_path])
        )
    except ProcessFailed as exc:
        rc = exc.details.get("returncode")
        if rc in (139, -11) and not exc.details.get("transcript"):
            pytest.xfail(f"QEMU {qemu11.version_text} x-pci-proxy-dev segfaults at realize under TCG "
                         f"(exit {rc}, no guest output)")
        raise
    _assert_pci_testdev_seen(result)
