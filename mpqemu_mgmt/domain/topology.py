"""Where proxy devices sit on the guest's PCI buses: pure, shared by the designer (domain XML),
the direct driver's command line and the QMP plans, so all three agree.

``x-pci-proxy-dev`` is a conventional PCI device (hw/remote/proxy.c lists
INTERFACE_CONVENTIONAL_PCI_DEVICE). On ``pc`` it hot-plugs onto ``pci.0`` through ACPI (PIIX4
hot-plug); on ``q35`` the root bus ``pcie.0`` refuses hot-plug ("Bus 'pcie.0' does not support
hotplugging"), so the guest gets a ``pcie-root-port`` with a ``pcie-pci-bridge`` behind it, whose
SHPC slots are reserved for proxy devices. The controller ids follow libvirt's aliases (``pci.N``)
so QMP ``bus=`` values are the same under both drivers. Must not do IO.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from mpqemu_mgmt.errors import RefusedError

#: pc: slots 0 (host bridge) and 1 (PIIX3) are taken by the machine; libvirt puts nothing else
#: on pci.0 in our XML (no video, no USB, no balloon), so proxies use 0x03..0x1f.
PC_BUS: Final = "pci.0"
PC_SLOTS: Final = tuple(range(0x03, 0x20))
#: q35: the root port (index 1) and the bridge behind it (index 2). A pcie-pci-bridge has
#: slots 0..31; libvirt reserves none of them, but slot 0 is left free as libvirt's own
#: auto-assignment does.
Q35_ROOT_PORT: Final = "pci.1"
Q35_ROOT_PORT_SLOT: Final = 0x02
Q35_BRIDGE: Final = "pci.2"
Q35_SLOTS: Final = tuple(range(0x01, 0x20))


@dataclass(frozen=True, order=True)
class Placement:
    bus: str
    slot: int

    @property
    def addr(self) -> str:
        """The QMP/-device ``addr`` value (slot, function 0)."""
        return f"0x{self.slot:x}"


def proxy_bus(machine: str) -> str:
    return Q35_BRIDGE if machine == "q35" else PC_BUS


def _slots(machine: str) -> tuple[int, ...]:
    return Q35_SLOTS if machine == "q35" else PC_SLOTS


def place(machine: str, device_ids: Iterable[str],
          taken: Mapping[str, Placement] | None = None) -> dict[str, Placement]:
    """Give every id in ``device_ids`` a slot: kept if ``taken`` has one, else the lowest free one.

    ``taken`` is what a running guest already uses (hot-plug must not move live devices).
    """
    taken = dict(taken or {})
    used = {p.slot for p in taken.values()}
    free = [s for s in _slots(machine) if s not in used]
    bus = proxy_bus(machine)
    out: dict[str, Placement] = {}
    for dev_id in device_ids:
        if dev_id in taken:
            out[dev_id] = taken[dev_id]
            continue
        if not free:
            raise RefusedError(
                f"no free PCI slot on {bus} for device {dev_id!r} ({len(_slots(machine))} slots)",
                device=dev_id, bus=bus,
            )
        out[dev_id] = Placement(bus, free.pop(0))
    return out
