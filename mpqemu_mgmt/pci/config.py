"""A mask-driven type-0 PCI configuration space: registers, writable masks, BARs, capabilities.

What it is: 256 bytes of config space plus three parallel masks, the same scheme as QEMU's PCI
core (hw/pci/pci.c ``pci_init_wmask``, ``pci_init_w1cmask``, ``pci_default_write_config``):

* ``wmask``: bits the guest may write;
* ``w1cmask``: bits cleared by writing 1 (the error bits of the status register);
* BARs are sized by their wmask (``~(size - 1)``), so writing all-ones and reading back yields
  the size with no special case, for 32-bit and 64-bit memory BARs and I/O BARs.

A write returns :class:`ConfigEffects` (which BARs moved, how the command register changed) as
data; the caller decides what to do with them. The decoded BAR windows follow QEMU's
``pci_bar_address``: a BAR is decoded only while its command enable bit (I/O or memory) is set, its
base is non-zero and it does not wrap.

What it must not do: IO of any kind, logging, or knowing about a transport. It raises only
:class:`~mpqemu_mgmt.errors.DeviceError` (for programming errors of the caller: a bad offset,
size or BAR layout).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from mpqemu_mgmt.errors import DeviceError
from mpqemu_mgmt.pci import regs

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


class BarKind(enum.Enum):
    """How a BAR decodes: the three kinds a type-0 header can declare."""

    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"

    @property
    def is_memory(self) -> bool:
        return self is not BarKind.IO


class _Value:
    """Plain immutable value objects (not dataclasses: each ``@dataclass`` costs the remote
    start-up time, which is a budget; these few classes are written out instead)."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, n) for n in self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Value) and type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields)
        return f"{type(self).__name__}({args})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")


class BarSpec(_Value):
    """A BAR the device declares: its slot, power-of-two size and kind.

    A 64-bit BAR occupies slots ``index`` and ``index + 1``. Note for mpqemu: QEMU 7.2's proxy
    ignores the 64-bit and prefetchable bits when it probes (hw/remote/proxy.c
    ``probe_pci_info``), so models served over mpqemu should declare MEM32 and IO BARs only.
    """

    __slots__ = ("index", "kind", "prefetchable", "size")
    _fields = ("index", "size", "kind", "prefetchable")
    index: int
    size: int
    kind: BarKind
    prefetchable: bool

    def __init__(
        self, index: int, size: int, kind: BarKind = BarKind.MEM32, prefetchable: bool = False
    ) -> None:
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "prefetchable", prefetchable)
        last = self.index + (1 if self.kind is BarKind.MEM64 else 0)
        if self.index < 0 or last >= regs.NUM_BARS:
            raise DeviceError(f"BAR slot {self.index} is outside 0..5", bar=self.index)
        if self.size <= 0 or self.size & (self.size - 1):
            raise DeviceError(f"BAR{self.index} size {self.size:#x} is not a power of two", bar=self.index)
        # Minimum decode granularity: 4 bytes for I/O, 16 for memory (the low type bits).
        minimum = 4 if self.kind is BarKind.IO else 16
        limit = 1 << 32 if self.kind is not BarKind.MEM64 else 1 << 63
        if not minimum <= self.size <= limit // 2:
            raise DeviceError(f"BAR{self.index} size {self.size:#x} out of range", bar=self.index)
        if self.prefetchable and self.kind is BarKind.IO:
            raise DeviceError(f"I/O BAR{self.index} cannot be prefetchable", bar=self.index)

    @property
    def type_bits(self) -> int:
        """The read-only low bits of the BAR register (space, type, prefetch)."""
        if self.kind is BarKind.IO:
            return regs.BASE_ADDRESS_SPACE_IO
        bits = regs.BASE_ADDRESS_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0
        return bits | (regs.BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0)


