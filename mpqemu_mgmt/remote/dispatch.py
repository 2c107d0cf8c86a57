"""MpqemuDispatcher: one decoded mpqemu request in, the RET to send (or nothing) out.

This is the protocol-specific half of the remote, between the transport and the device model. It
mirrors hw/remote/message.c:

* PCI_CFGREAD / PCI_CFGWRITE go to the model's config space (``process_config_*``), checked with
  the real extent ``addr + len`` (the stock remote checks ``addr + 4`` and shuts down on failure;
  we answer ``UINT64_MAX`` and carry on);
* BAR_READ / BAR_WRITE: a size that is not a power of two up to 8 answers ``UINT64_MAX``
  (``process_bar_*``); the absolute address is decoded by :class:`~mpqemu_mgmt.pci.barmap.BarMap`
  (BAR windows + command-register decode). Memory that hits no BAR answers ``UINT64_MAX``; I/O
  that hits no BAR reads as all-ones and swallows writes, like QEMU's unassigned I/O space, and
  I/O above 64 KiB (where no port exists, even if a BAR was programmed there) answers
  ``UINT64_MAX``;
* SYNC_SYSMEM and SET_IRQFD are adopted by guest memory and the IRQ line and get no reply;
* DEVICE_RESET calls only the model's own reset (``dc->reset``) and answers a size-0 RET.

What it must not do: read or write the socket, or let a model error escape (a guest must not be
able to kill its device with an access: the error is logged and the access answered with
all-ones).
"""

from __future__ import annotations

from collections.abc import Callable

from mpqemu_mgmt.devices.base import PciDeviceModel
from mpqemu_mgmt.errors import MpqemuError
from mpqemu_mgmt.pci.barmap import BarMap
from mpqemu_mgmt.protocol.messages import (
    BarRead,
    BarWrite,
    DeviceReset,
    Message,
    PciConfigRead,
    PciConfigWrite,
    Ret,
    SetIrqfd,
    SyncSysmem,
    close_message,
)
from mpqemu_mgmt.protocol.wire import UINT64_MAX
from mpqemu_mgmt.remote.irq import EventfdIrq
from mpqemu_mgmt.remote.memory import MappedGuestMemory

_OK = Ret(0)
_FAIL = Ret(UINT64_MAX)
_RESET_DONE = Ret(0, 0)  # the stock remote answers DEVICE_RESET with a size-0 RET


class MpqemuDispatcher:
    def __init__(
        self,
        model: PciDeviceModel,
        memory: MappedGuestMemory,
        irq: EventfdIrq,
        log: Callable[[str], None] | None = None,
        debug: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.barmap = BarMap(model.config)
        self.memory = memory
        self.irq = irq
        self._log = log or (lambda _m: None)
        self._debug = debug or (lambda _m: None)
        self.counts: dict[type, int] = {}
        self.errors = 0
        self._rets: dict[int, Ret] = {}

    def _error(self, what: str, exc: BaseException | None = None) -> Ret:
        self.errors += 1
        if exc is None:
            self._log(what)
        elif isinstance(exc, MpqemuError):
            self._log(f"{what}: {exc}")
        else:
            import traceback  # only for a model bug: kept out of the resident set otherwise

            self._log(f"{what}: device model bug: {''.join(traceback.format_exception(exc)).rstrip()}")
        return _FAIL

    def handle(self, msg: Message) -> Ret | None:
        """Apply ``msg``; return the RET to send, or None for messages that get no reply."""
        kind = type(msg)
        counts = self.counts
        counts[kind] = counts.get(kind, 0) + 1
        # BAR and config accesses are the hot path (one per guest access): test them first
        if isinstance(msg, BarRead):
            return self._bar_read(msg)
        if isinstance(msg, BarWrite):
            return self._bar_write(msg)
        if isinstance(msg, PciConfigRead):
            try:
                return self._ret(self.model.config_read(msg.addr, msg.length) & 0xFFFFFFFF)
            except Exception as exc:
                return self._error(f"bad PCI config read {msg.addr:#x}/{msg.length}", exc)
        if isinstance(msg, PciConfigWrite):
            try:
                effects = self.model.config_write(msg.addr, msg.length, msg.value)
            except Exception as exc:
                return self._error(f"bad PCI config write {msg.addr:#x}/{msg.length}", exc)
            for ch in getattr(effects, "bar_changes", ()):
                self._debug(f"BAR{ch.index}: {ch.old} -> {ch.new}")
            return _OK
        if isinstance(msg, SyncSysmem):
            try:
                self.memory.sync(msg.regions)
            except OSError as exc:
                self._error("SYNC_SYSMEM failed", exc)
            return None
        if isinstance(msg, SetIrqfd):
            self.irq.attach(msg.irqfd, msg.resamplefd)
            return None
        if isinstance(msg, DeviceReset):
            try:
                self.model.reset()
            except Exception as exc:
                self._error("device reset failed", exc)
            return _RESET_DONE
        # A RET from the proxy: nothing to do (the endpoint refuses it in the first place).
        close_message(msg)
        return None

    def _ret(self, value: int) -> Ret:
        """Ret(value), one frozen instance per value read (a guest polls the same registers)."""
        rets = self._rets
        ret = rets.get(value)
        if ret is None:
            if len(rets) >= 4096:
                rets.clear()
            ret = rets[value] = Ret(value)
        return ret

    def message_counts(self) -> dict[str, int]:
        """Messages handled so far, by message type name (for x-device-status)."""
        return {k.__name__: v for k, v in self.counts.items()}

    @staticmethod
    def _bad_size(size: int) -> bool:
        # process_bar_read/write: !is_power_of_2(size) || size > sizeof(uint64_t)
        return size <= 0 or size > 8 or size & (size - 1) != 0

    def _bar_read(self, msg: BarRead) -> Ret:
        size = msg.size
        if self._bad_size(size):
            return _FAIL
        hit = self.barmap.resolve(msg.addr, size, msg.memory)
        if hit is None:
            if msg.memory or not BarMap.port_exists(msg.addr, size):
                return self._error(f"bad address {msg.addr:#x} for {'mem' if msg.memory else 'io'} read")
            return Ret((1 << (8 * size)) - 1)
        try:
            return self._ret(self.model.bar_read(hit[0], hit[1], size) & ((1 << (8 * size)) - 1))
        except Exception as exc:
            return self._error(f"BAR{hit[0]} read at {hit[1]:#x}/{size} failed", exc)

    def _bar_write(self, msg: BarWrite) -> Ret:
        size = msg.size
        if self._bad_size(size):
            return _FAIL
        hit = self.barmap.resolve(msg.addr, size, msg.memory)
        if hit is None:
            if msg.memory or not BarMap.port_exists(msg.addr, size):
                return self._error(f"bad address {msg.addr:#x} for {'mem' if msg.memory else 'io'} write")
            return _OK
        try:
            self.model.bar_write(hit[0], hit[1], size, msg.value & ((1 << (8 * size)) - 1))
        except Exception as exc:
            return self._error(f"BAR{hit[0]} write at {hit[1]:#x}/{size} failed", exc)
        return _OK
