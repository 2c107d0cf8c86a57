"""A real Linux guest for the driver system tests: Debian's cloud kernel and a busybox initramfs whose
script prints the guest's PCI functions (``PCISET <bdf>=<vendor>:<device> ...``) whenever they change,
so a test reads from the serial console log what the guest sees after each plug and unplug."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

WATCH = r"""
echo "WATCH-READY"
prev=""
while :; do
  cur=""
  for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] && cur="$cur ${d##*/}=$(cat "$d/vendor"):$(cat "$d/device")"
  done
  if [ "$cur" != "$prev" ]; then echo "PCISET$cur"; prev="$cur"; fi
  sleep 0.2
done
"""

EDU = "0x1234:0x11e8"
LSI = "0x1000:0x0012"
TESTDEV = "0x1b36:0x0005"


@dataclass(frozen=True)
class GuestImages:
    kernel: Path
    initrd: Path


def guest_images(into: Path) -> GuestImages:
    """Kernel + initramfs copied to ``into`` (readable by the unprivileged QEMU user)."""
    try:
        from mpqemu_mgmt.guestkit.initramfs import GuestScript, build_initramfs, store_initramfs
        from mpqemu_mgmt.guestkit.kernel import fetch_kernel

        kernel = fetch_kernel()
        image = store_initramfs(build_initramfs(kernel, GuestScript(text=WATCH, name="watch.sh")))
    except Exception as exc:  # the guest kit is another engineer's: say why and skip
        pytest.skip(f"no test guest: {exc}")
    into.mkdir(parents=True, exist_ok=True)
    k, i = into / "vmlinuz", into / "initrd.cpio"
    shutil.copyfile(kernel.vmlinuz, k)
    shutil.copyfile(image, i)
    for p in (into, k, i):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return GuestImages(k, i)


def pci_sets(console: Path) -> list[set[str]]:
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        if "PCISET" in line:
            items = line.split("PCISET", 1)[1].split()
            out.append({item.split("=", 1)[1] for item in items if "=" in item})
    return out


def wait_seen(console: Path, want: set[str], gone: set[str] = frozenset(), timeout: float = 90.0) -> set[str]:  # type: ignore[assignment]
    """Until the guest's latest PCI set has every id in ``want`` and none in ``gone``."""
    deadline = time.monotonic() + timeout
    last: set[str] = set()
    while time.monotonic() < deadline:
        sets = pci_sets(console)
        if sets:
            last = sets[-1]
            if want <= last and not (gone & last):
                return last
        time.sleep(0.2)
    tail = console.read_text(errors="replace")[-1500:] if console.exists() else "(no console log)"
    raise AssertionError(f"guest never saw want={want} gone={gone}; last={last}\n{tail}")