class BarWindow(_Value):
    """Where a BAR currently decodes: ``[base, base + size)`` in memory or I/O space."""

    __slots__ = ("base", "index", "memory", "size")
    _fields = ("index", "base", "size", "memory")
    index: int
    base: int
    size: int
    memory: bool

    def __init__(self, index: int, base: int, size: int, memory: bool) -> None:
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "memory", memory)

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.base <= addr and addr + length <= self.base + self.size


class BarChange(_Value):
    """One BAR's decode window before and after a config write (None = not decoded)."""

    __slots__ = ("index", "new", "old")
    _fields = ("index", "old", "new")
    index: int
    old: BarWindow | None
    new: BarWindow | None

    def __init__(self, index: int, old: BarWindow | None, new: BarWindow | None) -> None:
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "old", old)
        object.__setattr__(self, "new", new)


class ConfigEffects(_Value):
    """What a config write changed, as data (crosvm ``ConfigWriteResult``).

    ``bar_changes`` lists every BAR whose decode window moved, appeared or disappeared;
    ``old_command``/``new_command`` let the caller see decode, bus-master and INTx-disable flips.
    """

    __slots__ = ("bar_changes", "new_command", "old_command")
    _fields = ("old_command", "new_command", "bar_changes")
    old_command: int
    new_command: int
    bar_changes: tuple[BarChange, ...]

    def __init__(
        self, old_command: int = 0, new_command: int = 0, bar_changes: tuple[BarChange, ...] = ()
    ) -> None:
        object.__setattr__(self, "old_command", old_command)
        object.__setattr__(self, "new_command", new_command)
        object.__setattr__(self, "bar_changes", bar_changes)

    @property
    def command_changed(self) -> int:
        """The command-register bits that flipped."""
        return self.old_command ^ self.new_command

    @property
    def intx_disable_changed(self) -> bool:
        return bool(self.command_changed & regs.COMMAND_INTX_DISABLE)

    @property
    def bus_master_changed(self) -> bool:
        return bool(self.command_changed & regs.COMMAND_MASTER)

    @property
    def bars_moved(self) -> bool:
        return bool(self.bar_changes)


NO_EFFECTS = ConfigEffects()


