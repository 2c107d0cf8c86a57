"""A real Linux guest for the driver system tests: Debian's cloud kernel and a busybox initramfs whose
script prints the guest's PCI functions (``PCISET <bdf>=<vendor>:<device> ...``) whenever they change,
so a test reads from the serial console log what the guest sees after each plug and unplug."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpqemu_mgmt.domain.spec import GuestSpec, parse_spec
from mpqemu_mgmt.guestkit.watch_guest import EDU, LSI, TESTDEV, place_images, read_pci_sets, watch_images

__all__ = ["EDU", "LSI", "TESTDEV", "GuestImages", "guest_images", "pci_sets", "vfio_user_edu_spec",
           "wait_seen"]


@dataclass(frozen=True)
class GuestImages:
    kernel: Path
    initrd: Path

    def boot_toml(self) -> str:
        """The spec's ``[boot]`` table for these images, serial console on ttyS0."""
        return f"""[boot]
kernel = "{self.kernel}"
initrd = "{self.initrd}"
cmdline = "console=ttyS0 panic=-1 quiet"
"""


def guest_images(into: Path) -> GuestImages:
    """Kernel + initramfs copied to ``into`` (readable by the unprivileged QEMU user)."""
    try:
        images = watch_images()
    except Exception as exc:  # the guest kit is another engineer's: say why and skip
        pytest.skip(f"no test guest: {exc}")
    return GuestImages(*place_images(into, images))


def vfio_user_edu_spec(name: str, qemu_binary: Path, img: GuestImages, device_extra: str = "") -> GuestSpec:
    """A direct-boot guest on ``qemu_binary`` (QEMU 11.1) with our edu over vfio-user."""
    return parse_spec(f"""
name = "{name}"
memory = "256M"
qemu_binary = "{qemu_binary}"
{img.boot_toml()}[[device]]
id = "edu0"
model = "edu"
transport = "vfio-user"
{device_extra}
""", f"{name}.toml")


def pci_sets(console: Path) -> list[set[str]]:
    return [set(listing.values()) for listing in read_pci_sets(console)]


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
