"""IntxPin: the PCI-core side of a device's INTx line (level, Interrupt Disable, status bit 3).

A device model raises or lowers its *own* level; what reaches the wire is that level AND NOT the
command register's Interrupt Disable bit. The raw level is always reflected in the status
register's Interrupt Status bit. This mirrors hw/pci/pci.c ``pci_irq_handler`` (status updated
first, then nothing is propagated while ``pci_irq_disabled``) and ``pci_update_irq_disabled``
(toggling Interrupt Disable drops or re-raises the line).

The wire is any :class:`~mpqemu_mgmt.devices.base.IrqLine`: the irqfd/resample pair in the remote
(mpqemu_mgmt/remote/irq.py), an eventfd for vfio-user, or a recorder in tests.

What it must not do: IO. It only calls ``set_level`` on the line it was given.
"""

from __future__ import annotations

from typing import Protocol

from mpqemu_mgmt.pci.config import ConfigEffects, ConfigSpace


class _Line(Protocol):
    def set_level(self, level: bool) -> None: ...


class IntxPin:
    """A device's INTA, gated by Interrupt Disable and mirrored into the status register."""

    __slots__ = ("_config", "_level", "_line", "_wire")

    def __init__(self, config: ConfigSpace, line: _Line | None = None) -> None:
        self._config = config
        self._line = line
        self._level = False
        self._wire = False

    def connect(self, line: _Line | None) -> None:
        """Attach (or replace) the output wire and drive it with the current effective level."""
        self._line = line
        self._wire = False
        self._drive()

    @property
    def level(self) -> bool:
        """The device's own level (what status bit 3 shows)."""
        return self._level

    @property
    def effective(self) -> bool:
        """What the wire carries: the level unless Interrupt Disable is set."""
        return self._level and not self._config.intx_disabled

    def set_level(self, level: bool) -> None:
        self._level = bool(level)
        self._config.set_interrupt_status(self._level)
        self._drive()

    def on_config(self, effects: ConfigEffects) -> None:
        """Follow an Interrupt Disable flip (pass every config write's effects here)."""
        if effects.intx_disable_changed:
            self._drive()

    def _drive(self) -> None:
        eff = self.effective
        if eff != self._wire:
            self._wire = eff
            if self._line is not None:
                self._line.set_level(eff)