class ConfigSpace:
    """The 256-byte config space of one conventional PCI function (header type 0)."""

    __slots__ = ("_bars", "_cfg", "_initial", "_used", "_w1cmask", "_windows", "_wmask")

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        prog_if: int = 0,
        subsystem_vendor_id: int = regs.QEMU_SUBSYSTEM_VENDOR_ID,
        subsystem_id: int = regs.QEMU_SUBSYSTEM_ID,
        interrupt_pin: int = 0,
        bars: Iterable[BarSpec] = (),
    ) -> None:
        if interrupt_pin not in (0, 1):
            # The 7.2 proxy always routes INTA (hw/remote/proxy.c forces INTERRUPT_PIN = 1 in
            # its local copy); a remote reporting INTB..D would make the guest swizzle wrongly.
            raise DeviceError(f"interrupt pin {interrupt_pin} unsupported: use 0 (none) or 1 (INTA)")
        self._cfg = bytearray(regs.CONFIG_SPACE_SIZE)
        self._wmask = bytearray(regs.CONFIG_SPACE_SIZE)
        self._w1cmask = bytearray(regs.CONFIG_SPACE_SIZE)
        self._used = bytearray(regs.CONFIG_SPACE_SIZE)
        self._used[: regs.HEADER_SIZE] = b"\xff" * regs.HEADER_SIZE
        self._bars: dict[int, BarSpec] = {}
        self._windows: tuple[BarWindow, ...] = ()

        self.set_u16(regs.VENDOR_ID, vendor_id)
        self.set_u16(regs.DEVICE_ID, device_id)
        self.set_u8(regs.REVISION_ID, revision)
        self.set_u8(regs.CLASS_PROG, prog_if)
        self.set_u16(regs.CLASS_DEVICE, class_code)
        self.set_u8(regs.HEADER_TYPE, regs.HEADER_TYPE_NORMAL)
        self.set_u16(regs.SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self.set_u16(regs.SUBSYSTEM_ID, subsystem_id)
        self.set_u8(regs.INTERRUPT_PIN, interrupt_pin)

        # mirrors pci_init_wmask in hw/pci/pci.c: cache line size, interrupt line, the command
        # bits QEMU lets a guest set, and all of the device-specific space from 0x40 up.
        self._wmask[regs.CACHE_LINE_SIZE] = 0xFF
        self._wmask[regs.INTERRUPT_LINE] = 0xFF
        self.set_wmask(
            regs.COMMAND,
            2,
            regs.COMMAND_IO
            | regs.COMMAND_MEMORY
            | regs.COMMAND_MASTER
            | regs.COMMAND_INTX_DISABLE
            | regs.COMMAND_SERR,
        )
        self._wmask[regs.HEADER_SIZE :] = b"\xff" * (regs.CONFIG_SPACE_SIZE - regs.HEADER_SIZE)
        # mirrors pci_init_w1cmask: the error bits of the status register are write-1-to-clear.
        self._set_mask(
            self._w1cmask,
            regs.STATUS,
            2,
            regs.STATUS_PARITY
            | regs.STATUS_SIG_TARGET_ABORT
            | regs.STATUS_REC_TARGET_ABORT
            | regs.STATUS_REC_MASTER_ABORT
            | regs.STATUS_SIG_SYSTEM_ERROR
            | regs.STATUS_DETECTED_PARITY,
        )
        for spec in bars:
            self._register_bar(spec)
        self._initial = bytes(self._cfg)

    # -- declaration (device construction time) ------------------------------------------------

    def _register_bar(self, spec: BarSpec) -> None:
        slots = [spec.index] + ([spec.index + 1] if spec.kind is BarKind.MEM64 else [])
        for slot in slots:
            if any(slot in (b.index, b.index + (b.kind is BarKind.MEM64)) for b in self._bars.values()):
                raise DeviceError(f"BAR slot {slot} already in use", bar=slot)
        self._bars[spec.index] = spec
        off = regs.bar_offset(spec.index)
        # mirrors pci_register_bar: wmask = ~(size - 1), type bits read-only in the register.
        wmask = ~(spec.size - 1)
        if spec.kind is BarKind.MEM64:
            self._set_mask(self._wmask, off, 8, wmask & _U64)
            self._cfg[off : off + 8] = spec.type_bits.to_bytes(8, "little")
        else:
            self._set_mask(self._wmask, off, 4, wmask & _U32)
            self._cfg[off : off + 4] = spec.type_bits.to_bytes(4, "little")

    def add_capability(self, cap_id: int, length: int, offset: int | None = None) -> int:
        """Reserve ``length`` bytes for a capability, link it and return its offset.

        mirrors pci_add_capability in hw/pci/pci.c: the new capability is linked at the head of
        the list, its bytes become read-only (the device opens what it wants with
        :meth:`set_wmask`), and the status register's capability-list bit is set.
        """
        if length < 2:
            raise DeviceError("a capability needs at least its ID and next pointer")
        aligned = (length + 3) & ~3
        if offset is None:
            offset = self._find_space(aligned)
        if offset % 4 or offset < regs.HEADER_SIZE or offset + length > regs.CONFIG_SPACE_SIZE:
            raise DeviceError(f"capability offset {offset:#x} invalid", offset=offset)
        if any(self._used[offset : offset + aligned]):
            raise DeviceError(f"capability at {offset:#x} overlaps another", offset=offset)
        self._cfg[offset] = cap_id
        self._cfg[offset + 1] = self._cfg[regs.CAPABILITY_LIST]
        self._cfg[regs.CAPABILITY_LIST] = offset
        self._used[offset : offset + aligned] = b"\xff" * aligned
        self._wmask[offset : offset + length] = bytes(length)
        self.set_u16(regs.STATUS, self.status | regs.STATUS_CAP_LIST)
        self._initial = bytes(self._cfg)
        return offset

    def _find_space(self, size: int) -> int:
        for off in range(regs.HEADER_SIZE, regs.CONFIG_SPACE_SIZE - size + 1, 4):
            if not any(self._used[off : off + size]):
                return off
        raise DeviceError(f"no room for a {size}-byte capability")

    def capabilities(self) -> list[tuple[int, int]]:
        """Walk the chain: ``[(cap_id, offset), ...]`` from the list head (loop-safe)."""
        out: list[tuple[int, int]] = []
        seen: set[int] = set()
        if not self.status & regs.STATUS_CAP_LIST:
            return out
        ptr = self._cfg[regs.CAPABILITY_LIST] & ~3
        while ptr and ptr not in seen:
            seen.add(ptr)
            out.append((self._cfg[ptr], ptr))
            ptr = self._cfg[ptr + 1] & ~3
        return out

    def set_wmask(self, offset: int, size: int, mask: int) -> None:
        """Make the bits of ``mask`` guest-writable at ``offset`` (device construction time)."""
        self._set_mask(self._wmask, offset, size, mask)

    def set_w1cmask(self, offset: int, size: int, mask: int) -> None:
        """Make the bits of ``mask`` write-1-to-clear at ``offset``."""
        self._set_mask(self._w1cmask, offset, size, mask)
        self._set_mask(self._wmask, offset, size, self._get(self._wmask, offset, size) & ~mask)

    def seal(self) -> None:
        """Record the current bytes as the reset values (call after device-specific set-up)."""
        self._initial = bytes(self._cfg)

    @staticmethod
    def _set_mask(buf: bytearray, offset: int, size: int, value: int) -> None:
        buf[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @staticmethod
    def _get(buf: bytes | bytearray, offset: int, size: int) -> int:
        return int.from_bytes(buf[offset : offset + size], "little")

    # -- device-side raw access (not subject to masks) -----------------------------------------

    def set_u8(self, offset: int, value: int) -> None:
        self._cfg[offset] = value & 0xFF

    def set_u16(self, offset: int, value: int) -> None:
        self._cfg[offset : offset + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def set_u32(self, offset: int, value: int) -> None:
        self._cfg[offset : offset + 4] = (value & _U32).to_bytes(4, "little")

    def get(self, offset: int, size: int) -> int:
        return self._get(self._cfg, offset, size)

    # -- guest access ----------------------------------------------------------------------------

    @staticmethod
    def check_access(offset: int, size: int) -> None:
        """DeviceError unless ``[offset, offset + size)`` lies in the 256 bytes and size is 1..4.

        The stock remote (hw/remote/message.c ``process_config_read``) refuses ``addr + 4 > 256``
        even for a 1-byte access and then shuts down; we check the real extent instead.
        """
        if not 1 <= size <= 4 or offset < 0 or offset + size > regs.CONFIG_SPACE_SIZE:
            raise DeviceError(f"config access {offset:#x}/{size} out of range", offset=offset, size=size)

    def read(self, offset: int, size: int) -> int:
        """Guest config read (mirrors pci_default_read_config: a plain little-endian copy)."""
        # the check_access condition inline: this runs once per guest config read
        if not 1 <= size <= 4 or offset < 0 or offset + size > regs.CONFIG_SPACE_SIZE:
            self.check_access(offset, size)  # raises DeviceError
        return int.from_bytes(self._cfg[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> ConfigEffects:
        """Guest config write through the masks; returns what changed (never acts itself)."""
        self.check_access(offset, size)
        cfg, wmask, w1c = self._cfg, self._wmask, self._w1cmask
        old_command = cfg[regs.COMMAND] | cfg[regs.COMMAND + 1] << 8
        # mirrors pci_default_write_config: per byte, masked write then write-1-to-clear.
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            a = offset + i
            wm = wmask[a]
            cfg[a] = ((cfg[a] & ~wm) | (byte & wm)) & ~(byte & w1c[a]) & 0xFF
        new_command = cfg[regs.COMMAND] | cfg[regs.COMMAND + 1] << 8
        # pci_default_write_config re-maps on writes to the BARs (0x10..0x27) or the command byte.
        touches_bars = offset < regs.bar_offset(regs.NUM_BARS) and offset + size > regs.BASE_ADDRESS_0
        touches_cmd = offset <= regs.COMMAND < offset + size
        if not (touches_bars or touches_cmd):
            return NO_EFFECTS
        changes = self._update_windows()
        if not changes and old_command == new_command:
            return NO_EFFECTS
        return ConfigEffects(old_command, new_command, changes)

    def reset(self) -> ConfigEffects:
        """PCI core reset: every register back to its declared value, nothing decoded."""
        old_command = self.command
        self._cfg[:] = self._initial
        changes = self._update_windows()
        return ConfigEffects(old_command, self.command, changes)

    # -- decoded state ---------------------------------------------------------------------------

    @property
    def command(self) -> int:
        return self._cfg[regs.COMMAND] | self._cfg[regs.COMMAND + 1] << 8

    @property
    def status(self) -> int:
        return self._cfg[regs.STATUS] | self._cfg[regs.STATUS + 1] << 8

    @property
    def bus_master(self) -> bool:
        return bool(self._cfg[regs.COMMAND] & regs.COMMAND_MASTER)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & regs.COMMAND_INTX_DISABLE)

    def set_interrupt_status(self, level: bool) -> None:
        """Reflect the device's INTx level in status bit 3 (mirrors pci_update_irq_status)."""
        if level:
            self._cfg[regs.STATUS] |= regs.STATUS_INTERRUPT
        else:
            self._cfg[regs.STATUS] &= ~regs.STATUS_INTERRUPT & 0xFF

    @property
    def bars(self) -> dict[int, BarSpec]:
        """The declared BARs by slot (a copy)."""
        return dict(self._bars)

    @property
    def windows(self) -> tuple[BarWindow, ...]:
        """The BARs decoded right now, in slot order."""
        return self._windows

    def window(self, index: int) -> BarWindow | None:
        for w in self._windows:
            if w.index == index:
                return w
        return None

    def _bar_address(self, spec: BarSpec, command: int) -> int | None:
        """Where BAR ``spec`` decodes, or None (mirrors pci_bar_address in hw/pci/pci.c)."""
        off = regs.bar_offset(spec.index)
        size = spec.size
        if spec.kind is BarKind.IO:
            if not command & regs.COMMAND_IO:
                return None
            base = self._get(self._cfg, off, 4) & ~(size - 1)
            last = base + size - 1
            # QEMU: a 32-bit I/O BAR that wraps or reaches 0xffffffff, or sits at 0, is unmapped.
            if last <= base or last >= _U32 or base == 0:
                return None
            return base
        if not command & regs.COMMAND_MEMORY:
            return None
        width = 8 if spec.kind is BarKind.MEM64 else 4
        base = self._get(self._cfg, off, width) & ~(size - 1)
        last = base + size - 1
        if last <= base or base == 0:
            return None
        if spec.kind is BarKind.MEM32 and last >= _U32:
            return None
        if last >= _U64:
            return None
        return base

    def _update_windows(self) -> tuple[BarChange, ...]:
        command = self.command
        old = {w.index: w for w in self._windows}
        new: list[BarWindow] = []
        changes: list[BarChange] = []
        for index in sorted(self._bars):
            spec = self._bars[index]
            base = self._bar_address(spec, command)
            win = None if base is None else BarWindow(index, base, spec.size, spec.kind.is_memory)
            if win is not None:
                new.append(win)
            if old.get(index) != win:
                changes.append(BarChange(index, old.get(index), win))
        self._windows = tuple(new)
        return tuple(changes)

    def snapshot(self) -> bytes:
        """The current 256 bytes (for status reports and tests)."""
        return bytes(self._cfg)
