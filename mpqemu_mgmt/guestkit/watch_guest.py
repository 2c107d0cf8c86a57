"""The PCI-watching test guest: it shows on its serial console what PCI functions it sees.

Debian's cloud kernel with a busybox initramfs running ``scripts/pci_watch.sh``, which prints
``PCISET <bdf>=<vendor>:<device> ...`` once and again whenever the guest's PCI functions change;
``mpqemu-mgmt demo`` and the driver and fault system tests read those lines from the console log
after each plug, unplug and replug.

The listing is polled (every 0.2 s) and a replug takes about 0.15 s, so it cannot prove that the
guest saw a device leave and come back. The proof of a replug is the guest kernel's own
enumeration line, ``pci 0000:00:03.0: [1234:11e8] type 00 class ...``, printed once per device
found at boot and once per ACPI hot-add (booted without ``quiet``): :func:`slot_view` counts them
for one slot, and :func:`reenumerated` says whether a replug added exactly the expected ones and
the device is listed afterwards.

:func:`parse_pci_sets`, :func:`parse_enumerations`, :func:`slot_view` and :func:`reenumerated`
are pure; the IO edge is :func:`read_console` and :func:`read_pci_sets` (read the log),
:func:`watch_images` (fetches the kernel, builds the image) and :func:`place_images` (copies both
where QEMU can read them). Nothing here starts QEMU or waits.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
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


# pci_setup_device's ``pci_info(dev, "[%04x:%04x] type %02x class %#08x", ...)`` in the guest's
# drivers/pci/probe.c, prefixed by dev_info with ``pci <domain:bus:slot.fn>: ``. It runs for each
# function found by the boot scan and by acpiphp's rescan of a slot QEMU's ACPI PCI hot-plug
# (hw/acpi/pcihp.c) reported as inserted, and only then: a function that stays put is not
# enumerated again. Not anchored to the line start: the console may carry a timestamp before it.
_ENUM_RE = re.compile(
    r"pci ([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]): \[([0-9a-f]{4}):([0-9a-f]{4})\] type [0-9a-f]{2}"
)


@dataclass(frozen=True)
class Enumerated:
    """One enumeration of a PCI function by the guest's kernel, spelt like the PCISET lines."""

    bdf: str  # 0000:00:03.0
    ids: str  # 0x1234:0x11e8


def parse_enumerations(text: str) -> list[Enumerated]:
    """Every function the guest's kernel enumerated in ``text``, oldest first. Pure."""
    return [Enumerated(m[1], f"0x{m[2]}:0x{m[3]}") for m in _ENUM_RE.finditer(text)]


def short_name(ids: str, bdf: str) -> str:
    """``1234:11e8 at 00:03.0``: how a person reads ``0x1234:0x11e8`` at ``0000:00:03.0``."""
    slot = bdf[5:] if bdf.startswith("0000:") else bdf
    return f"{ids.replace('0x', '')} at {slot}"


@dataclass(frozen=True)
class SlotView:
    """What the guest showed of one device in one slot: its kernel enumerated it ``enumerations``
    times there, and its latest PCI listing shows it there (``listed``)."""

    bdf: str
    ids: str
    enumerations: int
    listed: bool

    @property
    def name(self) -> str:
        return short_name(self.ids, self.bdf)


def slot_view(text: str, ids: str, bdf: str) -> SlotView:
    """:class:`SlotView` of ``ids`` at ``bdf`` in the console text ``text``. Pure."""
    count = sum(1 for e in parse_enumerations(text) if e.bdf == bdf and e.ids == ids)
    sets = parse_pci_sets(text)
    return SlotView(bdf, ids, count, bool(sets) and sets[-1].get(bdf) == ids)


def slot_of(text: str, ids: str) -> str | None:
    """The slot where the latest PCI listing in ``text`` shows ``ids`` (the lowest of several). Pure."""
    sets = parse_pci_sets(text)
    slots = sorted(bdf for bdf, v in (sets[-1] if sets else {}).items() if v == ids)
    return slots[0] if slots else None


def reenumerated(before: SlotView, now: SlotView, times: int = 1) -> str | None:
    """Whether the guest saw ``times`` replugs of the device between ``before`` and ``now``: its
    kernel enumerated it exactly ``times`` more times in that slot and it is listed there. None when
    it did; otherwise what is missing (still waiting, or never going to happen). Pure."""
    seen = now.enumerations - before.enumerations
    if seen != times:
        return f"the guest's kernel enumerated {now.name} {seen} time(s) since, not {times}"
    if not now.listed:
        return f"the guest's PCI listing does not show {now.name}"
    return None


def read_console(console: Path) -> str:
    """The console log so far; empty while there is none yet."""
    try:
        return console.read_text(errors="replace")
    except OSError:
        return ""


def read_pci_sets(console: Path) -> list[dict[str, str]]:
    """:func:`parse_pci_sets` of the console log so far; none while there is no log yet."""
    return parse_pci_sets(read_console(console))


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


def watch_spec_toml(
    name: str,
    kernel: Path,
    initrd: Path,
    devices: list[tuple[str, str, str]],
    *,
    driver: str = "direct",
    uri: str | None = None,
    on_failure: str = "replug",
) -> str:
    """A guest spec (DESIGN.md Contracts 5) that boots the watching guest with ``devices``
    (``(id, model, backend)`` each). No ``quiet`` on the kernel command line: the kernel's PCI
    enumeration lines (KERN_INFO) must reach the console, they are the proof of a replug."""
    head = [f'name = "{name}"', 'memory = "256M"', 'machine = "pc"', 'accel = "tcg"', f'driver = "{driver}"']
    if uri is not None:
        head.append(f'uri = "{uri}"')
    lines = [*head, "", "[boot]", f'kernel = "{kernel}"', f'initrd = "{initrd}"',
             'cmdline = "console=ttyS0 panic=-1"']
    for dev_id, model, backend in devices:
        lines += ["", "[[device]]", f'id = "{dev_id}"', f'model = "{model}"', f'backend = "{backend}"',
                  f'on_failure = "{on_failure}"']
    return "\n".join(lines) + "\n"
