"""The PCI-watching test guest: it shows on its serial console what PCI functions it sees.

Debian's cloud kernel with a busybox initramfs running ``scripts/pci_watch.sh``, which prints
``PCISET <bdf>=<vendor>:<device> ...`` once and again whenever the guest's PCI functions change;
``mpqemu-mgmt demo`` and the driver and fault system tests read those lines from the console log
after each plug, unplug and replug. :func:`parse_pci_sets` is pure; the IO edge is
:func:`read_pci_sets` (reads the log), :func:`watch_images` (fetches the kernel, builds the image)
and :func:`place_images` (copies both where QEMU can read them). Nothing here starts QEMU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mpqemu_mgmt.guestkit.initramfs import GuestScript, build_initramfs, store_initramfs
from mpqemu_mgmt.guestkit.kernel import fetch_kernel
from mpqemu_mgmt.guestkit.scripts import guest_script

# ``vendor:device`` as the guest's sysfs spells them, i.e. as PCISET lines carry them.
EDU = "0x1234:0x11e8"
LSI = "0x1000:0x0012"
TESTDEV = "0x1b36:0x0005"

SET_MARK = "PCISET"


def watch_script(ready: str) -> GuestScript:
    """``pci_watch.sh``, printing ``ready`` before its first PCISET line."""
    return guest_script("pci_watch.sh", {"PCI_WATCH_READY": ready})


def parse_pci_sets(text: str) -> list[dict[str, str]]:
    """Every PCI listing in ``text``, oldest first: ``{bdf: vendor:device}``. Pure."""
    out = []
    for line in text.splitlines():
        if SET_MARK in line:
            items = line.split(SET_MARK, 1)[1].split()
            out.append(dict(item.split("=", 1) for item in items if "=" in item))
    return out


def read_pci_sets(console: Path) -> list[dict[str, str]]:
    """:func:`parse_pci_sets` of the console log so far; none while there is no log yet."""
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return []
    return parse_pci_sets(text)


def watch_images(ready: str = "WATCH-READY") -> tuple[Path, Path]:
    """``(vmlinuz, initrd)`` of the watching guest in the cache (fetched and built once)."""
    kernel = fetch_kernel()
    return kernel.vmlinuz, store_initramfs(build_initramfs(kernel, watch_script(ready)))


def place_images(into: Path, images: tuple[Path, Path]) -> tuple[Path, Path]:
    """Copy ``(vmlinuz, initrd)`` into ``into`` as ``vmlinuz`` and ``initrd.cpio``; return them.

    The main QEMU may run as another user: the folder becomes 0755 and both files 0644.
    """
    into.mkdir(parents=True, exist_ok=True)
    k, i = into / "vmlinuz", into / "initrd.cpio"
    shutil.copyfile(images[0], k)
    shutil.copyfile(images[1], i)
    into.chmod(0o755)
    for p in (k, i):
        p.chmod(0o644)
    return k, i
