"""PciFunction: the common half of a device model — config space, INTx pin, config-write effects.

A concrete model (pci-testdev, edu, virtio-blk) subclasses :class:`PciFunction`, builds its
:class:`~mpqemu_mgmt.pci.config.ConfigSpace` and implements its BARs and ``reset``. Config reads and
writes go straight to the config space (the stock remote calls ``pci_default_read_config`` /
``pci_default_write_config``, never a device hook: hw/remote/message.c); a write's
:class:`~mpqemu_mgmt.pci.config.ConfigEffects` drive the INTx pin (Interrupt Disable) and are
returned to the host.

Pure: no IO; the only outward calls go through the :class:`~mpqemu_mgmt.devices.base.DeviceHost`.
"""

from __future__ import annotations

from typing import Any

from mpqemu_mgmt.devices.base import DeviceHost, PciDeviceModel
from mpqemu_mgmt.pci.config import ConfigEffects, ConfigSpace
from mpqemu_mgmt.pci.intx import IntxPin


class PciFunction(PciDeviceModel):
    """Config space + INTx wiring shared by every in-tree model."""

    def __init__(self, host: DeviceHost, config: ConfigSpace) -> None:
        self.host = host
        self.config = config
        self.intx = IntxPin(config, host.irq)

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> ConfigEffects:
        effects = self.config.write(offset, size, value)
        if effects.intx_disable_changed:
            self.intx.on_config(effects)
        if effects.old_command != effects.new_command or effects.bar_changes:
            self.on_config(effects)
        return effects

    def on_config(self, effects: ConfigEffects) -> None:
        """Hook for models that react to decode or bus-master changes (default: nothing)."""

    def status(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "command": self.config.command,
            "status": self.config.status,
            "intx": {"level": self.intx.level, "asserted": self.intx.effective},
            "bars": [
                {"index": w.index, "base": w.base, "size": w.size, "memory": w.memory}
                for w in self.config.windows
            ],
        }
