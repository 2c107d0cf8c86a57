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
from mpqemu_mgmt.devices.function import PciFunction
from mpqemu_mgmt.errors import MpqemuError
from mpqemu_mgmt.pci.barmap import BarMap
from mpqemu_mgmt.protocol import wire
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
from mpqemu_mgmt.protocol.wire import UINT64_MAX, Cmd
from mpqemu_mgmt.remote.irq import EventfdIrq
from mpqemu_mgmt.remote.memory import MappedGuestMemory

_PCI_CONF_UNPACK = wire.PCI_CONF.unpack_from
_BAR_ACCESS_UNPACK = wire.BAR_ACCESS.unpack_from
# the sizes process_bar_read/write accept: is_power_of_2(size) && size <= sizeof(uint64_t)
_GOOD_SIZES = frozenset((1, 2, 4, 8))
# the message type each fast handler counts as, in the order of _fast_counts
_FAST_KINDS = (PciConfigRead, PciConfigWrite, BarRead, BarWrite)

FastHandler = Callable[[bytearray], int]
"""A fast-path handler: the raw payload of one request in, the u64 RET value out."""
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
        self._fast_counts = [0, 0, 0, 0]  # fast-handler requests, by _FAST_KINDS
        self._resolve = self.barmap.resolve
        # straight to the config-space bytes when the model keeps the default config_read
        # (PciFunction.config_read is config.read); a model that overrides it is called as is
        self._cfg_read: Callable[[int, int], int] = (
            model.config.read if type(model).config_read is PciFunction.config_read else model.config_read
        )

    def _error(self, what: str, exc: BaseException | None = None) -> int:
        """Count and log a failed access; the value to answer (UINT64_MAX, the stock failure RET)."""
        self.errors += 1
        if exc is None:
            self._log(what)
        elif isinstance(exc, MpqemuError):
            self._log(f"{what}: {exc}")
        else:
            import traceback  # only for a model bug: kept out of the resident set otherwise

            self._log(f"{what}: device model bug: {''.join(traceback.format_exception(exc)).rstrip()}")
        return UINT64_MAX

    def handle(self, msg: Message) -> Ret | None:
        """Apply ``msg``; return the RET to send, or None for messages that get no reply."""
        kind = type(msg)
        counts = self.counts
        counts[kind] = counts.get(kind, 0) + 1
        # BAR and config accesses are the hot path (one per guest access): test them first
        if isinstance(msg, BarRead):
            return self._ret(self._bar_read(msg.addr, msg.size, msg.memory))
        if isinstance(msg, BarWrite):
            return self._ret(self._bar_write(msg.addr, msg.value, msg.size, msg.memory))
        if isinstance(msg, PciConfigRead):
            return self._ret(self._config_read(msg.addr, msg.length))
        if isinstance(msg, PciConfigWrite):
            return self._ret(self._config_write(msg.addr, msg.value, msg.length))
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

    def fast_handlers(self) -> dict[int, FastHandler]:
        """One specialised handler per hot command, for the transport's fast path.

        Each takes the raw payload buffer of a request the transport read by its fast path
        (the exact payload size of that command, no fds) and returns the u64 RET value: the same
        value, the same model calls and the same counts as ``handle(decode(frame))``, minus the
        message object (tests/unit/test_remote_dispatch_fast.py checks both on the same frames).
        Commands without one here (DEVICE_RESET) go through :meth:`handle`.
        """
        counts = self._fast_counts
        config_read, config_write = self._config_read, self._config_write
        bar_read, bar_write = self._bar_read, self._bar_write

        def cfg_read(payload: bytearray) -> int:
            counts[0] += 1
            addr, _value, length = _PCI_CONF_UNPACK(payload)
            return config_read(addr, length)

        def cfg_write(payload: bytearray) -> int:
            counts[1] += 1
            addr, value, length = _PCI_CONF_UNPACK(payload)
            return config_write(addr, value, length)

        def b_read(payload: bytearray) -> int:
            counts[2] += 1
            addr, _value, size, memory = _BAR_ACCESS_UNPACK(payload)
            return bar_read(addr, size, memory != 0)

        def b_write(payload: bytearray) -> int:
            counts[3] += 1
            addr, value, size, memory = _BAR_ACCESS_UNPACK(payload)
            return bar_write(addr, value, size, memory != 0)

        return {
            int(Cmd.PCI_CFGREAD): cfg_read,
            int(Cmd.PCI_CFGWRITE): cfg_write,
            int(Cmd.BAR_READ): b_read,
            int(Cmd.BAR_WRITE): b_write,
        }

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
        counts = dict(self.counts)
        for kind, n in zip(_FAST_KINDS, self._fast_counts, strict=True):
            if n:
                counts[kind] = counts.get(kind, 0) + n
        return {k.__name__: v for k, v in counts.items()}

    # -- the accesses, shared by handle() and the fast handlers: each returns the RET value --------

    def _config_read(self, addr: int, length: int) -> int:
        try:
            return self._cfg_read(addr, length) & 0xFFFFFFFF
        except Exception as exc:
            return self._error(f"bad PCI config read {addr:#x}/{length}", exc)

    def _config_write(self, addr: int, value: int, length: int) -> int:
        try:
            effects = self.model.config_write(addr, length, value)
        except Exception as exc:
            return self._error(f"bad PCI config write {addr:#x}/{length}", exc)
        for ch in getattr(effects, "bar_changes", ()):
            self._debug(f"BAR{ch.index}: {ch.old} -> {ch.new}")
        return 0

    def _bar_read(self, addr: int, size: int, memory: bool) -> int:
        # process_bar_read: !is_power_of_2(size) || size > sizeof(uint64_t) fails
        if size not in _GOOD_SIZES:
            return UINT64_MAX
        hit = self._resolve(addr, size, memory)
        if hit is None:
            if memory or not BarMap.port_exists(addr, size):
                return self._error(f"bad address {addr:#x} for {'mem' if memory else 'io'} read")
            return (1 << (8 * size)) - 1
        try:
            return self.model.bar_read(hit[0], hit[1], size) & ((1 << (8 * size)) - 1)
        except Exception as exc:
            return self._error(f"BAR{hit[0]} read at {hit[1]:#x}/{size} failed", exc)

    def _bar_write(self, addr: int, value: int, size: int, memory: bool) -> int:
        if size not in _GOOD_SIZES:
            return UINT64_MAX
        hit = self._resolve(addr, size, memory)
        if hit is None:
            if memory or not BarMap.port_exists(addr, size):
                return self._error(f"bad address {addr:#x} for {'mem' if memory else 'io'} write")
            return 0
        try:
            self.model.bar_write(hit[0], hit[1], size, value & ((1 << (8 * size)) - 1))
        except Exception as exc:
            return self._error(f"BAR{hit[0]} write at {hit[1]:#x}/{size} failed", exc)
        return 0
