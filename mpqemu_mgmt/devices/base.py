"""The contract between a pure device model and whatever hosts it (the mpqemu or vfio-user serve loop).

A device model is pure: it never does IO of its own. It sees guest RAM only through
:class:`GuestMemory` (bounds-checked, raising :class:`~mpqemu_mgmt.errors.DmaError`), raises and
lowers its INTx line only through :class:`IrqLine`, and reads or writes a backing file only through
the file object its host gives it. The same model therefore runs behind QEMU 7.2's
``x-pci-proxy-dev`` (mpqemu) and behind QEMU 10.1+'s ``vfio-user-pci`` without change.

Accesses arrive already decoded: the host resolves the absolute guest address that the mpqemu
proxy sends (hw/remote/proxy.c ``send_bar_access_msg``) to ``(bar index, offset)`` through the
BARs the guest programmed, so a model only ever sees offsets inside one of its own BARs.
"""

from __future__ import annotations

import abc
from typing import Any, Protocol


class GuestMemory(Protocol):
    """Guest-physical memory as the device sees it for DMA (no IOMMU in mpqemu)."""

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes at ``gpa``; DmaError if any byte is outside guest RAM."""
        ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``gpa``; DmaError if any byte is outside guest RAM."""
        ...

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy writable view of ``length`` bytes at ``gpa`` inside one RAM region.

        DmaError when the range is outside guest RAM or crosses a region boundary.
        """
        ...


class IrqLine(Protocol):
    """The device's INTx pin (INTA). Level-triggered; the host handles irqfd/resample."""

    def set_level(self, level: bool) -> None: ...


class PciDeviceModel(abc.ABC):
    """One PCI function. Subclasses register themselves in the device catalogue by ``model``."""

    #: catalogue name, e.g. "edu" (Contracts 1: pci-testdev, edu, virtio-blk)
    model: str = ""

    @abc.abstractmethod
    def config_read(self, offset: int, size: int) -> int:
        """Read ``size`` (1..4) bytes of config space at ``offset``."""

    @abc.abstractmethod
    def config_write(self, offset: int, size: int, value: int) -> Any:
        """Write config space; returns the ConfigEffects (BAR moves, decode changes) as data."""

    @abc.abstractmethod
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` inside BAR ``bar``."""

    @abc.abstractmethod
    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes at ``offset`` inside BAR ``bar``."""

    @abc.abstractmethod
    def reset(self) -> None:
        """DEVICE_RESET (hw/remote/message.c ``process_device_reset_msg`` calls dc->reset)."""

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot for the remote's ``x-device-status`` QMP command."""
        return {"model": self.model}
