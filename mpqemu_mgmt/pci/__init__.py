"""Pure PCI function model: config space with masks, BARs and capabilities; address decode; INTx.

Public API (transport-neutral; used by mpqemu_mgmt.devices and every serve loop):

* :class:`ConfigSpace` — 256-byte type-0 config space. ``read(off, size)``,
  ``write(off, size, value) -> ConfigEffects``, ``reset()``, ``add_capability()``, ``set_wmask()``,
  raw ``set_u8/16/32`` and ``get`` for the device itself, ``windows`` (decoded BARs),
  ``bus_master``, ``intx_disabled``.
* :class:`BarSpec`/:class:`BarKind` declare BARs; :class:`BarWindow` is a decoded BAR;
  :class:`ConfigEffects`/:class:`BarChange` describe what a write changed.
* :class:`BarMap` — absolute address → ``(bar, offset)`` with the command-register decode checks
  (mpqemu), and region bounds checks (vfio-user).
* :class:`IntxPin` — device level → status bit 3 and, unless Interrupt Disable, the wire.
* :mod:`mpqemu_mgmt.pci.regs` — register offsets and bits.

Nothing in this package does IO.
"""

from mpqemu_mgmt.pci.barmap import BarMap
from mpqemu_mgmt.pci.config import (
    NO_EFFECTS,
    BarChange,
    BarKind,
    BarSpec,
    BarWindow,
    ConfigEffects,
    ConfigSpace,
)
from mpqemu_mgmt.pci.intx import IntxPin


def __getattr__(name: str) -> object:
    # PciAddress (regex parsing) is not needed by a remote: imported on first use only
    if name == "PciAddress":
        from mpqemu_mgmt.pci.address import PciAddress

        return PciAddress
    raise AttributeError(name)


__all__ = [
    "NO_EFFECTS",
    "BarChange",
    "BarKind",
    "BarMap",
    "BarSpec",
    "BarWindow",
    "ConfigEffects",
    "ConfigSpace",
    "IntxPin",
    "PciAddress",
]
