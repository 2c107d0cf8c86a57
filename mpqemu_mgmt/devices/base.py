"""The contract between a pure device model and whatever hosts it (the mpqemu or vfio-user serve loop).

A device model is pure: it never does IO of its own. It sees guest RAM only through
:class:`GuestMemory` (bounds-checked, raising :class:`~mpqemu_mgmt.errors.DmaError`), raises and
lowers its INTx line only through :class:`IrqLine`, and reads or writes a backing file only through
the file object its host gives it. The same model therefore runs behind QEMU 7.2's
``x-pci-proxy-dev`` (mpqemu) and behind QEMU 10.1+'s ``vfio-user-pci`` without change.

Accesses arrive already decoded: the host resolves the absolute guest address that the mpqemu
proxy sends (hw/remote/proxy.c ``send_bar_access_msg``) to ``(bar index, offset)`` through the
BARs the guest programmed, so a model only ever sees offsets inside one of its own BARs.

How a host builds a model: ``catalogue.create(name, DeviceHost(...))`` calls the model class with
one :class:`DeviceHost` that bundles everything the model may touch (guest memory, the INTx wire,
timers, the backing file, a guest-error sink). The model keeps its config space in ``config`` (a
:class:`~mpqemu_mgmt.pci.config.ConfigSpace`); hosts read ``config.windows`` through a
:class:`~mpqemu_mgmt.pci.barmap.BarMap` to decode addresses. Time-driven behaviour (edu's DMA
after 100 ms, its factorial worker) goes through :class:`Timers`, which the host runs between
requests, so a model never sleeps or starts threads.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mpqemu_mgmt.pci.config import ConfigSpace


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


class Timers(Protocol):
    """One-shot timers the host runs between requests (monotonic seconds)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        """Run ``callback`` once, ``delay`` seconds from now; returns a handle for :meth:`cancel`."""
        ...

    def cancel(self, handle: object) -> None: ...


class _NoIrq:
    def set_level(self, level: bool) -> None:
        pass


class _NoMemory:
    def read(self, gpa: int, length: int) -> bytes:
        from mpqemu_mgmt.errors import DmaError

        raise DmaError("no guest memory", gpa=gpa, length=length)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.read(gpa, len(data))

    def view(self, gpa: int, length: int) -> memoryview:
        self.read(gpa, length)
        raise AssertionError("unreachable")


class _ImmediateTimers:
    """Fallback: run callbacks at once (a host without a timer loop, e.g. quick tests)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        callback()
        return None

    def cancel(self, handle: object) -> None:
        pass


def _ignore(message: str) -> None:
    pass


class DeviceHost:
    """Everything a model may touch, handed over by the host that serves it.

    ``backing`` is the backing file (virtio-blk), opened by the host from ``--backing-fd``;
    ``guest_error`` is where a model reports guest mistakes (QEMU's LOG_GUEST_ERROR), which the
    host logs. (A plain class rather than a dataclass: the remote's start-up time is a budget.)
    """

    __slots__ = ("backing", "guest_error", "irq", "memory", "readonly", "timers")

    def __init__(
        self,
        memory: GuestMemory | None = None,
        irq: IrqLine | None = None,
        timers: Timers | None = None,
        *,
        backing: IO[bytes] | None = None,
        readonly: bool = False,
        guest_error: Callable[[str], None] = _ignore,
    ) -> None:
        self.memory: GuestMemory = memory if memory is not None else _NoMemory()
        self.irq: IrqLine = irq if irq is not None else _NoIrq()
        self.timers: Timers = timers if timers is not None else _ImmediateTimers()
        self.backing = backing
        self.readonly = readonly
        self.guest_error = guest_error


class PciDeviceModel(abc.ABC):
    """One PCI function. Subclasses register themselves in the device catalogue by ``model``."""

    #: catalogue name, e.g. "edu" (Contracts 1: pci-testdev, edu, virtio-blk)
    model: str = ""
    #: the function's config space; hosts decode BAR addresses from ``config.windows``
    config: ConfigSpace

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
